"""One-device attention kernels: XLA (portable, float32 softmax) and cuDNN's fused kernel.

Shapes: queries `[batch, q_len, heads, head_dim]`, keys/values
`[batch, kv_len, kv_heads, head_dim]` (heads a multiple of kv_heads: grouped-query attention),
boolean masks `[batch, q_len, kv_len]` (True = may attend). Scores and softmax are float32
whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED_SCORE = -1e30  # finite, so that a fully masked row gives a uniform (not NaN) softmax
#: Most float32 scores `xla_attention` materialises at once (2^28 = 1 GiB); longer attention
#: (a long prompt's prefill / refresh) runs query chunk by query chunk under `lax.map`.
MAX_SCORES = 2**28


def matmul_precision(dtype: jnp.dtype) -> jax.lax.Precision:
    """HIGHEST for float32 operands, DEFAULT otherwise.

    On GPU, XLA's DEFAULT precision runs float32 matmuls as TF32 (a 10-bit mantissa), which
    moves logits by ~1e-2 and breaks the float32 reference path; bf16 operands lose nothing.
    """
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def scores(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled, masked float32 scores `[batch, kv_heads, group, q_len, kv_len]`."""
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, tq, hkv, h // hkv, d)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32,
                   precision=matmul_precision(q.dtype))
    s = s * (1.0 / jnp.sqrt(jnp.float32(d)))
    return jnp.where(mask[:, None, None, :, :], s, jnp.float32(MASKED_SCORE))


def weighted_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """`p [b, kv_heads, group, q_len, kv_len]` times `v [b, kv_len, kv_heads, d]` ->
    float32 `[b, q_len, kv_heads, group, d]`."""
    return jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v,
                      preferred_element_type=jnp.float32, precision=matmul_precision(v.dtype))


def _dense(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    b, tq, h, d = q.shape
    out = weighted_values(jax.nn.softmax(scores(q, k, mask), axis=-1), v)
    return out.reshape(b, tq, h, d).astype(q.dtype)


def query_chunk(batch: int, heads: int, q_len: int, kv_len: int, max_scores: int) -> int:
    """Queries per chunk so that `batch * heads * chunk * kv_len <= max_scores` (at least 1;
    `q_len` when everything fits)."""
    per_query = batch * heads * kv_len
    return max(1, min(q_len, max_scores // max(per_query, 1)))


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  max_scores: int = MAX_SCORES) -> jax.Array:
    """Reference attention: `[b, q_len, heads, d]` in q's dtype.

    When the scores `[b, heads, q_len, kv_len]` would exceed `max_scores` elements, the
    queries run in chunks (each row's softmax is the same computation, so the result is the
    same up to float rounding); the query axis is padded to a whole number of chunks with
    fully masked rows, which are dropped."""
    b, tq, h, d = q.shape
    c = query_chunk(b, h, tq, k.shape[1], max_scores)
    if c >= tq:
        return _dense(q, k, v, mask)
    n = -(-tq // c)
    pad = n * c - tq
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mp = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
    qs = jnp.moveaxis(qp.reshape(b, n, c, h, d), 1, 0)
    ms = jnp.moveaxis(mp.reshape(b, n, c, mask.shape[2]), 1, 0)
    out = jax.lax.map(lambda a: _dense(a[0], k, v, a[1]), (qs, ms))   # [n, b, c, h, d]
    return jnp.moveaxis(out, 0, 1).reshape(b, n * c, h, d)[:, :tq]


def cudnn_ok(q: jax.Array) -> bool:
    """cuDNN's fused kernel takes GPU bf16/fp16 with head dims that are multiples of 8 <= 256."""
    d = q.shape[-1]
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and d % 8 == 0 and d <= 256)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :],
                                        implementation="cudnn")
