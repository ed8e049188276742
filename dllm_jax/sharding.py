"""Sharding over a device mesh: one rules table, declared shardings, sequence-parallel attention.

Mesh. Three named axes, built from a spec string such as ``data=2,model=2,seq=2``:

  data    data parallelism: the batch is split; every device of a data group sees its rows only.
  seq     sequence (context) parallelism: the token axis of activations and of the KV cache is
          split; attention runs as ring attention across the axis (see below).
  model   tensor parallelism: attention heads and the MLP hidden width are split (Megatron
          style: q/k/v/gate/up are column-parallel, o/down are row-parallel, so one all-reduce
          per attention and per MLP); the vocabulary of the embedding and LM head too.

Devices are laid out in the order (data, seq, model): `model`, which communicates in every
layer, gets the nearest devices, then `seq` (one ppermute per ring step), then `data` (no
communication inside a decode).

Axis types are chosen on purpose: every axis is `AxisType.Auto`. The model is plain `jnp`
code without per-op sharding annotations; shardings are declared at the boundaries (params,
the prompt, the loop carry) and inside attention (`jax.shard_map`, manual over all axes), and
the compiler propagates them through the rest. With `Explicit` axes (the default of
`jax.make_mesh` on recent JAX) sharding becomes part of every array's type and ops such as an
embedding lookup on sharded ids or a matmul that contracts a sharded axis need an explicit
output sharding at each call site, which is what "declared in one table, never per call
site" rules out.

Logical axes. Every array the decode touches names its axes with logical names (`PARAM_AXES`
for the params, keyed by path; `CACHE_AXES`, `ACTIVATION_AXES`, `state_axes`), and ONE table,
`RULES`, maps logical names to mesh axes. A mesh axis is dropped from a dimension that it does
not divide (e.g. 2 kv heads on model=4 stay replicated), and a mesh axis of size 1 is never
named, so the same rules serve any mesh from one CPU to a pod.

Sequence-parallel attention (`seq_parallel_attention`, used by `attention.dot_product_attention`
whenever a mesh with seq > 1 is active):
  * self-attention (queries = keys: the full forward and the cache refresh): RING attention.
    Each device keeps its block of queries; key/value blocks travel around the ring with
    `ppermute` (n - 1 hops) and are folded in with an online (flash-style) softmax. The
    all-gather variant moves the same bytes ((n-1)/n of K/V per device) but holds all of K/V
    and a `[T/n, T]` score block per device; the ring holds two K/V blocks and `[T/n, T/n]`
    scores and can overlap each hop with the previous block's compute, so it is the one that
    reaches long sequences. (`strategy="gather"` is kept for comparison and tests.)
  * a short query block against a long cache (cached steps: the region attends to the cache
    + itself): split-K REDUCE. Queries are replicated over `seq`, each device attends to its
    slice of the keys, and the partial softmax statistics (max, sum, weighted values) are
    combined with one `pmax` and two `psum`s of query-sized tensors. Rotating the cache around
    a ring would move the whole cache every step to serve a few dozen queries.
  Masks are the dense boolean masks of `attention.attention_mask`, so bidirectional,
  block-causal (SDAR) and padding masks all work unchanged: each device reads the columns of
  the key block it currently holds.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dllm_jax import attention as A

MESH_AXES: tuple[str, ...] = ("data", "model", "seq")   # names accepted in a spec string
DEVICE_ORDER: tuple[str, ...] = ("data", "seq", "model")  # mesh axis order (model innermost)

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
    "answer": None,         # per-answer-position histories (small)
    "block": None,          # the active block
    "steps": None,          # trace rows
}

# Logical axes of every parameter, keyed by its path in the params pytree (see model.py).
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "layers/attn_norm": ("layers", "embed"),
    "layers/q_proj": ("layers", "embed", "heads"),
    "layers/k_proj": ("layers", "embed", "kv_heads"),
    "layers/v_proj": ("layers", "embed", "kv_heads"),
    "layers/q_bias": ("layers", "heads"),
    "layers/k_bias": ("layers", "kv_heads"),
    "layers/v_bias": ("layers", "kv_heads"),
    "layers/q_norm": ("layers", "head_dim"),
    "layers/k_norm": ("layers", "head_dim"),
    "layers/o_proj": ("layers", "heads", "embed"),
    "layers/mlp_norm": ("layers", "embed"),
    "layers/gate_proj": ("layers", "embed", "mlp"),
    "layers/up_proj": ("layers", "embed", "mlp"),
    "layers/down_proj": ("layers", "mlp", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
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


class ShardingError(ValueError):
    """A mesh spec or sharding request that cannot be served; the message says how to fix it."""


# ----------------------------------------------------------------------------- mesh
def parse_mesh_spec(spec: str | Mapping[str, int] | None, num_devices: int | None = None
                    ) -> dict[str, int]:
    """``"data=2,model=2,seq=2"`` -> ``{"data": 2, "model": 2, "seq": 2}``.

    Missing axes are 1. One axis may be ``-1`` (or omitted entirely when the spec is empty):
    it takes the devices left over. ``None`` / ``""`` means all devices on `data`.
    """
    n_dev = len(jax.devices()) if num_devices is None else num_devices
    sizes: dict[str, int] = {}
    if isinstance(spec, Mapping):
        items = [(str(k), int(v)) for k, v in spec.items()]
    else:
        items = []
        for part in (spec or "").replace(" ", "").split(","):
            if not part:
                continue
            name, eq, value = part.partition("=")
            if not eq:
                raise ShardingError(f"mesh spec part {part!r} has no '='; write e.g. data=2.")
            try:
                items.append((name, int(value)))
            except ValueError:
                raise ShardingError(f"mesh spec part {part!r} is not NAME=INT; write e.g. "
                                    f"--mesh data=2,model=2,seq=2.") from None
    for name, value in items:
        if name not in MESH_AXES:
            raise ShardingError(f"unknown mesh axis {name!r}; the axes are "
                                f"{', '.join(MESH_AXES)} (e.g. data=2,model=2,seq=2).")
        if name in sizes:
            raise ShardingError(f"mesh axis {name!r} is given twice.")
        if value == 0 or value < -1:
            raise ShardingError(f"mesh axis {name}={value} must be a positive size or -1.")
        sizes[name] = value
    if not sizes:
        sizes = {"data": -1}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ShardingError("only one mesh axis may be -1.")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n_dev % fixed:
            raise ShardingError(f"{n_dev} devices cannot be split as {spec!r}: the fixed axes use "
                                f"{fixed}, which does not divide {n_dev}.")
        sizes[free[0]] = n_dev // fixed
    out = {name: int(sizes.get(name, 1)) for name in MESH_AXES}
    total = math.prod(out.values())
    if total > n_dev:
        raise ShardingError(f"mesh {format_mesh_spec(out)} needs {total} devices but only "
                            f"{n_dev} are visible.")
    return out


def format_mesh_spec(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={sizes.get(k, 1)}" for k in MESH_AXES)


def make_mesh(spec: str | Mapping[str, int] | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` with axes ("data", "seq", "model"), all `AxisType.Auto` (see the module doc).

    Args:
      spec: ``"data=2,model=2,seq=2"`` (see `parse_mesh_spec`), a dict, or None (all on data).
      devices: devices to use (default `jax.devices()`); a mesh smaller than the list takes
        the first ones. Multi-host batch inference passes `jax.local_devices()`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in DEVICE_ORDER)
    n = math.prod(shape)
    types = (AxisType.Auto,) * len(DEVICE_ORDER)
    if n == len(devices) and devices == list(jax.devices()):
        return jax.make_mesh(shape, DEVICE_ORDER, axis_types=types)
    try:
        return jax.make_mesh(shape, DEVICE_ORDER, axis_types=types, devices=devices[:n])
    except Exception:  # noqa: BLE001 - topology-unaware fallback for odd device subsets
        return Mesh(np.asarray(devices[:n], dtype=object).reshape(shape), DEVICE_ORDER,
                    axis_types=types)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return {a: int(mesh.shape.get(a, 1)) for a in MESH_AXES}


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


def param_axes(params: Any) -> Any:
    """Pytree of logical axes (tuples) with the structure of `params` (or of a ModelConfig's
    `param_shapes`)."""
    params = _as_param_tree(params)

    def axes(path: tuple[Any, ...], leaf: Any) -> tuple[str, ...]:
        name = _path_name(path)
        parts = name.split("/")
        per_layer = len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit()
        key = f"layers/{parts[2]}" if per_layer else name   # `model.unstack_layers` layout
        if key not in PARAM_AXES:
            raise ShardingError(f"parameter {name!r} has no logical axes; add it to "
                                f"sharding.PARAM_AXES.")
        ax = PARAM_AXES[key][1:] if per_layer else PARAM_AXES[key]
        if len(ax) != len(leaf.shape):
            raise ShardingError(f"parameter {name!r} has shape {tuple(leaf.shape)} but "
                                f"PARAM_AXES names {len(ax)} axes {ax}.")
        return ax

    return jax.tree_util.tree_map_with_path(axes, params)


def _as_param_tree(params_or_cfg: Any) -> Any:
    from dllm_jax.config import ModelConfig

    if isinstance(params_or_cfg, ModelConfig):
        from dllm_jax.model import param_shapes
        return param_shapes(params_or_cfg)
    return params_or_cfg


def param_shardings(params_or_cfg: Any, mesh: Mesh) -> Any:
    """NamedShardings for every parameter (pytree like the params); accepts a ModelConfig so
    that `checkpoint.load_model(dir, shardings=param_shardings(cfg, mesh))` restores each
    device's shard directly."""
    params = _as_param_tree(params_or_cfg)
    axes = param_axes(params)
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
    `PARAM_AXES`, prompt rows over `data`, key and controller leaves replicated. The compiled
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


@contextlib.contextmanager
def activate(mesh: Mesh | None) -> Iterator[None]:
    """While tracing under this context, attention runs sequence-parallel on `mesh` when its
    seq axis is > 1. `decode.generate(..., mesh=mesh)` enters it for you."""
    with A.sequence_parallel(mesh):
        yield


# ----------------------------------------------------------------------------- attention
RING_Q_CHUNK = 2048  # queries per chunk inside one device's block (bounds the score tensor)


def _partial(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Un-normalised attention of q `[b, tq, h, d]` over one key block.

    Returns the row max m and sum l `[b, hkv, g, tq]` and weighted values o `[b, tq, hkv, g, d]`,
    all float32, with scores computed exactly as `attention._xla_attention` does.
    """
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, tq, hkv, h // hkv, d)
    precision = A.matmul_precision(q.dtype)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32,
                   precision=precision)
    s = s * (1.0 / jnp.sqrt(jnp.float32(d)))
    s = jnp.where(mask[:, None, None, :, :], s, jnp.float32(-1e30))
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                   precision=precision)
    return m, l, o


def _partial_chunked(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, q_chunk: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    tq = q.shape[1]
    if q_chunk <= 0 or tq <= q_chunk or tq % q_chunk:
        return _partial(q, k, v, mask)
    nc = tq // q_chunk
    qs = jnp.moveaxis(q.reshape(q.shape[0], nc, q_chunk, *q.shape[2:]), 1, 0)
    ms = jnp.moveaxis(mask.reshape(mask.shape[0], nc, q_chunk, mask.shape[2]), 1, 0)
    m, l, o = jax.lax.map(lambda a: _partial(a[0], k, v, a[1]), (qs, ms))
    # [nc, b, hkv, g, c] -> [b, hkv, g, nc*c]; [nc, b, c, hkv, g, d] -> [b, nc*c, hkv, g, d]
    join_q = lambda x: jnp.moveaxis(x, 0, 3).reshape(*x.shape[1:4], tq)  # noqa: E731
    o = jnp.moveaxis(o, 0, 1).reshape(o.shape[1], tq, *o.shape[3:])
    return join_q(m), join_q(l), o


def _merge(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    (ma, la, oa), (mb, lb, ob) = a, b
    m = jnp.maximum(ma, mb)
    ca, cb = jnp.exp(ma - m), jnp.exp(mb - m)
    to_o = lambda c: jnp.moveaxis(c, 3, 1)[..., None]  # [b,k,g,q] -> [b,q,k,g,1]  # noqa: E731
    return m, la * ca + lb * cb, oa * to_o(ca) + ob * to_o(cb)


def _finish(stats: tuple[jax.Array, ...], dtype: Any) -> jax.Array:
    m, l, o = stats
    out = o / jnp.moveaxis(l, 3, 1)[..., None]
    b, tq, hkv, g, d = out.shape
    return out.reshape(b, tq, hkv * g, d).astype(dtype)


def _ring_body(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, n: int,
               q_chunk: int) -> jax.Array:
    """Per device: q, k, v blocks `[b, T/n, ., d]`, mask rows `[b, T/n, T]`."""
    me = jax.lax.axis_index("seq")
    tk = k.shape[1]
    perm = [(j, (j + 1) % n) for j in range(n)]

    def block(s: int, k: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        src = (me - s) % n                       # the ring position whose keys we hold now
        cols = jax.lax.dynamic_slice_in_dim(mask, src * tk, tk, axis=2)
        return _partial_chunked(q, k, v, cols, q_chunk)

    acc = block(0, k, v)
    for s in range(1, n):                        # n is static and small: unrolled
        k = jax.lax.ppermute(k, "seq", perm)
        v = jax.lax.ppermute(v, "seq", perm)
        acc = _merge(acc, block(s, k, v))
    return _finish(acc, q.dtype)


def _gather_body(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, n: int,
                 q_chunk: int) -> jax.Array:
    k = jax.lax.all_gather(k, "seq", axis=1, tiled=True)
    v = jax.lax.all_gather(v, "seq", axis=1, tiled=True)
    return _finish(_partial_chunked(q, k, v, mask, q_chunk), q.dtype)


def _reduce_body(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, n: int,
                 q_chunk: int) -> jax.Array:
    """Per device: all queries, a slice of the keys; combine softmax statistics over seq."""
    m, l, o = _partial_chunked(q, k, v, mask, q_chunk)
    mg = jax.lax.pmax(m, "seq")
    c = jnp.exp(m - mg)
    l = jax.lax.psum(l * c, "seq")
    o = jax.lax.psum(o * jnp.moveaxis(c, 3, 1)[..., None], "seq")
    return _finish((mg, l, o), q.dtype)


def _reduce_two_body(q: jax.Array, k1: jax.Array, v1: jax.Array, m1: jax.Array, k2: jax.Array,
                     v2: jax.Array, m2: jax.Array, *, q_chunk: int) -> jax.Array:
    """Per device: all queries, a slice of the first key set (the cache) and all of the second
    (the small recomputed region, replicated over seq)."""
    m, l, o = _partial_chunked(q, k1, v1, m1, q_chunk)
    mg = jax.lax.pmax(m, "seq")
    c = jnp.exp(m - mg)
    first = (mg, jax.lax.psum(l * c, "seq"),
             jax.lax.psum(o * jnp.moveaxis(c, 3, 1)[..., None], "seq"))
    return _finish(_merge(first, _partial_chunked(q, k2, v2, m2, q_chunk)), q.dtype)


def _pad_axis(x: jax.Array, axis: int, to: int) -> jax.Array:
    if x.shape[axis] == to:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, to - x.shape[axis])
    return jnp.pad(x, widths)


def seq_parallel_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                           mesh: Mesh, strategy: str = "auto", q_chunk: int = RING_Q_CHUNK
                           ) -> jax.Array:
    """`attention.dot_product_attention` with the token axis split over the mesh's `seq` axis.

    Args:
      q `[B, Tq, H, hd]`, k/v `[B, Tk, Hkv, hd]`, mask `[B, Tq, Tk]` bool: as in attention.py.
      mesh: a mesh from `make_mesh`; batch rows go over `data` and heads over `model` where
        they divide evenly (else replicated).
      strategy: "ring" (self-attention; key/value blocks passed with ppermute, online
        softmax), "gather" (all-gather keys/values), "reduce" (queries replicated, keys split,
        softmax statistics combined with pmax/psum), or "auto": ring when Tq == Tk, reduce
        otherwise. Token axes that `seq` does not divide are padded (masked out).
      q_chunk: queries per chunk inside a device (bounds the `[chunk, keys]` score block).
    Returns:
      `[B, Tq, H, hd]` in q's dtype; equal to the single-device kernel up to float rounding.
    """
    n = int(mesh.shape.get("seq", 1))
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if strategy == "auto":
        strategy = "ring" if tq == tk else "reduce"
    if strategy not in ("ring", "gather", "reduce"):
        raise ShardingError(f"unknown sequence-parallel strategy {strategy!r}; use 'ring', "
                            f"'gather', 'reduce' or 'auto'.")
    sizes = mesh_sizes(mesh)
    bax = "data" if sizes["data"] > 1 and b % sizes["data"] == 0 else None
    hax = ("model" if sizes["model"] > 1 and h % sizes["model"] == 0
           and hkv % sizes["model"] == 0 else None)
    pk = -(-tk // n) * n
    k, v = _pad_axis(k, 1, pk), _pad_axis(v, 1, pk)
    mask = _pad_axis(mask, 2, pk)
    if strategy == "reduce":
        q_spec, m_spec = P(bax, None, hax, None), P(bax, None, "seq")
        body = _reduce_body
        pq = tq
    else:
        pq = -(-tq // n) * n
        q, mask = _pad_axis(q, 1, pq), _pad_axis(mask, 1, pq)
        q_spec, m_spec = P(bax, "seq", hax, None), P(bax, "seq", None)
        body = _ring_body if strategy == "ring" else _gather_body
    kv_spec = P(bax, "seq", hax, None)
    fn = jax.shard_map(lambda q_, k_, v_, m_: body(q_, k_, v_, m_, n=n, q_chunk=q_chunk),
                       mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, m_spec),
                       out_specs=q_spec, check_vma=False)
    out = fn(q, k, v, mask)
    return out[:, :tq] if pq != tq else out


def seq_parallel_attention_two(q: jax.Array, k1: jax.Array, v1: jax.Array, mask1: jax.Array,
                               k2: jax.Array, v2: jax.Array, mask2: jax.Array, mesh: Mesh,
                               q_chunk: int = RING_Q_CHUNK) -> jax.Array:
    """`attention.dot_product_attention_two` (keys `k1 ++ k2`) with `k1` split over `seq`.

    The cached step's form: `k1` is the long cache (split over seq, padded to a multiple of
    it), `k2` the short recomputed region (replicated). Split-K reduce over `k1` as in
    `seq_parallel_attention(strategy="reduce")`, then the region's statistics are merged in;
    the concatenated keys are never built.
    """
    n = int(mesh.shape.get("seq", 1))
    b, tq, h, d = q.shape
    t1, hkv = k1.shape[1], k1.shape[2]
    sizes = mesh_sizes(mesh)
    bax = "data" if sizes["data"] > 1 and b % sizes["data"] == 0 else None
    hax = ("model" if sizes["model"] > 1 and h % sizes["model"] == 0
           and hkv % sizes["model"] == 0 else None)
    pk = -(-t1 // n) * n
    k1, v1, mask1 = _pad_axis(k1, 1, pk), _pad_axis(v1, 1, pk), _pad_axis(mask1, 2, pk)
    q_spec = P(bax, None, hax, None)
    fn = jax.shard_map(lambda *a: _reduce_two_body(*a, q_chunk=q_chunk), mesh=mesh,
                       in_specs=(q_spec, P(bax, "seq", hax, None), P(bax, "seq", hax, None),
                                 P(bax, None, "seq"), q_spec, q_spec, P(bax, None, None)),
                       out_specs=q_spec, check_vma=False)
    return fn(q, k1, v1, mask1, k2, v2, mask2)


__all__ = [
    "ACTIVATION_AXES", "CACHE_AXES", "PARAM_AXES", "RULES", "ShardingError", "activate",
    "cache_sharding", "cache_shardings", "constrain_state", "format_mesh_spec",
    "logical_sharding", "logical_to_spec", "make_mesh", "mesh_sizes", "param_axes",
    "param_shardings", "parse_mesh_spec", "place_generate_inputs", "prompt_sharding",
    "replicated", "seq_parallel_attention", "seq_parallel_attention_two", "shard_params",
    "state_axes",
]
