"""The exact incremental KV cache of block-causal models (SDAR), inside the decode loop.

With blocks aligned to absolute positions (`sequence_layout`), a block's keys/values depend
only on its own and earlier blocks' tokens, so once a block is decoded they never change:
each finished block's keys/values are computed ONCE and written into the one carried cache
(`dynamic_update_slice`, in place in the loop carry). No step runs a full forward:

  before the loop  prefill: one forward over the prompt's whole blocks [0, start) fills the
                   cache there (not a denoising step: it yields no logits, and is not counted
                   in NFE, as SDAR's own prefill).
  a block's first  (block > 0) a forward over [previous block | block] (2 Lb tokens) reading
  step             the cache before them: the previous block's final keys/values are written
                   into the cache and the block's logits come from the same forward. SDAR's
                   `block_diffusion_generate` spends one extra forward per finished block
                   to store them; here that work rides on the next block's first step.
  other steps      a forward over the block (Lb tokens) reading the cache before it.

Blocks the loop skips (no row has a MASK there) would miss their keys/values; the loop only
skips a block when every row is finished from it on (EOS-filled or past its canvas), so
nothing reads them. Keys after the region are never visible (block-causal), so the cache's
tail may hold anything.

Shapes: B2 rows (2B under classifier-free guidance), T = the sequence length, Lb = block.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dllm_jax import models as M
from dllm_jax.cache import KVCache
from dllm_jax.config import GenerateConfig, ModelConfig


def prefill(params: Any, cfg: ModelConfig, gen: GenerateConfig, tokens: jax.Array,
            positions: jax.Array, valid: jax.Array, start: int, mesh: Any) -> KVCache:
    """A KVCache `[L, B2, T, Hkv, hd]` holding the keys/values of [0, start) (zeros after).

    tokens, positions, valid: `[B2, T]` the decode's sequence; start: static canvas start.
    """
    b2, t = tokens.shape
    cache = KVCache.zeros(cfg.num_layers, b2, t, cfg.num_kv_heads, cfg.head_dim,
                          params["embed"].dtype)
    if start == 0:
        return cache
    head = jnp.zeros((b2, 1), jnp.int32)
    per_layer = isinstance(params["layers"], (list, tuple))
    _, kv = M.apply_refresh(params, cfg, tokens[:, :start], positions[:, :start],
                            valid[:, :start], head, attn_impl=gen.attn_impl, mesh=mesh,
                            into=cache if per_layer else None)
    if per_layer:                   # written into the full-length cache
        return kv
    write = lambda a, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        a, new.astype(a.dtype), 0, axis=2)
    return KVCache(k=write(cache.k, kv.k), v=write(cache.v, kv.v))


def block_logits(params: Any, cfg: ModelConfig, gen: GenerateConfig, tokens: jax.Array,
                 positions: jax.Array, valid: jax.Array, cache: KVCache, start: jax.Array,
                 block: jax.Array, block_step: jax.Array, mesh: Any
                 ) -> tuple[jax.Array, KVCache]:
    """float32 logits `[B2, Lb, V]` of the block at sequence index `start`, and the cache
    (with the previous block's keys/values written at the block's first step)."""
    lb = gen.block_length
    b2 = tokens.shape[0]
    idx = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]

    def forward(c: KVCache, rs: jax.Array, r: int) -> tuple[jax.Array, Any]:
        cut = lambda a: jax.lax.dynamic_slice_in_dim(a, rs, r, axis=1)  # noqa: E731
        qloc = jnp.broadcast_to(r - lb + jnp.arange(lb, dtype=jnp.int32), (b2, lb))
        return M.apply_cached(params, cfg, c, cut(tokens), cut(positions), cut(valid),
                              positions, valid & (idx < rs), qloc, attn_impl=gen.attn_impl,
                              mesh=mesh, collect_kv=True)

    rs = jnp.maximum(start - lb, 0)             # where the previous block's entries go
    old = lambda a: jax.lax.dynamic_slice_in_dim(a, rs, lb, axis=2)  # noqa: E731

    # Neither branch returns the cache (a branch passing it through makes XLA copy it): both
    # return the previous block's entries, recomputed or as they are, written back after.
    def block_only(c: KVCache) -> tuple[jax.Array, Any]:
        logits, _ = forward(c, start, lb)
        return logits, (old(c.k), old(c.v))

    def with_previous(c: KVCache) -> tuple[jax.Array, Any]:
        logits, kv = forward(c, start - lb, 2 * lb)
        return logits, (kv.k[:, :, :lb].astype(c.k.dtype), kv.v[:, :, :lb].astype(c.v.dtype))

    logits, (k_prev, v_prev) = jax.lax.cond((block_step == 0) & (block > 0), with_previous,
                                            block_only, cache)
    write = lambda a, new: jax.lax.dynamic_update_slice_in_dim(a, new, rs, axis=2)  # noqa: E731
    return logits, KVCache(k=write(cache.k, k_prev), v=write(cache.v, v_prev))


__all__ = ["block_logits", "prefill"]
