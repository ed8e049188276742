"""The params table: every weight of a model family, with its shape, its logical axes, its
initialiser and its Hugging Face name, in ONE place.

`sharding` (logical axes -> mesh axes), the converter (`checkpoints_convert`: Hugging Face
name -> our path), `param_shapes` / `init_params` and `decode_layout` (the per-layer and
fused layouts) all read the same `Family` table.

Layouts of a params pytree (dense weights `[in, out]`, transposed from PyTorch's `[out, in]`):

  stacked (on disk, CPU): `layers/<name>` holds all layers, `[num_layers, ...]`, run by one
    `lax.scan`. A family whose layers differ in shape (DiffusionGemma: sliding and full
    attention layers with their own head dims) also has layer groups, `<group>/<name>`
    stacked over the layers of that group only (`Family.layer_groups`).
  per-layer (accelerators): `layers` is a list of dicts, one buffer per weight and layer,
    optionally FUSED: `qkv_proj [D, q+2kv]` (= q|k|v), `qkv_bias`, `gate_up_proj [D, 2F]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from dllm_jax import quant
from dllm_jax.config import ModelConfig

Params = dict[str, Any]
Shape = Callable[[ModelConfig], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Weight:
    """One parameter.

    Attributes:
      path: "embed", "final_norm", or "<group>/<name>" for a per-layer weight: group
        "layers" (every layer) or one of the family's `layer_groups`.
      axes: logical axes of the tensor (of ONE layer for per-layer weights; the stacked
        layout prepends "layers").
      shape: ModelConfig -> shape (of one layer).
      hf: the Hugging Face tensor name (`{i}` = layer index), or None if not converted.
      transposed: the Hugging Face tensor is PyTorch's `[out, in]` of our `[in, out]`.
      when: a boolean ModelConfig field ("!field" for its negation) that must hold for the
        weight to exist (e.g. biases only with `qkv_bias`).
      init: "normal" | "ones" | "zeros" (`init_params`).
      transforms: converter transforms (`checkpoints_convert.keymap.TRANSFORMS`) applied
        after `transposed`, for tensors a plain transpose does not fit (expert stacks).
    """

    path: str
    axes: tuple[str, ...]
    shape: Shape
    hf: str | None = None
    transposed: bool = False
    when: str | None = None
    init: str = "normal"
    transforms: tuple[str, ...] = ()

    @property
    def per_layer(self) -> bool:
        return "/" in self.path

    @property
    def group(self) -> str | None:
        """The layer group of a per-layer weight ("layers" = every layer), else None."""
        return self.path.split("/", 1)[0] if self.per_layer else None

    @property
    def name(self) -> str:
        return self.path.split("/", 1)[-1]

    def applies(self, cfg: ModelConfig) -> bool:
        return condition_holds(self.when, cfg)


def condition_holds(when: str | None, cfg: ModelConfig) -> bool:
    if when is None:
        return True
    value = bool(getattr(cfg, when.lstrip("!")))
    return value != when.startswith("!")


@dataclasses.dataclass(frozen=True)
class Fused:
    """A per-layer weight that concatenates others on the last axis (`decode_layout`).

    `axes` are its logical axes: "qkv" / "gate_up" map to no mesh axis, since splitting a
    concatenation of column-parallel projections over `model` would mix q with k (a mesh with
    model > 1 decodes unfused; see `decode_layout`)."""

    name: str
    parts: tuple[str, ...]
    axes: tuple[str, ...]


FUSED: tuple[Fused, ...] = (
    Fused("qkv_proj", ("q_proj", "k_proj", "v_proj"), ("embed", "qkv")),
    Fused("qkv_bias", ("q_bias", "k_bias", "v_bias"), ("qkv",)),
    Fused("gate_up_proj", ("gate_proj", "up_proj"), ("embed", "gate_up")),
)


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its weights, plus what its Hugging Face checkpoints hold besides them.

    Attributes:
      arch: `ModelConfig.arch` value.
      weights: the params table.
      hf_skip: (Hugging Face name, when) of known tensors deliberately not converted (e.g. a
        saved LM head that duplicates tied embeddings).
      hf_ignore: regular expressions of known non-parameter buffers (`rotary_emb.inv_freq`).
      hf_dropped: (regular expression, what they are) of known tensors deliberately left
        out of the conversion with a notice (e.g. a vision tower of a text-only port).
      layer_groups: ModelConfig -> {group: the layer indices it stacks}, for per-layer
        weights that exist on some layers only (None: only the "layers" group).
    """

    arch: str
    weights: tuple[Weight, ...]
    hf_skip: tuple[tuple[str, str | None], ...] = ()
    hf_ignore: tuple[str, ...] = (r".*rotary_emb\.inv_freq$",)
    hf_dropped: tuple[tuple[str, str], ...] = ()
    layer_groups: Callable[[ModelConfig], Mapping[str, tuple[int, ...]]] | None = None

    def present(self, cfg: ModelConfig) -> tuple[Weight, ...]:
        return tuple(w for w in self.weights if w.applies(cfg))

    def rows(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """`{group: layer indices}`; row r of a group's stack holds layer `rows[group][r]`."""
        out = {"layers": tuple(range(cfg.num_layers))}
        if self.layer_groups is not None:
            out.update({g: tuple(ix) for g, ix in self.layer_groups(cfg).items()})
        return out

    def axes(self) -> dict[str, tuple[str, ...]]:
        """`{name: logical axes}` for every weight (per-layer names without "layers/") and
        every fused weight. Weights of other layer groups are only ever stacked, so their
        axes include the leading "layers" (`sharding.param_axes` prepends it for "layers/"
        paths only)."""
        out = {w.name: (w.axes if w.group in (None, "layers") else ("layers", *w.axes))
               for w in self.weights}
        out.update({f.name: f.axes for f in FUSED})
        return out


def dense_decoder(names: Mapping[str, str]) -> tuple[Weight, ...]:
    """The weights of a pre-norm SwiGLU decoder (LLaDA, Qwen2, Qwen3), with Hugging Face names
    from `names` (our name -> HF name; missing names are not converted)."""
    def w(path: str, axes: tuple[str, ...], shape: Shape, **kw: Any) -> Weight:
        return Weight(path, axes, shape, hf=names.get(path.split("/", 1)[-1]), **kw)

    d = lambda c: c.hidden_size  # noqa: E731
    return (
        w("embed", ("vocab", "embed"), lambda c: (c.vocab_size, d(c))),
        w("layers/attn_norm", ("embed",), lambda c: (d(c),), init="ones"),
        w("layers/q_proj", ("embed", "heads"), lambda c: (d(c), c.q_size), transposed=True),
        w("layers/k_proj", ("embed", "kv_heads"), lambda c: (d(c), c.kv_size), transposed=True),
        w("layers/v_proj", ("embed", "kv_heads"), lambda c: (d(c), c.kv_size), transposed=True),
        w("layers/q_bias", ("heads",), lambda c: (c.q_size,), when="qkv_bias", init="zeros"),
        w("layers/k_bias", ("kv_heads",), lambda c: (c.kv_size,), when="qkv_bias", init="zeros"),
        w("layers/v_bias", ("kv_heads",), lambda c: (c.kv_size,), when="qkv_bias", init="zeros"),
        w("layers/q_norm", ("head_dim",), lambda c: (c.head_dim,), when="qk_norm", init="ones"),
        w("layers/k_norm", ("head_dim",), lambda c: (c.head_dim,), when="qk_norm", init="ones"),
        w("layers/o_proj", ("heads", "embed"), lambda c: (c.q_size, d(c)), transposed=True),
        w("layers/mlp_norm", ("embed",), lambda c: (d(c),), init="ones"),
        w("layers/gate_proj", ("embed", "mlp"), lambda c: (d(c), c.intermediate_size),
          transposed=True),
        w("layers/up_proj", ("embed", "mlp"), lambda c: (d(c), c.intermediate_size),
          transposed=True),
        w("layers/down_proj", ("mlp", "embed"), lambda c: (c.intermediate_size, d(c)),
          transposed=True),
        w("final_norm", ("embed",), lambda c: (d(c),), init="ones"),
        w("lm_head", ("embed", "vocab"), lambda c: (d(c), c.vocab_size), transposed=True,
          when="!tie_embeddings"),
    )


# ----------------------------------------------------------------------------- from a table
def shapes_from_table(family: Family, cfg: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """The stacked params pytree of `cfg` as `jax.ShapeDtypeStruct`s (no memory allocated)."""
    dt = jnp.dtype(dtype)
    rows = family.rows(cfg)
    params: Params = {}
    layers: Params = {}
    for w in family.present(cfg):
        shape = w.shape(cfg)
        if w.group == "layers":
            layers[w.name] = jax.ShapeDtypeStruct((cfg.num_layers, *shape), dt)
        elif w.per_layer:
            params.setdefault(w.group, {})[w.name] = jax.ShapeDtypeStruct(
                (len(rows[w.group]), *shape), dt)
        else:
            params[w.path] = jax.ShapeDtypeStruct(shape, dt)
    params["layers"] = layers
    return params


def init_from_table(family: Family, cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32,
                    std: float = 0.02) -> Params:
    """Random params: normal(0, std) weights, zero biases, unit norm scales."""
    shapes = shapes_from_table(family, cfg, dtype)
    kinds = {w.path: w.init for w in family.weights}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, sd), k in zip(leaves, keys):
        kind = kinds["/".join(str(p.key) for p in path)]
        if kind == "ones":
            out.append(jnp.ones(sd.shape, sd.dtype))
        elif kind == "zeros":
            out.append(jnp.zeros(sd.shape, sd.dtype))
        else:
            out.append((std * jax.random.normal(k, sd.shape, jnp.float32)).astype(sd.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- layouts
def unstack_layers(params: Params, fuse: bool = False) -> Params:
    """The same params with `layers` as a list of per-layer dicts (one buffer per weight).

    On GPU the per-layer layout runs faster (no weight copies out of the stacked buffers
    inside the layer loop); call it once, outside jit. Each stacked leaf is released as soon
    as it is split, so the peak extra memory is one stacked leaf (if the caller drops its
    own reference to the stacked params).

    fuse: also join the `FUSED` groups (q/k/v, their biases, gate/up), so that each is one
    wider matmul.
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        per_layer = [dict(lp) for lp in layers]
    else:
        names = list(layers)
        n = layers[names[0]].shape[0]
        per_layer = [{} for _ in range(n)]
        stacked = dict(layers)
        for name in names:
            leaf = stacked.pop(name)
            for i in range(n):
                per_layer[i][name] = leaf[i]      # a QuantizedWeight slices q and scale
            del leaf
    if fuse:
        for lp in per_layer:
            for f in FUSED:
                if all(p in lp for p in f.parts):
                    lp[f.name] = quant.concatenate([lp.pop(p) for p in f.parts], axis=-1)
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = per_layer
    return out


def _split_sizes(cfg: ModelConfig, f: Fused) -> list[int]:
    if f.name == "gate_up_proj":
        return [cfg.intermediate_size]
    return [cfg.q_size, cfg.q_size + cfg.kv_size]


def stack_layers(params: Params, cfg: ModelConfig | None = None) -> Params:
    """Inverse of `unstack_layers`: `layers` as a dict of `[L, ...]` arrays (a fused layout
    is split again, which needs `cfg`)."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return params
    split = []
    for lp in layers:
        lp = dict(lp)
        for f in FUSED:
            if f.name in lp:
                if cfg is None:
                    raise ValueError("stack_layers needs the ModelConfig to split fused weights.")
                for p, a in zip(f.parts, quant.split(lp.pop(f.name), _split_sizes(cfg, f), -1)):
                    lp[p] = a
        split.append(lp)
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = {name: quant.stack([lp[name] for lp in split]) for name in split[0]}
    return out


def decode_layout(params: Params, mesh: Any = None) -> Params:
    """The params layout that decodes fastest here.

    CPU: the stacked layout (one `lax.scan`, quicker to compile). Accelerators: per-layer
    weights (the scan's weight slices cost copies every step), fused q/k/v and gate/up
    unless `mesh` splits heads over `model` (a fused column block would straddle q and k).
    """
    platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    if platform == "cpu":
        return params
    model = 1 if mesh is None else int(dict(mesh.shape).get("model", 1))
    return unstack_layers(params, fuse=model == 1)
