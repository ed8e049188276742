"""Attention kernels behind one function, and the masks that dLLMs need.

Shapes: queries `[batch, q_len, heads, head_dim]`, keys/values
`[batch, kv_len, kv_heads, head_dim]`, boolean masks `[batch, q_len, kv_len]` (True = may attend).
Scores and softmax are computed in float32 whatever the input dtype (bf16 on accelerators).

Sequence parallelism: under `sequence_parallel(mesh)` (entered by `sharding.activate` and by
`decode.generate(..., mesh=mesh)`) with a mesh whose `seq` axis is > 1, the same
`dot_product_attention` runs as ring attention (self-attention) or a split-K reduce (a short
query block against a long cache) across `seq`, via `jax.shard_map`; see `sharding.py`.
impl "ring" asks for it explicitly (and fails without such a mesh).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Literal

import jax
import jax.numpy as jnp

AttentionImpl = Literal["xla", "cudnn", "auto", "ring"]

# The mesh of the decode being traced, if any (read at trace time; the compiled decode takes
# the mesh as a static argument, so a trace made under one mesh is never reused for another).
_MESH: contextvars.ContextVar[Any] = contextvars.ContextVar("dllm_jax_attention_mesh",
                                                           default=None)


@contextlib.contextmanager
def sequence_parallel(mesh: Any) -> Iterator[None]:
    """Attention traced inside this context is sequence-parallel over `mesh`'s `seq` axis
    (when it is > 1). None leaves attention local."""
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def _seq_mesh(impl: str) -> Any:
    """The active mesh when attention must run sequence-parallel, else None."""
    mesh = _MESH.get()
    shape = {} if mesh is None else dict(mesh.shape)
    if impl == "ring" or shape.get("seq", 1) > 1:
        if "seq" not in shape:
            raise ValueError("attention impl 'ring' needs a device mesh with a 'seq' axis: run "
                             "under sharding.activate(mesh) or generate(..., mesh=mesh).")
        return mesh
    return None


def matmul_precision(dtype: jnp.dtype) -> jax.lax.Precision:
    """HIGHEST for float32 operands, DEFAULT otherwise.

    On GPU, XLA's DEFAULT precision runs float32 matmuls as TF32 (a 10-bit mantissa), which
    moves logits by ~1e-2 and breaks the float32 reference path; bf16 operands lose nothing.
    """
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


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


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    qg = q.reshape(b, tq, hkv, g, d)
    precision = matmul_precision(q.dtype)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32,
                        precision=precision)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(d)))
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.float32(-1e30))
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32, precision=precision)
    return out.reshape(b, tq, h, d).astype(q.dtype)


def _cudnn_ok(q: jax.Array) -> bool:
    # cuDNN's fused kernel takes head dims that are multiples of 8, up to 256.
    d = q.shape[-1]
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and d % 8 == 0 and d <= 256)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    impl: AttentionImpl = "auto",
) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads.

    Args:
      q: `[batch, q_len, heads, head_dim]`.
      k, v: `[batch, kv_len, kv_heads, head_dim]`; heads must be a multiple of kv_heads.
      mask: `[batch, q_len, kv_len]` bool.
      impl: "xla" (portable, float32 softmax), "cudnn" (fused flash kernel through
        `jax.nn.dot_product_attention`; GPU with bf16/fp16 and a head dim that is a multiple
        of 8 up to 256), "auto" (cuDNN where it applies, XLA elsewhere), or "ring"
        (sequence-parallel over the active mesh's `seq` axis). Whatever the impl, attention
        traced under `sequence_parallel(mesh)` with seq > 1 is sequence-parallel (its
        per-device kernel is the XLA one, which yields the softmax statistics it merges).
    Returns:
      `[batch, q_len, heads, head_dim]` in q's dtype.
    """
    mesh = _seq_mesh(impl)
    if mesh is not None:
        from dllm_jax.sharding import seq_parallel_attention

        return seq_parallel_attention(q, k, v, mask, mesh)
    if impl == "cudnn" or (impl == "auto" and _cudnn_ok(q)):
        if not _cudnn_ok(q):
            raise ValueError("attention impl 'cudnn' needs a GPU, bf16/fp16 activations and a "
                             "head dim that is a multiple of 8 up to 256; use 'xla'.")
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :],
                                            implementation="cudnn")
    if impl not in ("xla", "auto", "cudnn"):
        raise ValueError(f"unknown attention impl {impl!r}; use 'xla', 'cudnn', 'auto' or "
                         f"'ring'.")
    return _xla_attention(q, k, v, mask)
