"""Sharding over a device mesh: meshes, one rules table, placement of params and decode state.

Meshes (`make_mesh`, axes data / seq / model, all `AxisType.Auto`): see `mesh.py`.

Logical axes. Every array the decode touches names its axes with logical names (the model
family's params table for the params, `models.params`; `CACHE_AXES`, `ACTIVATION_AXES`, `state_axes`), and ONE table,
`RULES`, maps logical names to mesh axes. A mesh axis is dropped from a dimension that it does
not divide (e.g. 2 kv heads on model=4 stay replicated), and a mesh axis of size 1 is never
named, so the same rules serve any mesh from one CPU to a pod.

Sequence-parallel attention lives with the other attention kernels
(`attention/ring.py`); the model receives the mesh as an explicit argument.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dllm_jax import models
from dllm_jax.config import ModelConfig
from dllm_jax.mesh import (ShardingError, format_mesh_spec,
                           make_mesh, mesh_sizes, parse_mesh_spec)


# ----------------------------------------------------------------------------- the rules
# Logical axis name -> mesh axis (None: replicated). The ONE table.
RULES: dict[str, str | None] = {
    "batch": "data",        # prompts / rows of the decode
    "length": "seq",        # token axis of the sequence, of activations and of the KV cache
    "heads": "model",       # query heads (q_proj columns, o_proj rows, q_bias)
    "kv_heads": "model",    # key/value heads (k/v_proj columns, cache)
    "mlp": "model",         # SwiGLU hidden width
    "vocab": "model",       # embedding rows, LM head columns, logits
    "embed": None,          # model width D: replicated (Megatron-style TP)
    "head_dim": None,
    "layers": None,         # stacked layer axis (scanned)
    "qkv": None,            # fused q|k|v columns (models.params.FUSED): not split, see there
    "gate_up": None,        # fused gate|up columns
    "expert": "model",      # MoE expert stacks (DiffusionGemma)
    "answer": None,         # per-answer-position histories (small)
    "block": None,          # the active block
    "steps": None,          # trace rows
}

CACHE_AXES: tuple[str, ...] = ("layers", "batch", "length", "kv_heads", "head_dim")

ACTIVATION_AXES: dict[str, tuple[str, ...]] = {
    "tokens": ("batch", "length"),                      # ids, positions, key mask [B, T]
    "hidden": ("batch", "length", "embed"),             # [B, T, D]
    "q": ("batch", "length", "heads", "head_dim"),      # [B, T, H, hd]
    "kv": ("batch", "length", "kv_heads", "head_dim"),  # [B, T, Hkv, hd]
    "mlp": ("batch", "length", "mlp"),                  # [B, T, F]
    "logits": ("batch", "block", "vocab"),              # [B, Lb, V]
    "mask": ("batch", "length", None),                  # [B, Tq, Tk] rows split with queries
}


# ----------------------------------------------------------------------------- logical -> spec
def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: Mapping[str, str | None] = RULES
                    ) -> P:
    """PartitionSpec for logical `axes` under `rules`.

    With `mesh` and `shape`, a mesh axis is used only if it has size > 1 and divides the
    dimension, and at most once per array; otherwise the dimension is replicated.
    """
    used: set[str] = set()
    out: list[str | None] = []
    for i, name in enumerate(axes):
        mesh_axis = None if name is None else rules.get(name)
        if name is not None and name not in rules:
            raise ShardingError(f"logical axis {name!r} has no rule; add it to sharding.RULES.")
        if mesh_axis is not None and mesh is not None:
            size = int(mesh.shape.get(mesh_axis, 1))
            if size == 1 or (shape is not None and shape[i] % size):
                mesh_axis = None
        if mesh_axis is not None and mesh_axis in used:
            mesh_axis = None
        if mesh_axis is not None:
            used.add(mesh_axis)
        out.append(mesh_axis)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def logical_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]
                     ) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- params
def _path_name(path: tuple[Any, ...]) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def param_axes(params: Any, cfg: ModelConfig | None = None) -> Any:
    """Pytree of logical axes (tuples) with the structure of `params` (any layout: stacked,
    per-layer, fused), read from the model family's params table (`models.params`).

    `params` may be a ModelConfig (its `models.param_shapes`); the family is `cfg`'s, or
    the dense decoders' (all share one table of axes) when no config is given.
    """
    if isinstance(params, ModelConfig):
        cfg, params = params, models.param_shapes(params)
    table = models.family(cfg.arch if cfg is not None else "llada").axes()

    def axes(path: tuple[Any, ...], leaf: Any) -> tuple[str, ...]:
        name = _path_name(path)
        parts = name.split("/")
        part = None                         # an int8 weight's "q" [.., in, out] / "scale" [.., out]
        if parts[-1] in ("q", "scale") and parts[-1] not in table and len(parts) > 1:
            part, parts = parts[-1], parts[:-1]
        key = parts[-1]
        if key not in table:
            raise ShardingError(f"parameter {name!r} has no logical axes; add it to its model "
                                f"family's table (dllm_jax/models/).")
        ax = table[key]
        if part == "scale":                 # one scale per output column
            ax = (*ax[:-2], ax[-1])
        if parts[0] == "layers" and not (len(parts) == 3 and parts[1].isdigit()):
            ax = ("layers", *ax)            # stacked layout
        if len(ax) != len(leaf.shape):
            raise ShardingError(f"parameter {name!r} has shape {tuple(leaf.shape)} but its "
                                f"table names {len(ax)} axes {ax}.")
        return ax

    return jax.tree_util.tree_map_with_path(axes, params)


def param_shardings(params_or_cfg: Any, mesh: Mesh) -> Any:
    """NamedShardings for every parameter (pytree like the params); accepts a ModelConfig so
    that `checkpoint.load_model(dir, shardings=param_shardings(cfg, mesh))` restores each
    device's shard directly."""
    params = (models.param_shapes(params_or_cfg) if isinstance(params_or_cfg, ModelConfig)
              else params_or_cfg)
    axes = param_axes(params_or_cfg)
    return jax.tree.map(lambda leaf, ax: logical_sharding(mesh, ax, leaf.shape), params, axes,
                        is_leaf=lambda x: isinstance(x, tuple) and all(
                            isinstance(a, str) for a in x))


def shard_params(params: Any, mesh: Mesh) -> Any:
    """Params placed on `mesh` as the rules say (a no-op for params already placed so)."""
    return jax.device_put(params, param_shardings(params, mesh))


# ----------------------------------------------------------------------------- batch, cache
def prompt_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Prompt ids / prompt mask `[B, P]`: rows over `data`; the short prompt axis replicated
    (the decode concatenates the answer and re-lays the `[B, T]` tokens out itself)."""
    return logical_sharding(mesh, ("batch", None), shape)


def cache_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """KVCache k / v `[L, B, T, Hkv, hd]`."""
    return logical_sharding(mesh, CACHE_AXES, shape)


def cache_shardings(mesh: Mesh, cache: Any) -> Any:
    """Shardings for a `KVCache` (same pytree structure)."""
    return jax.tree.map(lambda a: cache_sharding(mesh, a.shape), cache)


def state_axes(state: Any) -> dict[str, Any]:
    """Logical axes of the loop carry's fields (a dict by field name; see `state.DecodeState`).
    The controller state is left to the compiler (its layout is the controller's own)."""
    trace = None
    if state.stats.trace is not None:
        trace = {k: (("steps",) if k == "block" else ("steps", "batch", "block"))
                 for k in state.stats.trace}
    return {
        "tokens": ACTIVATION_AXES["tokens"],
        "traj": ("batch", "answer"),
        "block": (), "block_step": (),
        "masked_at_block_start": ("batch",),
        "stats": {"nfe": ("batch",), "steps": (), "fix_step": ("batch", "answer"),
                  "trace": trace},
        "key": (),
        "cache": None if state.cache is None else CACHE_AXES,
    }


def _constrain(x: jax.Array, mesh: Mesh, axes: Sequence[str | None]) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, axes, x.shape))


def constrain_state(state: Any, mesh: Mesh | None) -> Any:
    """`with_sharding_constraint` on every field of a DecodeState the rules cover (inside jit)."""
    if mesh is None:
        return state
    ax = state_axes(state)
    c = lambda x, a: _constrain(x, mesh, a)  # noqa: E731
    stats = state.stats
    trace = stats.trace
    if trace is not None:
        trace = {k: c(v, ax["stats"]["trace"][k]) for k, v in trace.items()}
    stats = stats.replace(nfe=c(stats.nfe, ("batch",)),
                          fix_step=c(stats.fix_step, ("batch", "answer")), trace=trace)
    cache = state.cache
    if cache is not None:
        cache = jax.tree.map(lambda a: c(a, CACHE_AXES), cache)
    return state.replace(
        tokens=c(state.tokens, ax["tokens"]),
        traj=jax.tree.map(lambda a: c(a, ax["traj"]), state.traj),
        masked_at_block_start=c(state.masked_at_block_start, ("batch",)),
        stats=stats, cache=cache)


def place_generate_inputs(mesh: Mesh, params: Any, prompt: np.ndarray, valid: np.ndarray,
                          key: jax.Array, controller: Any) -> tuple[Any, ...]:
    """Commit the inputs of the compiled decode to `mesh` as the rules say: params by
    the params table, prompt rows over `data`, key and controller leaves replicated. The compiled
    loop then runs under `jax.jit` with exactly these input shardings (what older JAX called
    pjit with in_shardings)."""
    rep = replicated(mesh)
    params = shard_params(params, mesh)
    prompt = jax.device_put(prompt, prompt_sharding(mesh, prompt.shape))
    valid = jax.device_put(valid, prompt_sharding(mesh, valid.shape))
    key = jax.device_put(key, rep)
    controller = jax.tree.map(
        lambda x: jax.device_put(x, rep) if isinstance(x, jax.Array) else x, controller)
    return params, prompt, valid, key, controller


__all__ = [
    "ACTIVATION_AXES", "CACHE_AXES", "RULES", "ShardingError",
    "cache_sharding", "cache_shardings", "constrain_state", "format_mesh_spec",
    "logical_sharding", "logical_to_spec", "make_mesh", "mesh_sizes", "param_axes",
    "param_shardings", "parse_mesh_spec", "place_generate_inputs", "prompt_sharding",
    "replicated", "shard_params",
    "state_axes",
]
