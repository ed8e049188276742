"""One speculative step of the decode loop (SimSD): where the drafts come from (the previous
step's outputs, or a draft model), the verification forward with its acceptance
(`dllm_jax/speculative.py` states the mask, positions and rules), and the next drafts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dllm_jax.cache import KVCache, needs_refresh
from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.models.transformer import apply
from dllm_jax.speculative import (Verify, accept, decoding_rank, finish_logits, group_hidden,
                                  hypothesis_blocks, n_groups, select_logits)
from dllm_jax.state import Drafts, Features


def model_drafts(draft_params: Any, draft_cfg: ModelConfig, gen: GenerateConfig, order: str,
                 rule: str, tokens: jax.Array, positions: jax.Array, valid: jax.Array,
                 start: jax.Array, key: jax.Array, mesh: Any
                 ) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array]:
    """Drafts of a second model, one masked position per draft-model forward in decoding
    order (LTR: leftmost; confidence: the draft model's most confident), until every masked
    position of the block has one.

    Returns drafts `[B, Lb]`, their log q `[B, Lb, V]` (sampling; else None), the decoding
    rank `[B, Lb]` and the draft forwards each row needed `[B]` (its masked count).
    """
    b, lb = tokens.shape[0], gen.block_length
    block = jax.lax.dynamic_slice_in_dim(tokens, start, lb, axis=1)
    masked = block == draft_cfg.mask_token_id
    qidx = jnp.broadcast_to(start + jnp.arange(lb, dtype=jnp.int32), (b, lb))
    sampling = rule == "sampling"
    v = draft_cfg.vocab_size
    init = (tokens, jnp.zeros((b, lb), bool), jnp.full((b, lb), lb, jnp.int32),
            jnp.zeros((b, lb, v), jnp.float32) if sampling else None, jnp.int32(0), key)

    def cond(c: Any) -> jax.Array:
        return jnp.any(masked & ~c[1])

    def body(c: Any) -> Any:
        toks, done, rank, logq, j, k = c
        k, k_s = jax.random.split(k)
        logits = finish_logits(draft_cfg, dataclasses.replace(gen, cfg_scale=0.0), apply(
            draft_params, draft_cfg, toks, positions, valid, qidx, attn_impl=gen.attn_impl,
            mesh=mesh))
        if sampling:
            lq = jax.nn.log_softmax(logits / gen.temperature, axis=-1)
            cand = jax.random.categorical(k_s, lq, axis=-1).astype(jnp.int32)
        else:
            lq = jax.nn.log_softmax(logits, axis=-1)
            cand = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        open_ = masked & ~done
        conf = jnp.take_along_axis(lq, cand[..., None], axis=-1)[..., 0]
        pick = (decoding_rank(order, open_, conf) == 0) & open_
        blk = jax.lax.dynamic_slice_in_dim(toks, start, lb, axis=1)
        toks = jax.lax.dynamic_update_slice_in_dim(toks, jnp.where(pick, cand, blk), start, 1)
        if sampling:
            logq = jnp.where(pick[..., None], lq, logq)
        return toks, done | pick, jnp.where(pick, j, rank), logq, j + 1, k

    toks, _, rank, logq, _, _ = jax.lax.while_loop(cond, body, init)
    drafts = jax.lax.dynamic_slice_in_dim(toks, start, lb, axis=1)
    return drafts, logq, rank, jnp.sum(masked, axis=-1, dtype=jnp.int32)


def verify_logits(params: Any, cfg: ModelConfig, gen: GenerateConfig, spec: Verify,
                  tokens: jax.Array, positions: jax.Array, valid: jax.Array,
                  cache: KVCache | None, start: jax.Array, block_tokens: jax.Array,
                  drafts: Drafts | None, key: jax.Array, mesh: Any,
                  draft: tuple[Any, ModelConfig] | None = None, kind: str = "whole"
                  ) -> tuple[Any, ...]:
    """One verification step's forward and acceptance.

    tokens, positions, valid: the model batch `[B2, T]` (conditional rows first); drafts:
    the pending self-drafts (None with a draft model `draft = (params, cfg)`); kind: see
    `group_hidden`.
    Returns (logits `[B, Lb, V]` = group min(rank(i), a) at i, the next block's logits from
    group min(a, Lb-1) (self-drafting with more blocks, else None), a `[B]`, committed
    tokens `[B, Lb]` (-1 where not committed), rank `[B, Lb]`, draft forwards `[B]`, cache).
    """
    b, lb = block_tokens.shape
    rule = spec.rule(gen.temperature)
    masked = block_tokens == cfg.mask_token_id
    k_draft, k_acc = jax.random.split(key)
    if draft is None:
        d_tok, d_logq = drafts.token, drafts.logq
        rank = decoding_rank(spec.order, masked, drafts.score)
        n_draft = jnp.zeros((b,), jnp.int32)
    else:
        d_tok, d_logq, rank, n_draft = model_drafts(
            draft[0], draft[1], gen, spec.order, rule, tokens[:b], positions[:b], valid[:b],
            start, k_draft, mesh)
    hyp = hypothesis_blocks(block_tokens, d_tok, rank, n_groups(lb))
    hyp = jnp.tile(hyp, (tokens.shape[0] // b, 1, 1))
    want_next = draft is None and gen.num_blocks > 1
    hb, hn, cache = group_hidden(params, cfg, gen, tokens, positions, valid, cache, start, hyp,
                                 mesh, kind, want_next)
    eos = cfg.eos_token_id if gen.stop_at_eos else -1
    a, tok = accept(rule, rank, masked, d_tok, select_logits(params, cfg, gen, hb, rank),
                    d_logq, k_acc, gen.temperature, eos)
    logits = select_logits(params, cfg, gen, hb, jnp.minimum(rank, a[:, None]))
    nxt = None if hn is None else select_logits(params, cfg, gen, hn,
                                                jnp.broadcast_to(a[:, None], (b, lb)))
    return logits, nxt, a, tok, rank, n_draft, cache


def next_drafts(feats: Features, logits: jax.Array, rule: str, temperature: float) -> Drafts:
    """The pending drafts for the next step: a step's candidates, their confidence (the
    confidence order) and, for sampling, the log q they were drawn from."""
    logq = None
    if rule == "sampling":
        logq = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return Drafts(token=feats.candidate, score=feats.confidence, logq=logq)


def where_rows(pick: jax.Array, a: Any, b: Any) -> Any:
    """Per row (`pick [B]`), the pytree `a` where True, else `b`."""
    return jax.tree.map(
        lambda x, y: jnp.where(pick.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b)


def speculative_step(gen: GenerateConfig, plain: Callable[[Any], Any],
                     verify: Callable[[Any, str], Any], first: jax.Array | bool,
                     block_step: jax.Array, cache: Any) -> tuple[Any, ...]:
    """`plain(cache)` at the decode's first step (`first`; nothing to verify yet), else
    `verify(cache, kind)` (`verify_logits`): kind "whole" without a cache or with
    refresh_every 1, "refresh" where the cache refreshes (block starts, every
    refresh_every-th step), else "cached". All return (logits, next-block logits, a, tokens,
    rank, draft forwards, cache)."""
    if gen.block_length == 1:
        return plain(cache)
    later = lambda c: verify(c, "whole")  # noqa: E731
    if cache is not None and gen.refresh_every != 1:
        def later(c: Any) -> tuple[Any, ...]:
            return jax.lax.cond(needs_refresh(block_step, gen.refresh_every),
                                lambda c: verify(c, "refresh"), lambda c: verify(c, "cached"), c)
    if first is False:
        return later(cache)
    return jax.lax.cond(first, plain, later, cache)


__all__ = ["model_drafts", "next_drafts", "speculative_step", "verify_logits", "where_rows"]
