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


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference attention: `[b, q_len, heads, d]` in q's dtype."""
    b, tq, h, d = q.shape
    out = weighted_values(jax.nn.softmax(scores(q, k, mask), axis=-1), v)
    return out.reshape(b, tq, h, d).astype(q.dtype)


def cudnn_ok(q: jax.Array) -> bool:
    """cuDNN's fused kernel takes GPU bf16/fp16 with head dims that are multiples of 8 <= 256."""
    d = q.shape[-1]
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and d % 8 == 0 and d <= 256)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :],
                                        implementation="cudnn")
