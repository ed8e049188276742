"""Block-by-block decoding of a batch of slots: the device side of continuous batching.

`decode.generate` runs the whole denoising of a batch in ONE compiled `lax.while_loop`, the
block index shared by the batch. A server wants to stop between blocks (to stream what a
block decoded, to let finished rows leave and queued requests take their slots), so here
the same step body runs one block per compiled call and every row (slot) has its OWN block
index, step count and budget:

    slots = empty_slots(cfg, gen, controller, batch=B, width=P, dtype=...)   # all free
    slots = admit(slots, take, ids, valid, controller, cfg=cfg, gen=gen)     # rows in
    slots = run_block(params, slots, controller, cfg=cfg, gen=gen)           # one block
    ... read slots.tokens / fix_step / confidence, admit more, run_block again ...

`run_block` loops over the steps of the current block of every row that still has a MASK
in it (all steps inside one compiled loop; the first step of the call is the block start,
so with a KV cache it is the refresh, which is also how a newly admitted row's prompt is
prefilled), until no row has one; then each row moves to its next block that has a MASK.
A row whose block finished early waits unchanged and uncounted, as in `generate`. Rows
never influence each other (batch axis only), a row starts at its own step 0, block 0,
with a fresh trajectory and controller state, so in float32 a row's tokens and NFE equal
`generate`'s for that prompt alone, wherever it joined (`tests/test_serve_blocks.py`).

The step body is `decode.generate`'s (non-speculative path) with per-row slices; the
PRNG key is split once per loop iteration as there, so a batch whose rows all start
together (the server's batches of a sampling request) draws the same numbers as
`generate` on those rows. Speculative controllers (those that declare `verify`) are not
decoded here (the server decodes them with `generate`).

Shapes: B slots, P prompt width (left-padded), G answer length, T = P + G, Lb block length.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from dllm_jax import features as F
from dllm_jax import models as M
from dllm_jax import speculative as SP
from dllm_jax.cache import KVCache, needs_refresh, region_length, usable_cache_keys
from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.decode_step import Sequence, fill_after_eos, model_batch
from dllm_jax.state import BlockContext, Trajectory


@struct.dataclass
class Slots:
    """The carry of a continuous batch.

    tokens: int32 `[B, T]` prompt (left-padded) then answer (MASK where undecided; a free
      slot holds no MASK, so it never runs). valid / prompt_region: bool `[B, T]` key mask,
      prompt positions. positions: int32 `[B, T]` RoPE positions.
    traj: Trajectory `[B, G]`. block: int32 `[B]` each row's active block.
    masked_at_block_start: int32 `[B]`. nfe, steps: int32 `[B]` forwards and loop steps the
      row took part in (steps: the row's own step count, as `generate` alone would report).
    fix_step: int32 `[B, G]` the row's step that committed each token (-1: not yet).
    confidence: float32 `[B, G]` the committed candidate's confidence at that step (NaN:
      not committed, or filled after EOS).
    controller_state: the controller's, rows on the leading axis. key: PRNG key (split once
    per iteration). iteration: int32 scalar, loop iterations run on this batch.
    cache: KVCache `[L, B(x2 with cfg), T, Hkv, hd]` or None.
    """

    tokens: jax.Array
    valid: jax.Array
    prompt_region: jax.Array
    positions: jax.Array
    traj: Trajectory
    block: jax.Array
    masked_at_block_start: jax.Array
    nfe: jax.Array
    steps: jax.Array
    fix_step: jax.Array
    confidence: jax.Array
    controller_state: Any
    key: jax.Array
    iteration: jax.Array
    cache: Any = None


def supports(controller: Any, block_length: int) -> bool:
    """Whether `controller` decodes here: not speculative, and its state has the rows on
    the leading axis of every leaf (so that one row can be reset)."""
    if controller.verify is not None:
        return False
    leaves = jax.tree.leaves(jax.eval_shape(lambda: controller.init(3, block_length)))
    return all(len(x.shape) > 0 and x.shape[0] == 3 for x in leaves)


def free_token(cfg: ModelConfig) -> int:
    """The id a free slot's answer holds (anything but MASK)."""
    return cfg.eos_token_id if cfg.eos_token_id != cfg.mask_token_id else (
        cfg.mask_token_id + 1) % cfg.vocab_size


def empty_slots(cfg: ModelConfig, gen: GenerateConfig, controller: Any, *, batch: int,
                width: int, dtype: Any, key: jax.Array | None = None) -> Slots:
    """B free slots of prompt width P = `width` (each holds one valid token and a finished
    answer, so no step runs on it). dtype: the KV cache's (the params')."""
    return _empty(controller, jax.random.key(0) if key is None else key, cfg=cfg, gen=gen,
                  batch=batch, width=width, dtype=jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "gen", "batch", "width", "dtype"))
def _empty(controller: Any, key: jax.Array, *, cfg: ModelConfig, gen: GenerateConfig,
           batch: int, width: int, dtype: Any) -> Slots:
    # one compiled call, so that every leaf is its own buffer (the others donate them)
    b, p, g = batch, width, gen.gen_length
    t = p + g
    tokens = jnp.full((b, t), free_token(cfg), jnp.int32)
    valid = jnp.zeros((b, t), bool).at[:, p - 1:].set(True)
    cache = None
    if gen.cache != "none":
        cache = KVCache.zeros(cfg.num_layers, 2 * b if gen.cfg_scale > 0 else b, t,
                              cfg.num_kv_heads, cfg.head_dim, dtype)
    return Slots(tokens=tokens, valid=valid, prompt_region=valid.at[:, p:].set(False),
                 positions=M.default_positions(valid), traj=Trajectory.zeros(b, g),
                 block=jnp.zeros((b,), jnp.int32),
                 masked_at_block_start=jnp.zeros((b,), jnp.int32),
                 nfe=jnp.zeros((b,), jnp.int32), steps=jnp.zeros((b,), jnp.int32),
                 fix_step=jnp.full((b, g), -1, jnp.int32),
                 confidence=jnp.full((b, g), jnp.nan, jnp.float32),
                 controller_state=controller.init(b, gen.block_length),
                 key=key, iteration=jnp.int32(0),
                 cache=cache)


@functools.partial(jax.jit, static_argnames=("cfg", "gen"), donate_argnums=(0,))
def admit(slots: Slots, take: jax.Array, ids: jax.Array, valid: jax.Array, controller: Any,
          *, cfg: ModelConfig, gen: GenerateConfig) -> Slots:
    """Slots with the rows where `take` (bool `[B]`) is True started afresh on prompt
    `ids` / `valid` (int32 / bool `[B, P]`, left-padded; other rows' values are ignored).
    The cache rows are left alone: the row's first step (a block start) refreshes them."""
    b = ids.shape[0]
    g, lb = gen.gen_length, gen.block_length
    full_valid = jnp.concatenate([valid, jnp.ones((b, g), bool)], axis=1)
    fresh = dict(
        tokens=jnp.concatenate([ids, jnp.full((b, g), cfg.mask_token_id, jnp.int32)], axis=1),
        valid=full_valid,
        prompt_region=jnp.concatenate([valid, jnp.zeros((b, g), bool)], axis=1),
        positions=M.default_positions(full_valid), traj=Trajectory.zeros(b, g),
        block=jnp.zeros((b,), jnp.int32), masked_at_block_start=jnp.full((b,), lb, jnp.int32),
        nfe=jnp.zeros((b,), jnp.int32), steps=jnp.zeros((b,), jnp.int32),
        fix_step=jnp.full((b, g), -1, jnp.int32),
        confidence=jnp.full((b, g), jnp.nan, jnp.float32),
        controller_state=controller.init(b, lb))

    def pick(new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(take.reshape((b,) + (1,) * (old.ndim - 1)), new, old)

    return slots.replace(**{k: jax.tree.map(pick, v, getattr(slots, k))
                            for k, v in fresh.items()})


@functools.partial(jax.jit, static_argnames=("cfg", "gen"), donate_argnums=(0,))
def release(slots: Slots, drop: jax.Array, *, cfg: ModelConfig, gen: GenerateConfig) -> Slots:
    """Slots with the rows where `drop` (bool `[B]`) is True made free (their answers
    filled, so they stop at once)."""
    p = slots.tokens.shape[1] - gen.gen_length
    answer = jnp.where(drop[:, None], free_token(cfg), slots.tokens[:, p:])
    return slots.replace(tokens=slots.tokens.at[:, p:].set(answer))


# ----------------------------------------------------------------------------- per-row slices
def _rows_slice(a: jax.Array, start: jax.Array, size: int) -> jax.Array:
    """`a[r, start[r] : start[r] + size]` for every row r (trailing axes kept)."""
    return jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, size, axis=0))(a, start)


def _rows_update(a: jax.Array, upd: jax.Array, start: jax.Array) -> jax.Array:
    return jax.vmap(lambda x, u, s: jax.lax.dynamic_update_slice_in_dim(x, u, s, axis=0))(
        a, upd, start)


def _twice(x: jax.Array, gen: GenerateConfig) -> jax.Array:
    """Per-row values for the model batch (classifier-free guidance doubles the rows)."""
    return jnp.concatenate([x, x]) if gen.cfg_scale > 0 else x


def _block_logits(params: Any, cfg: ModelConfig, gen: GenerateConfig, seq: Sequence,
                  cache: KVCache | None, start: jax.Array, block_step: jax.Array, mesh: Any
                  ) -> tuple[jax.Array, KVCache | None]:
    """`decode_step.block_logits` with a block start per row (`start`: int32 `[B]` sequence
    indices): float32 logits `[B, Lb, V]` and the (refreshed) cache."""
    lb = gen.block_length
    start = _twice(start, gen)
    qidx = start[:, None] + jnp.arange(lb, dtype=jnp.int32)[None, :]
    if cache is None:
        logits = M.apply(params, cfg, seq.tokens, seq.positions, seq.valid, qidx,
                         attn_impl=gen.attn_impl, mesh=mesh)
        return SP.finish_logits(cfg, gen, logits), None

    def refresh_fn(c: KVCache) -> tuple[jax.Array, KVCache]:
        return M.apply_refresh(params, cfg, seq.tokens, seq.positions, seq.valid, qidx,
                               attn_impl=gen.attn_impl, mesh=mesh, into=c)

    def cached(c: KVCache) -> tuple[jax.Array, KVCache]:
        shift = 1 if cfg.logits_shift else 0
        r = region_length(gen.cache, gen.gen_length, lb, shift)
        b2 = seq.tokens.shape[0]
        extra = r - lb - shift                  # the prefix region overhangs the end
        tokens, positions, valid = seq.tokens, seq.positions, seq.valid
        if extra > 0:
            tail = seq.positions[:, -1:] + 1 + jnp.arange(extra, dtype=jnp.int32)[None, :]
            tokens = jnp.concatenate([tokens, jnp.full((b2, extra), cfg.pad_token_id,
                                                       tokens.dtype)], axis=1)
            positions = jnp.concatenate([positions, tail], axis=1)
            valid = jnp.concatenate([valid, jnp.zeros((b2, extra), bool)], axis=1)
        rs = start - shift
        usable = usable_cache_keys(gen.cache, seq.valid, rs[:, None], r)
        qloc = jnp.broadcast_to(shift + jnp.arange(lb, dtype=jnp.int32), (b2, lb))
        return M.apply_cached(params, cfg, c, _rows_slice(tokens, rs, r),
                              _rows_slice(positions, rs, r), _rows_slice(valid, rs, r),
                              seq.positions, usable, qloc, attn_impl=gen.attn_impl,
                              mesh=mesh), c

    logits, cache = jax.lax.cond(needs_refresh(block_step, gen.refresh_every), refresh_fn,
                                 cached, cache)
    return SP.finish_logits(cfg, gen, logits), cache


@functools.partial(jax.jit, static_argnames=("cfg", "gen", "mesh"), donate_argnums=(1,))
def run_block(params: Any, slots: Slots, controller: Any, *, cfg: ModelConfig,
              gen: GenerateConfig, mesh: Any = None) -> Slots:
    """Decode the current block of every row that has a MASK in it (one compiled loop over
    its steps), then move each row to its next block with a MASK. Returns the new Slots."""
    b, t = slots.tokens.shape
    g, lb, mask_id = gen.gen_length, gen.block_length, cfg.mask_token_id
    p = t - g
    ce_filter = controller.trajectory_filter
    low_conf_ids: tuple[int, ...] = ()
    if gen.confidence_eos_eot_inf:
        low_conf_ids = tuple(i for i in (cfg.eos_token_id, cfg.eot_token_id) if i >= 0)
    # Each row's block is fixed for the call: its trajectory window is cut once (and
    # written back once, after the loop); per-step writes are selects through `spread`,
    # not per-row scatters (slow on some backends).
    a0 = slots.block * lb                                        # [B] answer index
    col = jnp.arange(g, dtype=jnp.int32)[None, :] - a0[:, None]  # [B, G]
    in_block = (col >= 0) & (col < lb)
    col = jnp.clip(col, 0, lb - 1)

    def spread(x: jax.Array) -> jax.Array:
        """`[B, Lb]` block values at their answer positions `[B, G]` (junk outside)."""
        return jnp.take_along_axis(x, col, axis=1)

    def block_of(tokens: jax.Array) -> jax.Array:
        return _rows_slice(tokens, p + a0, lb)

    def active_rows(tokens: jax.Array, steps: jax.Array) -> jax.Array:
        return jnp.any(block_of(tokens) == mask_id, axis=1) & (steps < gen.max_steps)

    def cond(carry: tuple[Slots, Trajectory, jax.Array]) -> jax.Array:
        st = carry[0]
        return jnp.any(active_rows(st.tokens, st.steps))

    def body(carry: tuple[Slots, Trajectory, jax.Array]
             ) -> tuple[Slots, Trajectory, jax.Array]:
        st, window, block_step = carry
        key, k_obs, k_ctl, _, _ = jax.random.split(st.key, 5)   # as decode.generate's
        block_tokens = block_of(st.tokens)
        active = active_rows(st.tokens, st.steps)
        seq = model_batch(cfg, gen, st.tokens, st.positions, st.valid, st.prompt_region)
        logits, cache = _block_logits(params, cfg, gen, seq, st.cache, p + a0, block_step,
                                      mesh)
        feats = F.observe(logits, block_tokens, mask_id, k_obs, gen.temperature,
                          controller.sampler, low_conf_ids)
        win = F.update_trajectory(window, feats, gen.momentum_beta, ce_filter)
        ctx = BlockContext(step=st.iteration, block_step=block_step, block=st.block,
                           masked_at_block_start=st.masked_at_block_start, active=active,
                           key=k_ctl, steps_per_block=gen.steps_per_block)
        commit, cstate = controller.decide(feats, win, ctx, st.controller_state)
        commit = commit & feats.masked & active[:, None]
        wrote = in_block & spread(commit)                         # [B, G]
        answer = jnp.where(wrote, spread(feats.candidate), st.tokens[:, p:])
        row_step = st.steps[:, None]
        fix_step = jnp.where(wrote, row_step, st.fix_step)
        confidence = jnp.where(wrote, spread(feats.confidence), st.confidence)
        if gen.stop_at_eos:
            answer, fix_step = fill_after_eos(answer, fix_step, row_step, mask_id,
                                               cfg.eos_token_id)
        tokens = jnp.concatenate([st.tokens[:, :p], answer], axis=1)
        st = st.replace(tokens=tokens, nfe=st.nfe + active, steps=st.steps + active,
                        fix_step=fix_step, confidence=confidence, controller_state=cstate,
                        key=key, iteration=st.iteration + 1, cache=cache)
        return st, win, block_step + 1

    window0 = jax.tree.map(lambda a: _rows_slice(a, a0, lb), slots.traj)
    st, window, _ = jax.lax.while_loop(cond, body, (slots, window0, jnp.int32(0)))
    st = st.replace(traj=jax.tree.map(lambda a, w: _rows_update(a, w, a0), st.traj, window))
    nb = gen.num_blocks
    per_block = (st.tokens[:, p:] == mask_id).reshape(b, nb, lb)
    open_ = per_block.any(axis=2) & (jnp.arange(nb)[None, :] >= st.block[:, None])
    nxt = jnp.where(open_.any(axis=1), jnp.argmax(open_, axis=1), st.block).astype(jnp.int32)
    masked = jnp.take_along_axis(per_block.sum(axis=2, dtype=jnp.int32), nxt[:, None], 1)[:, 0]
    return st.replace(block=nxt, masked_at_block_start=jnp.where(
        nxt != st.block, masked, st.masked_at_block_start))


def finished(tokens: Any, steps: Any, gen: GenerateConfig, mask_id: int) -> Any:
    """Host side: bool `[B]`, rows with no MASK left in answers `tokens` `[B, G]` (numpy)
    or out of step budget."""
    return ~(tokens == mask_id).any(axis=1) | (steps >= gen.max_steps)


__all__ = ["Slots", "admit", "empty_slots", "finished", "free_token", "release", "run_block",
           "supports"]
