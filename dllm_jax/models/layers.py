"""The layers the model families share: RMSNorm, RoPE, dense projections, grouped-query
attention projections, the SwiGLU MLP, the LM head.

Numerics follow the PyTorch originals: RMSNorm and RoPE in float32, logits in float32.
Shapes: hidden states `[batch, len, D]`; per-layer params `lp` hold one layer's weights (see
`params.dense_decoder`), unfused or fused (`qkv_proj`, `gate_up_proj`). Any matrix may be an
int8 `quant.QuantizedWeight` (`dense` and the LM head then run `quant.matmul`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax.attention import matmul_precision
from dllm_jax.config import ModelConfig
from dllm_jax.quant import QuantizedWeight, matmul

Params = dict[str, Any]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis in float32, cast back to x's dtype, then scaled."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables `[batch, len, head_dim]` (float32) for the half-split RoPE layout."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `[batch, len, heads, head_dim]` by tables `[batch, len, head_dim]` (float32 math)."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rot * sin[:, :, None, :]
    return out.astype(x.dtype)


def dense(x: jax.Array, w: jax.Array | QuantizedWeight) -> jax.Array:
    """`x [..., in] @ w [in, out]` (float32 operands at full precision on GPU); an int8
    QuantizedWeight runs `(x @ q.astype(x.dtype)) * scale` (`quant.matmul`), in x's dtype."""
    if isinstance(w, QuantizedWeight):
        return matmul(x, w, precision=matmul_precision(x.dtype))
    return jnp.einsum("...i,io->...o", x, w, precision=matmul_precision(w.dtype))


def embed(params: Params, tokens: jax.Array) -> jax.Array:
    """Token ids `[B, T]` -> embeddings `[B, T, D]`."""
    return jnp.take(params["embed"], tokens, axis=0)


def project_qkv(cfg: ModelConfig, lp: Params, x: jax.Array, cos: jax.Array, sin: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer's queries, keys, values for hidden states `x [B, T, D]`, RoPE applied.

    Returns q `[B, T, H, hd]`, k and v `[B, T, Hkv, hd]`.
    """
    b, t, _ = x.shape
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    if "qkv_proj" in lp:                      # fused layout (params.unstack_layers)
        qkv = dense(h, lp["qkv_proj"])
        if cfg.qkv_bias:
            qkv = qkv + lp["qkv_bias"]
        q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
    else:
        q, k, v = dense(h, lp["q_proj"]), dense(h, lp["k_proj"]), dense(h, lp["v_proj"])
        if cfg.qkv_bias:
            q, k, v = q + lp["q_bias"], k + lp["k_bias"], v + lp["v_bias"]
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def swiglu(lp: Params, h: jax.Array) -> jax.Array:
    """`down(silu(gate(h)) * up(h))` for normed hidden states `[B, T, D]`."""
    if "gate_up_proj" in lp:                  # fused layout (params.unstack_layers)
        gate, up = jnp.split(dense(h, lp["gate_up_proj"]), 2, axis=-1)
    else:
        gate, up = dense(h, lp["gate_proj"]), dense(h, lp["up_proj"])
    return dense(jax.nn.silu(gate) * up, lp["down_proj"])


def attention_out_and_mlp(cfg: ModelConfig, lp: Params, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Residual updates after attention `[B, T, H, hd]`: `x + o_proj(attn)`, then
    `+ SwiGLU(mlp_norm(.))`."""
    b, t = attn.shape[:2]
    x = x + dense(attn.reshape(b, t, cfg.q_size), lp["o_proj"])
    return x + swiglu(lp, rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps))


def lm_logits(cfg: ModelConfig, params: Params, h: jax.Array) -> jax.Array:
    """Final norm and LM head: hidden `[B, Q, D]` -> float32 logits `[B, Q, V]`."""
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    precision = matmul_precision(h.dtype)
    if cfg.tie_embeddings:
        return jnp.einsum("bqd,vd->bqv", h, params["embed"], preferred_element_type=jnp.float32,
                          precision=precision)
    if isinstance(params["lm_head"], QuantizedWeight):
        return matmul(h, params["lm_head"], jnp.float32, precision)
    return jnp.einsum("bqd,dv->bqv", h, params["lm_head"], preferred_element_type=jnp.float32,
                      precision=precision)
