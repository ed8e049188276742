"""Sequence-parallel attention: the token axis split over a mesh's `seq` axis (`jax.shard_map`).

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
the key block it currently holds. Batch rows go over the mesh's `data` axis and heads over
`model` where they divide evenly (else replicated).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dllm_jax.attention.dense import scores, weighted_values

RING_Q_CHUNK = 2048  # queries per chunk inside one device's block (bounds the score tensor)
STRATEGIES = ("ring", "gather", "reduce", "auto")

Stats = tuple[jax.Array, jax.Array, jax.Array]


def _partial(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> Stats:
    """Un-normalised attention of q `[b, tq, h, d]` over one key block.

    Returns the row max m and sum l `[b, hkv, g, tq]` and weighted values o
    `[b, tq, hkv, g, d]`, all float32, with the scores of `dense.scores`.
    """
    s = scores(q, k, mask)
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    return m, jnp.sum(p, axis=-1), weighted_values(p, v)


def _partial_chunked(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, q_chunk: int
                     ) -> Stats:
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


def _to_o(c: jax.Array) -> jax.Array:
    return jnp.moveaxis(c, 3, 1)[..., None]  # [b, k, g, q] -> [b, q, k, g, 1]


def _merge(a: Stats, b: Stats) -> Stats:
    (ma, la, oa), (mb, lb, ob) = a, b
    m = jnp.maximum(ma, mb)
    ca, cb = jnp.exp(ma - m), jnp.exp(mb - m)
    return m, la * ca + lb * cb, oa * _to_o(ca) + ob * _to_o(cb)


def _finish(stats: Stats, dtype: Any) -> jax.Array:
    _, l, o = stats
    out = o / _to_o(l)
    b, tq, hkv, g, d = out.shape
    return out.reshape(b, tq, hkv * g, d).astype(dtype)


def _ring_body(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, n: int,
               q_chunk: int) -> jax.Array:
    """Per device: q, k, v blocks `[b, T/n, ., d]`, mask rows `[b, T/n, T]`."""
    me = jax.lax.axis_index("seq")
    tk = k.shape[1]
    perm = [(j, (j + 1) % n) for j in range(n)]

    def block(s: int, k: jax.Array, v: jax.Array) -> Stats:
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
    return _finish((mg, jax.lax.psum(l * c, "seq"), jax.lax.psum(o * _to_o(c), "seq")), q.dtype)


def _pad_axis(x: jax.Array, axis: int, to: int) -> jax.Array:
    if x.shape[axis] == to:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, to - x.shape[axis])
    return jnp.pad(x, widths)


def _axis(mesh: Any, name: str, *dims: int) -> str | None:
    size = int(mesh.shape.get(name, 1))
    return name if size > 1 and all(d % size == 0 for d in dims) else None


def seq_parallel_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                           mesh: Any, strategy: str = "auto", q_chunk: int = RING_Q_CHUNK
                           ) -> jax.Array:
    """`attention.dot_product_attention` with the token axis split over `mesh`'s `seq` axis.

    Args:
      q `[B, Tq, H, hd]`, k/v `[B, Tk, Hkv, hd]`, mask `[B, Tq, Tk]` bool: as in `dense`.
      mesh: a mesh with a `seq` axis (from `sharding.make_mesh`).
      strategy: "ring" (self-attention; key/value blocks passed with ppermute, online
        softmax), "gather" (all-gather keys/values), "reduce" (queries replicated, keys split,
        softmax statistics combined with pmax/psum), or "auto": ring when Tq == Tk, reduce
        otherwise. Token axes that `seq` does not divide are padded (masked out).
      q_chunk: queries per chunk inside a device (bounds the `[chunk, keys]` score block).
    Returns:
      `[B, Tq, H, hd]` in q's dtype; equal to the single-device kernel up to float rounding.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sequence-parallel strategy {strategy!r}; use one of "
                         f"{', '.join(STRATEGIES)}.")
    n = int(mesh.shape.get("seq", 1))
    b, tq, h, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if strategy == "auto":
        strategy = "ring" if tq == tk else "reduce"
    bax, hax = _axis(mesh, "data", b), _axis(mesh, "model", h, hkv)
    pk = -(-tk // n) * n
    k, v, mask = _pad_axis(k, 1, pk), _pad_axis(v, 1, pk), _pad_axis(mask, 2, pk)
    pq = tq
    if strategy == "reduce":
        q_spec, m_spec, body = P(bax, None, hax, None), P(bax, None, "seq"), _reduce_body
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
