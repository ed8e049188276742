"""int8 weight-only quantisation: per-output-channel symmetric int8 matrices, activations in
the compute dtype (bfloat16 or float32).

A quantised matrix `w [in, out]` is a `QuantizedWeight(q, scale)`: `q` int8 `[in, out]`
holding `round(w / scale)` in [-127, 127] and `scale` float32 `[out]` = `max_i |w[i, o]| / 127`
(one scale per output column, so the rounding error of every entry is at most `scale / 2`).
A stacked weight `[L, in, out]` has `q [L, in, out]` and `scale [L, out]`. `QuantizedWeight`
is a pytree node whose leaves are `q` and `scale`, so `lax.scan` over stacked layers slices
both along their leading `L` axis, and `jax.jit` / `jax.device_put` see two arrays.

The matmul (`layers.dense`, `layers.lm_logits` call `matmul`) is
`(x @ q.astype(x.dtype)) * scale`: the weights stay int8 in memory (half the bytes of
bfloat16, a quarter of float32) and are read as int8; the conversion to the activations'
dtype is the dot's operand inside one jitted program, for XLA to fuse into the matmul
instead of writing a converted copy of the matrix. The product is accumulated in float32,
scaled per column in float32, then cast to `x`'s dtype. Whether XLA fuses the conversion on
a given GPU, and the speed there, are not checked here (CPU only so far).

Quantised (`QUANTIZABLE`): the dense decoders' projections `q_proj`, `k_proj`, `v_proj`,
`o_proj`, `gate_proj`, `up_proj`, `down_proj`, their fused forms `qkv_proj`,
`gate_up_proj`, and `lm_head`. Not quantised: the embeddings (a gather, and the LM head of a
model with tied embeddings), norm scales and biases.

Why not qwix (google's JAX quantisation library): qwix quantises Flax (linen / nnx) modules by
intercepting their calls and needs flax, while our models are plain functions over a params
dict (`layers.dense` is one einsum), so the small pytree node below does the same job with
no new dependency.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax.config import ConfigError

#: quantisation modes a checkpoint folder, `convert --quantize` and `session.load` accept.
MODES: tuple[str, ...] = ("int8",)
#: the weight names (last path component) `quantize_params` quantises.
QUANTIZABLE: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                "up_proj", "down_proj", "qkv_proj", "gate_up_proj", "lm_head")
#: the model families whose matrices all go through `layers.dense` / `layers.lm_logits`.
ARCHS: tuple[str, ...] = ("llada", "dream", "sdar")
QMAX = 127
SCALE_DTYPE = np.float32
_INV_QMAX = np.float32(1.0 / QMAX)     # scale = amax * (1/127): numpy and XLA agree bit for bit


class QuantizationError(ConfigError):
    """A quantisation setting or quantised params that cannot be used; the message says how."""


def check_mode(mode: str | None, flag: str = "quantize") -> str | None:
    """`mode` if it is None (no quantisation) or one of `MODES`; else QuantizationError naming
    `flag` ("--quantize" on the command line)."""
    if mode is None or mode in MODES:
        return mode
    raise QuantizationError(f"{flag} must be {' or '.join(MODES)} (or left out for the stored "
                            f"weights), got {mode!r}; e.g. {flag} int8.")


def check_arch(arch: str, flag: str = "quantize") -> None:
    """Refuse model families whose weights do not all go through `layers.dense`."""
    if arch not in ARCHS:
        raise QuantizationError(f"{flag} int8 supports the {', '.join(ARCHS)} families, not "
                                f"{arch}; leave {flag} out for this model.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """An int8 matrix with one float32 scale per output column.

    Attributes:
      q: int8 `[..., in, out]` (`[in, out]`, or `[L, in, out]` stacked).
      scale: float32 `[..., out]`; `w ~= q * scale[..., None, :]`.
    """

    q: Any
    scale: Any

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the float matrix it stands for (= `q`'s)."""
        return tuple(self.q.shape)

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes) + int(self.scale.nbytes)

    def __getitem__(self, index: Any) -> "QuantizedWeight":
        """Index the leading (layer) axes: `w[i]` of a stacked weight is layer i's."""
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > self.ndim - 2:
            raise IndexError("a QuantizedWeight is indexed on its leading (layer) axes only.")
        return QuantizedWeight(self.q[index], self.scale[index])

    def dequantize(self, dtype: Any = jnp.float32) -> Any:
        """The float matrix `q * scale` in `dtype` (the reference `matmul` is checked against)."""
        xp = np if isinstance(self.q, np.ndarray) else jnp
        w = self.q.astype(np.float32) * xp.expand_dims(self.scale.astype(np.float32), -2)
        return w.astype(dtype)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


# ----------------------------------------------------------------------------- quantise
def _quantize_np(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantise one `[in, out]` numpy matrix."""
    wf = np.asarray(w, np.float32)
    amax = np.max(np.abs(wf), axis=-2)
    scale = np.where(amax > 0, amax * _INV_QMAX, np.float32(1.0)).astype(SCALE_DTYPE)
    q = np.clip(np.rint(wf / scale[None, :]), -QMAX, QMAX).astype(np.int8)
    return q, scale


@jax.jit
def _quantize_jnp(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    def one(m: jax.Array) -> tuple[jax.Array, jax.Array]:
        mf = m.astype(jnp.float32)
        amax = jnp.max(jnp.abs(mf), axis=-2)
        scale = jnp.where(amax > 0, amax * _INV_QMAX, jnp.float32(1.0)).astype(SCALE_DTYPE)
        q = jnp.clip(jnp.round(mf / scale[None, :]), -QMAX, QMAX).astype(jnp.int8)
        return q, scale

    if w.ndim == 2:
        return one(w)
    lead = w.shape[:-2]
    q, s = jax.lax.map(one, w.reshape((-1, *w.shape[-2:])))   # one layer's float32 at a time
    return q.reshape(w.shape), s.reshape((*lead, w.shape[-1]))


def quantize(w: Any) -> QuantizedWeight:
    """Quantise a float matrix `[..., in, out]` per output column (leading axes: layers).

    numpy in, numpy out (the converter, on the host: one layer's float32 copy at a time);
    jax in, jax out (`session.load`: on the weights' device).
    """
    if isinstance(w, QuantizedWeight):
        return w
    if np.ndim(w) < 2:
        raise QuantizationError(f"only matrices are quantised, got shape {tuple(np.shape(w))}.")
    if isinstance(w, np.ndarray):
        if w.ndim == 2:
            return QuantizedWeight(*_quantize_np(w))
        flat = w.reshape((-1, *w.shape[-2:]))
        q = np.empty(flat.shape, np.int8)
        s = np.empty((flat.shape[0], w.shape[-1]), SCALE_DTYPE)
        for i in range(flat.shape[0]):
            q[i], s[i] = _quantize_np(flat[i])
        return QuantizedWeight(q.reshape(w.shape), s.reshape((*w.shape[:-2], w.shape[-1])))
    return QuantizedWeight(*_quantize_jnp(w))


def _path_name(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def quantize_params(params: Any, skip: Iterable[str] = ()) -> Any:
    """The params pytree (any layout: stacked, per-layer, fused) with every `QUANTIZABLE`
    matrix replaced by its `QuantizedWeight`; other leaves (embeddings, norms, biases) and
    weights already quantised are kept as they are.

    skip: weight names (`"lm_head"`, `"down_proj"`) or paths (`"layers/q_proj"`; per-layer
      layouts: `"layers/3/q_proj"`) left in float.
    """
    skip = set(skip)
    unknown = skip - set(QUANTIZABLE) - {s for s in skip if "/" in s}
    if unknown:
        raise QuantizationError(f"skip names {sorted(unknown)} are not quantised weights; the "
                                f"quantised names are {', '.join(QUANTIZABLE)}.")

    def one(path: Sequence[Any], leaf: Any) -> Any:
        name = _path_name(path)
        last = name.rsplit("/", 1)[-1]
        if isinstance(leaf, QuantizedWeight) or last not in QUANTIZABLE:
            return leaf
        if last in skip or name in skip:
            return leaf
        return quantize(leaf)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized)


def dequantize_params(params: Any, dtype: Any = None) -> Any:
    """Every QuantizedWeight replaced by its float matrix (in `dtype`; default the dtype of
    the params' embeddings, else float32)."""
    if dtype is None:
        embed = params.get("embed") if isinstance(params, dict) else None
        dtype = embed.dtype if embed is not None else np.float32
    return jax.tree.map(lambda x: x.dequantize(dtype) if is_quantized(x) else x, params,
                        is_leaf=is_quantized)


def quantized_paths(params: Any) -> list[str]:
    """Paths ("layers/q_proj", "lm_head", "layers/0/q_proj") of the quantised weights."""
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
    return [_path_name(p) for p, leaf in leaves if is_quantized(leaf)]


# ----------------------------------------------------------------------------- matmul
def matmul(x: jax.Array, w: QuantizedWeight, out_dtype: Any = None,
           precision: Any = None) -> jax.Array:
    """`x [..., in] @ w [in, out]` = `(x @ q.astype(x.dtype)) * scale`, accumulated and scaled
    in float32, returned in `out_dtype` (default `x`'s dtype)."""
    y = jnp.einsum("...i,io->...o", x, w.q.astype(x.dtype), precision=precision,
                   preferred_element_type=jnp.float32)
    y = y * w.scale.astype(jnp.float32)
    return y.astype(x.dtype if out_dtype is None else out_dtype)


# ----------------------------------------------------------------------------- layouts
def concatenate(parts: Sequence[Any], axis: int = -1) -> Any:
    """`jnp.concatenate` on the output axis that also joins QuantizedWeights (q and scale
    along out: per-column scales make the fused weight exactly the parts' quantisation)."""
    kinds = {is_quantized(p) for p in parts}
    if kinds == {False}:
        return jnp.concatenate(parts, axis=axis)
    if len(kinds) > 1:
        raise QuantizationError("cannot fuse quantised and float weights; quantise all of "
                                "q/k/v (gate/up) or none (quantize_params skip=...).")
    if axis not in (-1, parts[0].ndim - 1):
        raise QuantizationError("QuantizedWeights are joined on their output axis only.")
    return QuantizedWeight(jnp.concatenate([p.q for p in parts], axis=-1),
                           jnp.concatenate([p.scale for p in parts], axis=-1))


def split(w: Any, sizes: Sequence[int], axis: int = -1) -> list[Any]:
    """`jnp.split(w, sizes, axis)` (indices), QuantizedWeights split on their output axis."""
    if not is_quantized(w):
        return jnp.split(w, sizes, axis)
    return [QuantizedWeight(q, s) for q, s in zip(jnp.split(w.q, sizes, -1),
                                                  jnp.split(w.scale, sizes, -1))]


def stack(leaves: Sequence[Any]) -> Any:
    """`jnp.stack` on a new leading axis, QuantizedWeights stacked leaf by leaf."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *leaves)


# ----------------------------------------------------------------------------- on disk
def to_plain(params: Any) -> Any:
    """QuantizedWeights as `{"q": ..., "scale": ...}` dicts (what a checkpoint folder stores:
    plain nested dicts of arrays, whatever orbax version reads them)."""
    return jax.tree.map(lambda x: {"q": x.q, "scale": x.scale} if is_quantized(x) else x,
                        params, is_leaf=is_quantized)


def from_plain(tree: Any, paths: Iterable[str]) -> Any:
    """Inverse of `to_plain` for the quantised weights at `paths` (stacked layout)."""
    out = tree
    for path in paths:
        keys = path.split("/")
        node = out
        for k in keys[:-1]:
            node = node[k]
        d = node[keys[-1]]
        node[keys[-1]] = QuantizedWeight(d["q"], d["scale"])
    return out


def abstract_quantized(shapes: Any, paths: Iterable[str]) -> Any:
    """`shapes` (a stacked pytree of ShapeDtypeStructs) with the weights at `paths` as
    `{"q": int8 [.., in, out], "scale": float32 [.., out]}` structs (same sharding)."""
    out = jax.tree.map(lambda s: s, shapes)
    for path in paths:
        keys = path.split("/")
        node = out
        try:
            for k in keys[:-1]:
                node = node[k]
            s = node[keys[-1]]
        except (KeyError, TypeError):
            raise QuantizationError(f"quantised weight {path!r} is not a weight of this "
                                    f"model.") from None
        if keys[-1] not in QUANTIZABLE or len(s.shape) < 2:
            raise QuantizationError(f"weight {path!r} is not one that is quantised.")
        kw = {} if getattr(s, "sharding", None) is None else {"sharding": s.sharding}
        node[keys[-1]] = {
            "q": jax.ShapeDtypeStruct(s.shape, np.int8, **kw),
            "scale": jax.ShapeDtypeStruct((*s.shape[:-2], s.shape[-1]), SCALE_DTYPE, **kw)}
    return out


def check_part_dtype(name: str, leaf: Any, want: Any) -> bool:
    """For `checkpoint.check_params`: True for the q / scale leaf of a quantised weight (its
    dtype checked against `want`'s), False for any other leaf."""
    if not name.endswith(("['q']", "['scale']")):
        return False
    if np.dtype(leaf.dtype) != np.dtype(want.dtype):
        raise QuantizationError(f"param {name} has dtype {np.dtype(leaf.dtype).name} but a "
                                f"quantised weight holds {np.dtype(want.dtype).name} there.")
    return True


def folder_meta(cfg: Any, params: Any) -> dict[str, Any]:
    """The dllm_config.json entries of quantised params (none for float params): version 2,
    `"quantization": "int8"`, `"quantized"`: the paths of the int8 weights."""
    paths = quantized_paths(params)
    if not paths:
        return {}
    check_arch(cfg.arch)
    return {"version": 2, "quantization": "int8", "quantized": paths}


def read_folder_meta(meta: dict[str, Any], where: Any) -> tuple[str | None, list[str]]:
    """(None, []) for a float folder's dllm_config.json `meta`, else ("int8", its paths)."""
    mode, paths = meta.get("quantization"), meta.get("quantized", [])
    if mode is None:
        return None, []
    if mode not in MODES or not isinstance(paths, list) or not all(
            isinstance(p, str) for p in paths):
        raise QuantizationError(f"{where} records quantization {mode!r} of weights {paths!r}, "
                                f"which this dllm-jax does not read (it reads "
                                f"{', '.join(MODES)}); re-run `dllm-jax convert`.")
    return mode, paths


def refuse_mesh(paths: Sequence[str]) -> None:
    if paths:
        raise QuantizationError("int8 weights are restored onto one device, not a mesh; load "
                                "without a mesh, or convert the model without --quantize.")


__all__ = ["ARCHS", "MODES", "QUANTIZABLE", "QuantizationError", "QuantizedWeight",
           "abstract_quantized", "check_arch", "check_mode", "check_part_dtype", "concatenate",
           "dequantize_params", "folder_meta", "from_plain", "is_quantized", "matmul",
           "quantize", "quantize_params", "quantized_paths", "read_folder_meta", "refuse_mesh",
           "split", "stack", "to_plain"]
