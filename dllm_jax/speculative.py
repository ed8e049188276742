"""Speculative draft-and-verify decoding (SimSD) inside the compiled loop: the verification
forward and the acceptance rules.

A controller that declares `verify = Verify(order, acceptance)` (see `controllers/simsd.py`)
makes the decode loop run ONE verification forward per step instead of a plain block
forward (only the decode's very first step is plain: there is nothing to verify yet).
Notation for one row: the active block holds Lb positions at sequence indices s .. s+Lb-1;
its n still-masked positions, ranked by the decoding order ("left_to_right": by index;
"confidence": by the drafts' confidence, highest first), are r_0 .. r_{n-1}; d(r_j) is the
pending draft of r_j.

Groups (the reference tokens). Hypothesis g (g = 0 .. Lb-1) is the current sequence with the
drafts of ranks < g written in: d(r_0) .. d(r_{g-1}) at r_0 .. r_{g-1}, MASK at the other
masked positions. A group is a copy, holding hypothesis g, of the tokens the baseline's step
recomputes (the "region"):
  cache "none"    the whole sequence [0, T): every token that can see the block gets the
                  hypothesis' hidden states (exact for bidirectional models);
  cache "dual"    the block [s - shift, s + Lb) (shift = 1 for Dream's shifted logits), then
                  the next block [s + Lb, s + 2Lb) as draft-only copies (below);
  cache "prefix"  [s - shift, s - shift + G + shift): the block and the suffix.
Positions: the copy of sequence index i carries the RoPE position of index i (pos(i), the
row's own position, 0 at its first real token): a reference stands where its original is.
Mask: query (g, i) may attend
  a context key c    iff usable(c) and rule(pos(i), pos(c)). The context is the cache (a
                     cached step) or, at a step where the cache refreshes (every block
                     start), the main sequence computed in the same forward (it attends only
                     to itself, so it IS the refresh and gives the new cache); usable is the
                     cached step's (prefix: valid and before the region; dual: valid and
                     outside the block region); rule is the model's (bidirectional: always;
                     block-causal: pos(c) // block_size <= pos(i) // block_size);
  a reference (h, j) iff h == g, valid(j), rule(pos(i), pos(j)), and j is not draft-only
                     unless i is: its own group only, and the block never sees the draft-only
                     copies (it reads the next block from the cache, as the dual step does).
At a refresh, group 0 is the main sequence itself. Group 0 is then exactly the step the
left-to-right baseline runs now (refresh or cached), and group g exactly the step it runs
after committing d(r_0) .. d(r_{g-1}) (same tokens, positions, cache and mask): each group's
prediction is the baseline's, which makes greedy left-to-right SimSD lossless. With cache
"none" (and refresh_every 1, where every step refreshes) the context is empty and the
groups, which see only themselves, run as extra batch rows (the same mask, block-diagonal).
With refresh_every r >= 2 the loop refreshes at ITS steps r, 2r, ... of a block, which are
not the baseline's (it takes fewer), so the decode is then not token-equal to the baseline.

Drawing: block of 4 (dual cache, bidirectional model) at a block start, all four positions
masked, drafts a b c d, left-to-right order; context columns C: the usable entries of the
cache (a cached step) or of the main sequence (a refresh, as here: group 0's rows are then
the main sequence's own block rows); draft-only copies left out:

                    context      group 0    group 1    group 2    group 3
                   (usable)      M M M M    a M M M    a b M M    a b c M
                                 0 1 2 3    0 1 2 3    0 1 2 3    0 1 2 3  <- block position
    group 0  M pos 0   C C C     # # # #    . . . .    . . . .    . . . .   p_0 verifies a
             M pos 1   C C C     # # # #    . . . .    . . . .    . . . .
             M pos 2   C C C     # # # #    . . . .    . . . .    . . . .
             M pos 3   C C C     # # # #    . . . .    . . . .    . . . .
    group 1  a pos 0   C C C     . . . .    # # # #    . . . .    . . . .
             M pos 1   C C C     . . . .    # # # #    . . . .    . . . .   p_1 verifies b
             M pos 2   C C C     . . . .    # # # #    . . . .    . . . .
             M pos 3   C C C     . . . .    # # # #    . . . .    . . . .
    group 2  a b M M   C C C     . . . .    . . . .    # # # #    . . . .   p_2 (pos 2): c
    group 3  a b c M   C C C     . . . .    . . . .    . . . .    # # # #   p_3 (pos 3): d

(`#` may attend, `.` may not, C = the usable context entries; groups 2 and 3 have four rows
each like groups 0 and 1.) The copies at block positions 0..3 carry RoPE positions
pos(s) .. pos(s + 3) in every group; block-causal models (SDAR) also apply their rule inside
each group.

Reading: p_j, the verified distribution of rank j, is group j's output at r_j (Dream: at
r_j - 1 of the same group). Acceptance, with a = the number of leading ranks accepted:
  greedy    rank j is accepted iff d(r_j) == argmax p_j;
  sampling  rank j is accepted iff u_j < p_j(d(r_j)) / q_j(d(r_j)), u_j ~ U(0, 1), where q_j
            is the distribution d(r_j) was drawn from (speculative ratio min(1, p/q)).
Committed: ranks 0 .. min(a, n-1), i.e. a + 1 tokens (all n when a = n): the accepted drafts
and, at the first rejected rank a, the verifier's own token (greedy: argmax p_a; sampling: a
draw from the residual max(0, p_a - q_a) normalised, or p_a where that is all zero). Its
context is exactly the committed one, so committing it is lossless; with `stop_at_eos` the
run also stops after a committed EOS (the baseline would fill the rest with EOS).

Drafts and NFE: each loop iteration is ONE target forward, counted once in `nfe`. The next
drafts are its own outputs: a still-masked position i reads group min(rank(i), a); when the
step completes the block, the next block's drafts are group min(a, Lb-1)'s outputs there
(the whole-sequence groups and the prefix region hold it; dual adds draft-only copies), so
a block start verifies too. Only the decode's first step is plain (it commits rank 0 and
drafts the rest). A verification processes Lb x region tokens (+ the main sequence at a
refresh). With a draft model every step verifies its drafts, made one per draft-model
forward in decoding order (counted in `DecodeStats.draft_nfe`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dllm_jax import features as F
from dllm_jax.attention import attention_mask
from dllm_jax.cache import KVCache, region_length, usable_cache_keys
from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.models.layers import lm_logits
from dllm_jax.models.transformer import apply_with_references

ORDERS: tuple[str, ...] = ("left_to_right", "confidence")
ACCEPTANCES: tuple[str, ...] = ("auto", "greedy", "sampling")


@dataclasses.dataclass(frozen=True)
class Verify:
    """A controller's declared speculative capability (static; `controller.verify`).

    order: "left_to_right" (by index within the block) or "confidence" (the drafts' own
      confidence, highest first): the decoding order in which drafts are verified.
    acceptance: "greedy" (draft == argmax of the verified prediction), "sampling" (the
      speculative ratio min(1, p / q), residual on rejection) or "auto" (greedy at
      temperature 0, sampling above).
    """

    order: str = "left_to_right"
    acceptance: str = "auto"

    def __post_init__(self) -> None:
        for name, ok in (("order", ORDERS), ("acceptance", ACCEPTANCES)):
            if getattr(self, name) not in ok:
                raise ValueError(f"{name} must be one of {', '.join(ok)}, got "
                                 f"{getattr(self, name)!r}.")

    def rule(self, temperature: float) -> str:
        """"greedy" or "sampling" at this temperature (ValueError when they contradict)."""
        if self.acceptance == "auto":
            return "greedy" if temperature == 0 else "sampling"
        if (self.acceptance == "sampling") != (temperature > 0):
            raise ValueError(
                f"acceptance {self.acceptance} needs "
                f"{'a temperature > 0' if self.acceptance == 'sampling' else 'temperature 0'}"
                f" (got {temperature}); use acceptance auto or change --temperature.")
        return self.acceptance


def n_groups(block_length: int) -> int:
    """Hypotheses (groups) one verification forward holds: Lb."""
    return block_length


def finish_logits(cfg: ModelConfig, gen: GenerateConfig, logits: jax.Array) -> jax.Array:
    """Classifier-free guidance over the leading batch axis (conditional rows first), then
    MASK (and, with logits_eos_inf, EOS) set to -inf: MASK is never a candidate."""
    if gen.cfg_scale > 0:
        b = logits.shape[0] // 2
        cond, unc = logits[:b], logits[b:]
        logits = unc + (gen.cfg_scale + 1.0) * (cond - unc)
    banned = (cfg.mask_token_id, cfg.eos_token_id) if gen.logits_eos_inf else (cfg.mask_token_id,)
    return F.suppress_tokens(logits, banned)


def decoding_rank(order: str, masked: jax.Array, score: jax.Array) -> jax.Array:
    """Rank of each masked position in the decoding order, int32 `[B, Lb]` (0 first);
    positions that are not masked get Lb. "confidence": by `score`, highest first (ties:
    lower index first)."""
    lb = masked.shape[-1]
    if order == "left_to_right":
        rank = jnp.cumsum(masked.astype(jnp.int32), axis=-1) - 1
    else:
        s = jnp.where(masked, score, -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-s, axis=-1, stable=True), axis=-1, stable=True)
    return jnp.where(masked, rank, lb).astype(jnp.int32)


def run_length(flags: jax.Array, rank: jax.Array) -> jax.Array:
    """Per row, the number of leading ranks (0, 1, ...) whose position has `flags` True."""
    b, lb = flags.shape
    by_rank = jnp.zeros((b, lb + 1), bool).at[jnp.arange(b)[:, None], rank].set(flags)
    return jnp.sum(jnp.cumprod(by_rank[:, :lb].astype(jnp.int32), axis=-1), axis=-1,
                   dtype=jnp.int32)


def hypothesis_blocks(block_tokens: jax.Array, drafts: jax.Array, rank: jax.Array,
                      groups: int) -> jax.Array:
    """`[B, groups, Lb]`: group g holds the drafts of ranks < g, the block elsewhere."""
    fill = rank[:, None, :] < jnp.arange(groups)[None, :, None]
    return jnp.where(fill, drafts[:, None, :], block_tokens[:, None, :])


def reference_layout(positions: jax.Array, valid: jax.Array, groups: int, block_size: int,
                     context_positions: jax.Array | None = None,
                     context_usable: jax.Array | None = None,
                     draft_only: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Positions `[B, groups * r]` and mask `[B, groups * r, C + groups * r]` of `groups`
    copies of a region (positions, valid `[B, r]`) after C context keys (module doc);
    draft_only: bool `[r]`, region entries that only draft-only entries may see."""
    b, r = positions.shape
    ref_pos = jnp.tile(positions, (1, groups))
    ref_valid = jnp.tile(valid, (1, groups))
    gid = jnp.repeat(jnp.arange(groups), r)
    pair = gid[:, None] == gid[None, :]
    if draft_only is not None:
        d = jnp.tile(draft_only, groups)
        pair = pair & (d[:, None] | ~d[None, :])
    own = attention_mask(ref_pos, ref_pos, ref_valid, block_size) & pair[None]
    if context_positions is None:
        return ref_pos, own
    ctx = attention_mask(ref_pos, context_positions, context_usable, block_size)
    return ref_pos, jnp.concatenate([ctx, own], axis=-1)


def group_hidden(params: Any, cfg: ModelConfig, gen: GenerateConfig, tokens: jax.Array,
                 positions: jax.Array, valid: jax.Array, cache: KVCache | None,
                 start: jax.Array, hyp: jax.Array, mesh: Any, kind: str = "whole",
                 want_next: bool = False
                 ) -> tuple[jax.Array, jax.Array | None, KVCache | None]:
    """The verification forward.

    tokens, positions, valid: `[B2, T]` the model batch (B2 = 2B under guidance);
    hyp: `[B2, groups, Lb]` the groups' block tokens (`hypothesis_blocks`).
    kind: "whole" (whole-sequence groups as batch rows; with a cache, group 0's keys/values
      become the new cache), "cached" (region groups after the cache) or "refresh" (the main
      sequence and region groups in one forward; the main sequence's keys/values become the
      new cache and it stands for group 0).
    Returns the final hidden states `[B2, groups, Lb, D]` that predict the block's positions
    (Dream: the states one index earlier), the same for the next block when `want_next`
    (else None), and the cache.
    """
    b2, t = tokens.shape
    groups, lb = hyp.shape[1], hyp.shape[2]
    shift = 1 if cfg.logits_shift else 0
    bs = cfg.block_size if cfg.block_causal else 0
    kw = dict(attn_impl=gen.attn_impl, mesh=mesh)
    sl = lambda x, at: jax.lax.dynamic_slice_in_dim(x, at, lb, axis=1)  # noqa: E731
    if kind == "whole":
        toks = jnp.broadcast_to(tokens[:, None, :], (b2, groups, t))
        toks = jax.lax.dynamic_update_slice_in_dim(toks, hyp, start, axis=2).reshape(-1, t)
        pos = jnp.repeat(positions, groups, axis=0)
        mask = attention_mask(pos, pos, jnp.repeat(valid, groups, axis=0), bs)
        x = apply_with_references(params, cfg, toks, pos, mask, collect_kv=cache is not None,
                                  **kw)
        if cache is not None:
            x, kv = x
            cache = jax.tree.map(lambda a: a[:, ::groups].astype(cache.k.dtype), kv)
        grab = lambda at: sl(x, at).reshape(b2, groups, lb, -1)  # noqa: E731
        return grab(start - shift), grab(start + lb - shift) if want_next else None, cache
    r_blk = region_length(gen.cache, gen.gen_length, lb, shift)
    draft_only = gen.cache == "dual" and want_next      # the next block as draft-only copies
    r = r_blk + (lb if draft_only else 0)
    extra = r - lb - shift                              # the region may overhang the end
    ext = [tokens, positions, valid]
    if extra > 0:
        tail = positions[:, -1:] + 1 + jnp.arange(extra, dtype=jnp.int32)[None, :]
        pad = lambda a, v: jnp.concatenate([a, jnp.full((b2, extra), v, a.dtype)], 1)  # noqa: E731
        ext = [pad(tokens, cfg.pad_token_id), jnp.concatenate([positions, tail], axis=1),
               pad(valid, False)]
    rs = start - shift
    reg_tok, reg_pos, reg_val = (jax.lax.dynamic_slice_in_dim(a, rs, r, axis=1) for a in ext)
    region = jnp.broadcast_to(reg_tok[:, None, :], (b2, groups, r))
    region = region.at[:, :, shift:shift + lb].set(hyp).reshape(b2, groups * r)
    usable = usable_cache_keys(gen.cache, valid, rs, r_blk)
    ref_pos, mask = reference_layout(reg_pos, reg_val, groups, bs, positions, usable,
                                     jnp.arange(r) >= r_blk if draft_only else None)
    if kind == "cached":
        x = apply_with_references(params, cfg, region, ref_pos, mask, cache=cache, **kw)
    else:
        per_layer = isinstance(params["layers"], (list, tuple))
        x, kv = apply_with_references(          # per-layer: written into the carried cache
            params, cfg, jnp.concatenate([tokens, region], axis=1),
            jnp.concatenate([positions, ref_pos], axis=1), mask, n_main=t,
            main_mask=attention_mask(positions, positions, valid, bs), collect_kv=True,
            into=cache if per_layer else None, **kw)
        cache = kv if per_layer else jax.tree.map(
            lambda a: a[:, :, :t].astype(cache.k.dtype), kv)
        main, x = x[:, :t], x[:, t:]
    x = x.reshape(b2, groups, r, -1)
    hb, hn = x[:, :, :lb], x[:, :, lb:2 * lb] if want_next else None
    if kind == "refresh":                               # group 0 is the main sequence
        hb = hb.at[:, 0].set(sl(main, start - shift))
        if want_next:
            hn = hn.at[:, 0].set(sl(main, start + lb - shift))
    return hb, hn, cache


def select_logits(params: Any, cfg: ModelConfig, gen: GenerateConfig, hidden: jax.Array,
                  group: jax.Array) -> jax.Array:
    """float32 logits `[B, Lb, V]`: position i read from group `group[b, i]` of `hidden`
    `[B2, groups, Lb, D]` (guidance combined, MASK suppressed)."""
    b2, groups, lb, _ = hidden.shape
    sel = jnp.tile(jnp.clip(group, 0, groups - 1), (b2 // group.shape[0], 1))
    h = hidden[jnp.arange(b2)[:, None], sel, jnp.arange(lb)[None, :]]
    return finish_logits(cfg, gen, lm_logits(cfg, params, h))


def accept(rule: str, rank: jax.Array, masked: jax.Array, drafts: jax.Array,
           logits: jax.Array, draft_logq: jax.Array | None, key: jax.Array,
           temperature: float, eos_id: int = -1) -> tuple[jax.Array, jax.Array]:
    """The acceptance rule (module doc) for one verification.

    Args:
      rank: int32 `[B, Lb]` decoding rank (`decoding_rank`); masked: bool `[B, Lb]`.
      drafts: int32 `[B, Lb]` the drafts d. logits: float32 `[B, Lb, V]` the verified
        prediction of each position (group rank(i) at i).
      draft_logq: `[B, Lb, V]` log q of the drafts' distributions (sampling only).
      temperature: of the target distribution p = softmax(logits / temperature) (sampling).
      eos_id: >= 0 stops the run after a committed EOS (stop_at_eos).
    Returns:
      a: int32 `[B]` leading accepted ranks; tokens: int32 `[B, Lb]`, the token committed
      at ranks 0 .. min(a, n-1) (-1 elsewhere).
    """
    if rule == "greedy":
        verified = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        ok = drafts == verified
    else:
        k_u, k_r = jax.random.split(key)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
        pick = lambda a: jnp.take_along_axis(a, drafts[..., None], axis=-1)[..., 0]  # noqa: E731
        u = jax.random.uniform(k_u, drafts.shape, jnp.float32)
        ok = jnp.log(u) < pick(logp) - pick(draft_logq)
        resid = jnp.maximum(jnp.exp(logp) - jnp.exp(draft_logq), 0.0)
        resid_logits = jnp.where(jnp.sum(resid, axis=-1, keepdims=True) > 0,
                                 jnp.log(resid), logp)
        verified = jax.random.categorical(k_r, resid_logits, axis=-1).astype(jnp.int32)
    ok = ok & masked
    go = ok & (drafts != eos_id) if eos_id >= 0 else ok
    a = run_length(go, rank)
    n = jnp.sum(masked, axis=-1, dtype=jnp.int32)
    last = jnp.minimum(a, n - 1)[:, None]
    tok = jnp.where(rank < a[:, None], drafts, jnp.where(ok, drafts, verified))
    return a, jnp.where(masked & (rank <= last), tok, -1)


__all__ = ["ACCEPTANCES", "ORDERS", "Verify", "accept", "decoding_rank", "finish_logits",
           "group_hidden", "hypothesis_blocks", "n_groups", "reference_layout", "run_length",
           "select_logits"]
