"""Attention behind one call, and the masks that dLLMs need.

`dot_product_attention(q, k, v, mask, impl, mesh)` picks an implementation by explicit
arguments (the model passes them down from its call; nothing is read from context):

  impl "xla"    portable, float32 softmax (`dense.xla_attention`)
  impl "cudnn"  cuDNN's fused flash kernel (GPU, bf16/fp16, head dim a multiple of 8 <= 256)
  impl "auto"   cuDNN where it applies, XLA elsewhere
  impl "ring"   sequence-parallel over `mesh`'s `seq` axis (`ring.seq_parallel_attention`)

and whatever the impl, a `mesh` whose `seq` axis is > 1 makes attention sequence-parallel (its
per-device kernel is the XLA one, which yields the softmax statistics it merges).

Shapes: queries `[batch, q_len, heads, head_dim]`, keys/values
`[batch, kv_len, kv_heads, head_dim]`, boolean masks `[batch, q_len, kv_len]` (True = may attend).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from dllm_jax.attention.dense import cudnn_attention, cudnn_ok, matmul_precision, xla_attention
from dllm_jax.attention.ring import seq_parallel_attention

AttentionImpl = Literal["xla", "cudnn", "auto", "ring"]
IMPLS: tuple[str, ...] = ("xla", "cudnn", "auto", "ring")


def attention_mask(
    q_positions: jax.Array,
    k_positions: jax.Array,
    key_valid: jax.Array | None,
    block_size: int = 0,
) -> jax.Array:
    """Boolean attention mask `[batch, q_len, kv_len]`.

    Args:
      q_positions: `[batch, q_len]` int positions of the queries (RoPE positions).
      k_positions: `[batch, kv_len]` int positions of the keys.
      key_valid: `[batch, kv_len]` bool, False for padding keys; None means all valid.
      block_size: 0 for bidirectional attention; > 0 for block-causal attention (SDAR):
        a query sees the keys of its own block and of every earlier block, where a
        position's block is `position // block_size`.
    """
    b, tq = q_positions.shape
    tk = k_positions.shape[1]
    if key_valid is None:
        mask = jnp.ones((b, tq, tk), dtype=bool)
    else:
        mask = jnp.broadcast_to(key_valid[:, None, :], (b, tq, tk))
    if block_size > 0:
        qb = q_positions[:, :, None] // block_size
        kb = k_positions[:, None, :] // block_size
        mask = mask & (kb <= qb)
    return mask


def _seq_size(mesh: Any) -> int:
    return 1 if mesh is None else int(dict(mesh.shape).get("seq", 1))


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    impl: AttentionImpl = "auto",
    mesh: Any = None,
) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads.

    Args:
      q: `[batch, q_len, heads, head_dim]`.
      k, v: `[batch, kv_len, kv_heads, head_dim]`; heads must be a multiple of kv_heads.
      mask: `[batch, q_len, kv_len]` bool.
      impl: "xla" | "cudnn" | "auto" | "ring" (see the module docstring).
      mesh: the device mesh of the computation, or None; with a `seq` axis > 1 (or impl
        "ring") attention runs sequence-parallel over it.
    Returns:
      `[batch, q_len, heads, head_dim]` in q's dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; use one of {', '.join(IMPLS)}.")
    if impl == "ring" or _seq_size(mesh) > 1:
        if mesh is None or "seq" not in dict(mesh.shape):
            raise ValueError("attention impl 'ring' needs a device mesh with a 'seq' axis: pass "
                             "mesh=sharding.make_mesh('seq=N') (generate(..., mesh=mesh)).")
        return seq_parallel_attention(q, k, v, mask, mesh)
    if impl == "cudnn" or (impl == "auto" and cudnn_ok(q)):
        if not cudnn_ok(q):
            raise ValueError("attention impl 'cudnn' needs a GPU, bf16/fp16 activations and a "
                             "head dim that is a multiple of 8 up to 256; use 'xla'.")
        return cudnn_attention(q, k, v, mask)
    return xla_attention(q, k, v, mask)


__all__ = ["AttentionImpl", "IMPLS", "attention_mask", "dot_product_attention",
           "matmul_precision", "seq_parallel_attention", "xla_attention"]
