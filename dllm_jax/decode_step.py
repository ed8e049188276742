"""The pieces of one denoising step that `decode.generate`'s loop and the server's
block-level decode (`serve/blocks.py`) share: the batch as the model sees it (classifier-free
guidance copies), the block's logits with or without the approximate (Fast-dLLM) cache, the
choice of the next block, and EOS filling.

Shapes: B rows (B2 = 2B under guidance), T = sequence length, C = canvas length (the answer
for bidirectional models; `sequence_layout`), Lb = block length, V = vocabulary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from dllm_jax import models as M
from dllm_jax import speculative as SP
from dllm_jax.cache import KVCache, needs_refresh, region_length, usable_cache_keys
from dllm_jax.config import GenerateConfig, ModelConfig


@struct.dataclass
class Sequence:
    """The batch as the model sees it: `[B2, T]` tokens, positions, key mask, where B2 = 2B
    under classifier-free guidance (conditional rows first, then the masked-prompt copies)."""

    tokens: jax.Array
    positions: jax.Array
    valid: jax.Array


def model_batch(cfg: ModelConfig, gen: GenerateConfig, tokens: jax.Array, positions: jax.Array,
                valid: jax.Array, prompt_region: jax.Array) -> Sequence:
    """The Sequence of `[B, T]` tokens / positions / key mask; under guidance (cfg_scale > 0)
    followed by copies whose prompt tokens (`prompt_region`) are MASK."""
    if gen.cfg_scale > 0:
        uncond = jnp.where(prompt_region, cfg.mask_token_id, tokens)
        return Sequence(jnp.concatenate([tokens, uncond]), jnp.concatenate([positions, positions]),
                        jnp.concatenate([valid, valid]))
    return Sequence(tokens, positions, valid)


def cached_logits(params: Any, cfg: ModelConfig, gen: GenerateConfig, seq: Sequence,
                   cache: KVCache, start: jax.Array, mesh: Any) -> jax.Array:
    """Logits of the block at `start` from a cached step: only the region is recomputed."""
    shift = 1 if cfg.logits_shift else 0
    r = region_length(gen.cache, gen.gen_length, gen.block_length, shift)
    b2, t = seq.tokens.shape
    extra = r - gen.block_length - shift          # the prefix region overhangs the end
    if extra > 0:
        tail_pos = seq.positions[:, -1:] + 1 + jnp.arange(extra, dtype=jnp.int32)[None, :]
        tokens = jnp.concatenate([seq.tokens, jnp.full((b2, extra), cfg.pad_token_id,
                                                       seq.tokens.dtype)], axis=1)
        positions = jnp.concatenate([seq.positions, tail_pos], axis=1)
        valid = jnp.concatenate([seq.valid, jnp.zeros((b2, extra), bool)], axis=1)
    else:
        tokens, positions, valid = seq.tokens, seq.positions, seq.valid
    rs = start - shift
    cut = lambda a: jax.lax.dynamic_slice_in_dim(a, rs, r, axis=1)  # noqa: E731
    usable = usable_cache_keys(gen.cache, seq.valid, rs, r)
    qloc = jnp.broadcast_to(shift + jnp.arange(gen.block_length, dtype=jnp.int32),
                            (b2, gen.block_length))
    return M.apply_cached(params, cfg, cache, cut(tokens), cut(positions), cut(valid),
                          seq.positions, usable, qloc, attn_impl=gen.attn_impl, mesh=mesh)


def answer_refresh(params: Any, cfg: ModelConfig, gen: GenerateConfig, seq: Sequence,
                   cache: KVCache, answer_start: jax.Array, start: jax.Array, mesh: Any
                   ) -> tuple[jax.Array, KVCache]:
    """The cheaper refresh (`refresh_scope="answer"`): one forward over the answer region
    `[answer_start - shift, answer_start + G)` whose queries attend to the cache's prompt
    entries (kept from the decode's first, full refresh) and to the region's own fresh
    keys/values, which are then written into the cache in place (the prompt's stay stale).
    Returns float32 logits `[B2, Lb, V]` of the block at `start` and the updated cache."""
    shift = 1 if cfg.logits_shift else 0
    r = gen.gen_length + shift
    b2, t = seq.tokens.shape
    rs = answer_start - shift
    cut = lambda a: jax.lax.dynamic_slice_in_dim(a, rs, r, axis=1)  # noqa: E731
    usable = seq.valid & (jnp.arange(t)[None, :] < rs)
    qloc = jnp.broadcast_to(start - rs + jnp.arange(gen.block_length, dtype=jnp.int32),
                            (b2, gen.block_length))
    logits, fresh = M.apply_cached(params, cfg, cache, cut(seq.tokens), cut(seq.positions),
                                   cut(seq.valid), seq.positions, usable, qloc,
                                   attn_impl=gen.attn_impl, mesh=mesh, collect_kv=True)
    put = lambda c, n: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), rs, axis=2)  # noqa: E731
    return logits, KVCache(k=put(cache.k, fresh.k), v=put(cache.v, fresh.v))


def block_logits(params: Any, cfg: ModelConfig, gen: GenerateConfig, seq: Sequence,
                  cache: KVCache | None, start: jax.Array, block_step: jax.Array, mesh: Any,
                  refresh: bool = False, *, answer_start: Any = None, block: Any = 0,
                  first: Any = False) -> tuple[jax.Array, KVCache | None]:
    """float32 logits `[B, Lb, V]` of the block starting at sequence index `start`.

    Without a cache: one full forward. With one: a refresh (full forward that also rebuilds
    the cache) at block starts (every `refresh_blocks`-th block's) / every `refresh_every`
    steps (always, with `refresh`), else a cached step. With `refresh_scope="answer"` every
    refresh but the decode's `first` step's is `answer_refresh` (needs `answer_start`, the
    sequence index of the answer's first position).
    """
    b2 = seq.tokens.shape[0]
    qidx = jnp.broadcast_to(start + jnp.arange(gen.block_length, dtype=jnp.int32),
                            (b2, gen.block_length))
    if cache is None:
        logits = M.apply(params, cfg, seq.tokens, seq.positions, seq.valid, qidx,
                         attn_impl=gen.attn_impl, mesh=mesh)
    else:
        def full_refresh(c: KVCache) -> tuple[jax.Array, KVCache]:
            return M.apply_refresh(params, cfg, seq.tokens, seq.positions, seq.valid, qidx,
                                   attn_impl=gen.attn_impl, mesh=mesh, into=c)

        def refresh_fn(c: KVCache) -> tuple[jax.Array, KVCache]:
            if gen.refresh_scope == "full":
                return full_refresh(c)
            if answer_start is None:
                raise ValueError("refresh_scope 'answer' needs answer_start.")
            return jax.lax.cond(first, full_refresh, lambda c: answer_refresh(
                params, cfg, gen, seq, c, answer_start, start, mesh), c)

        def cached(c: KVCache) -> tuple[jax.Array, KVCache]:
            return cached_logits(params, cfg, gen, seq, c, start, mesh), c

        if refresh:
            logits, cache = refresh_fn(cache)
        else:
            logits, cache = jax.lax.cond(
                needs_refresh(block_step, gen.refresh_every, block, gen.refresh_blocks, first),
                refresh_fn, cached, cache)
    # Guidance, and MASK never a candidate: a committed MASK would be decoded again forever.
    return SP.finish_logits(cfg, gen, logits), cache


def next_block(answer: jax.Array, block: jax.Array, mask_id: int, gen: GenerateConfig
                ) -> jax.Array:
    """Index of the first block at or after `block` that still has a MASK in some row."""
    per_block = (answer == mask_id).reshape(answer.shape[0], gen.num_blocks, gen.block_length)
    open_ = per_block.any(axis=(0, 2)) & (jnp.arange(gen.num_blocks) >= block)
    return jnp.where(open_.any(), jnp.argmax(open_), block).astype(jnp.int32)


def fill_after_eos(answer: jax.Array, fix_step: jax.Array, step: jax.Array, mask_id: int,
                    eos_id: int, answer_offset: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """Masked answer positions after a row's first committed EOS become EOS.

    answer, fix_step: `[B, C]` canvas; answer_offset: `[B]` canvas index of each row's first
    answer token (positions before it are the prompt's tail and never count as an EOS)."""
    g = answer.shape[1]
    is_eos = answer == eos_id
    if answer_offset is not None:
        is_eos = is_eos & (jnp.arange(g)[None, :] >= answer_offset[:, None])
    first = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1), g)
    fill = (answer == mask_id) & (jnp.arange(g)[None, :] > first[:, None])
    return jnp.where(fill, eos_id, answer), jnp.where(fill, step, fix_step)


__all__ = ["Sequence", "answer_refresh", "block_logits", "cached_logits", "fill_after_eos", "model_batch",
           "next_block"]
