"""Block-wise key/value cache (Fast-dLLM's approximate cache) and its refresh rules.

Modes:
  none    every step is a full forward over prompt + answer.
  prefix  at a refresh, one full forward stores every layer's keys/values; the other steps
          of the block recompute the block and everything after it (the "region") and read
          the keys/values before it from the cache.
  dual    like prefix, but the suffix after the block is read from the cache too: only the
          block is recomputed.
A refresh happens at every block start (its forward also gives that step's logits, as in
Fast-dLLM) and, when `refresh_every = r > 0`, at every r-th step inside a block.

Stored keys are post-RoPE. The cache is read-only between refreshes: the recomputed region's
keys/values are concatenated to the cached ones for attention and the stale cache entries of
the region are masked out, so no step copies or rewrites the cache. Block-causal models (SDAR)
do not use these modes' refreshes: their cache is exact (`block_causal_cache`).

For models whose logits are shifted (Dream), the region starts one position earlier so that
the output that predicts the block's first token is recomputed too.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct

CacheMode = Literal["none", "prefix", "dual"]
CACHE_MODES: tuple[str, ...] = ("none", "prefix", "dual")


@struct.dataclass
class KVCache:
    """Per-layer keys and values, `[num_layers, batch, length, kv_heads, head_dim]` each."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int,
              dtype: Any) -> "KVCache":
        shape = (num_layers, batch, length, kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def length(self) -> int:
        return self.k.shape[2]


def region_length(mode: str, gen_length: int, block_length: int, shift: int) -> int:
    """Static number of tokens a cached step recomputes: the block (+ the suffix for prefix)."""
    if mode == "prefix":
        return gen_length + shift
    if mode == "dual":
        return block_length + shift
    raise ValueError(f"cache mode {mode!r} recomputes everything; use 'prefix' or 'dual'.")


def needs_refresh(block_step: jax.Array, refresh_every: int, block: Any = 0,
                  refresh_blocks: int = 1, first: Any = False) -> jax.Array:
    """True at a block's first step and, if refresh_every > 0, at every refresh_every-th step.

    With refresh_blocks k > 1 a block start refreshes only in every k-th block (`block`, the
    block index) or at the decode's `first` step (the cache is empty before it)."""
    refresh = block_step == 0
    if refresh_blocks > 1:
        refresh = refresh & ((block % refresh_blocks == 0) | first)
    if refresh_every > 0:
        refresh = refresh | (block_step % refresh_every == 0)
    return refresh


def usable_cache_keys(mode: str, key_valid: jax.Array, region_start: jax.Array,
                      region_len: int) -> jax.Array:
    """Which cached keys a cached step may attend to, bool `[B, T]`.

    prefix: those before the region; dual: all but the region's own (recomputed) entries.
    """
    idx = jnp.arange(key_valid.shape[1])[None, :]
    if mode == "prefix":
        return key_valid & (idx < region_start)
    inside = (idx >= region_start) & (idx < region_start + region_len)
    return key_valid & ~inside
