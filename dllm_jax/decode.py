"""`generate`: the whole decode of a batch as ONE jit-compiled `lax.while_loop`.

Each loop iteration is one denoising step of the active block:
  1. logits of the active block only `[B, Lb, V]` (classifier-free guidance folds a masked-
     prompt copy into the same forward),
  2. `features.observe` -> candidates, confidence, entropy, margin; trajectory update
     (with the CE filter when the controller declares a `trajectory_filter`),
  3. `controller.decide` -> commit mask `[B, Lb]`,
  4. write committed tokens, record the step that fixed them, count NFE,
  5. when no row has a MASK left in the block, move to the next block that has one.
A controller that declares `verify` (a `speculative.Verify`: decoding order and acceptance
rule; None for the others) makes the loop speculative (SimSD, `dllm_jax/speculative.py`):
every step but the decode's first (a plain forward that commits the first position in
decoding order and drafts the others) is ONE verification forward over copies of the block
holding the drafts, whose acceptance rule gives the run to commit (`ctx.accepted`; the
controller may commit a prefix of it) and whose outputs are the next drafts (the next
block's, when the step completes the block). Still one forward per iteration, counted once.
Blocks advance in lockstep over the batch (as in LLaDA / Fast-dLLM); a row that has finished
the block waits without changing and without counting forwards, so a row's result never
depends on the others.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dllm_jax import block_causal_cache as BCC
from dllm_jax import decode_step as DS
from dllm_jax import features as F
from dllm_jax import sequence_layout as L
from dllm_jax import sharding as S
from dllm_jax import speculative as SP
from dllm_jax import speculative_step as SPS
from dllm_jax.cache import KVCache
from dllm_jax.config import ConfigError, GenerateConfig, ModelConfig
from dllm_jax.prompt_checks import prompt_problem
from dllm_jax.state import BlockContext, DecodeState, DecodeStats, Drafts, Trajectory

# Per-step trace buffers `[S, B, Lb]` (GenerateConfig.trace): the Features fields + commits.
TRACE_FIELDS: dict[str, Any] = {"candidate": jnp.int32, "confidence": jnp.float32,
                                "entropy": jnp.float32, "margin": jnp.float32,
                                "masked": jnp.bool_, "commit": jnp.bool_}


@struct.dataclass
class GenerateOutput:
    """tokens: int32 `[B, G]` answers; stats: DecodeStats."""

    tokens: jax.Array
    stats: DecodeStats


class GenerateError(ValueError):
    """Bad input to `generate`; the message names the problem and the fix."""


def _validate_speculative(model_cfg: ModelConfig, gen_cfg: GenerateConfig, controller: Any,
                          total: int, draft_params: Any, draft_cfg: Any) -> None:
    name = type(controller).__name__
    if controller.verify is None:
        if draft_params is not None or draft_cfg is not None:
            raise GenerateError(f"a draft model is only used by a speculative controller (one "
                                f"that declares verify, e.g. simsd), not by {name}.")
        return
    try:
        controller.verify.rule(gen_cfg.temperature)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    if (draft_params is None) != (draft_cfg is None):
        raise GenerateError("a draft model needs both draft_params and draft_cfg.")
    if draft_cfg is not None:
        if (draft_cfg.vocab_size, draft_cfg.mask_token_id) != (model_cfg.vocab_size,
                                                                model_cfg.mask_token_id):
            raise GenerateError(
                f"the draft model must share the target's tokenizer: vocabulary "
                f"{draft_cfg.vocab_size} / MASK {draft_cfg.mask_token_id} vs "
                f"{model_cfg.vocab_size} / {model_cfg.mask_token_id}.")
        if total > draft_cfg.max_position:
            raise GenerateError(f"prompt + answer = {total} tokens exceeds the draft model's "
                                f"maximum length {draft_cfg.max_position}.")


def _validate(model_cfg: ModelConfig, prompt: Any, prompt_valid: Any,
              gen_cfg: GenerateConfig, controller: Any, draft_params: Any = None,
              draft_cfg: Any = None) -> tuple[np.ndarray, np.ndarray]:
    if model_cfg.arch == "diffusion_gemma":
        raise GenerateError("DiffusionGemma denoises a canvas of random tokens, not MASKs, and "
                            "decodes with dllm_jax.canvas_decode.decode_canvas (what "
                            "session.generate and the CLIs call for it, with --controller "
                            "entropy_bound); decode.generate serves llada / dream / sdar models.")
    prompt = np.asarray(prompt)
    if prompt.ndim == 1:
        prompt = prompt[None]
    valid = np.ones(prompt.shape, bool) if prompt_valid is None else np.asarray(prompt_valid, bool)
    problem = prompt_problem(prompt, valid, model_cfg, gen_cfg.gen_length)
    if problem is not None:
        raise GenerateError(problem)
    total = prompt.shape[1] + gen_cfg.gen_length
    if model_cfg.block_causal:
        need = L.max_position_needed(model_cfg, gen_cfg, prompt.shape[1])
        if need > model_cfg.max_position:
            raise GenerateError(
                f"a block-causal model decodes whole blocks of {gen_cfg.block_length}: prompt "
                f"({prompt.shape[1]}) + answer ({gen_cfg.gen_length}) rounded up to {need} "
                f"positions exceeds the model's maximum length {model_cfg.max_position}; "
                f"shorten the prompt or --gen-length.")
        if gen_cfg.cache != "none" and gen_cfg.refresh_every > 0 and controller.verify is None:
            raise GenerateError(
                "a block-causal model's cache is exact (each finished block's keys/values are "
                "stored once), so there is nothing to refresh: drop --refresh-every "
                f"(got {gen_cfg.refresh_every}).")
    cheaper = gen_cfg.refresh_scope != "full" or gen_cfg.refresh_blocks != 1
    if cheaper and (model_cfg.block_causal or getattr(controller, "verify", None) is not None):
        raise GenerateError(
            "--refresh-scope / --refresh-blocks change Fast-dLLM's approximate cache of "
            "bidirectional models; " + ("a block-causal model's cache is exact" if
                                        model_cfg.block_causal else
                                        "the speculative loop refreshes at every block start")
            + ": leave them at their defaults (full, 1).")
    if not all(hasattr(controller, a)
               for a in ("init", "decide", "sampler", "trajectory_filter", "verify")):
        raise GenerateError(
            f"{type(controller).__name__} is not a controller (needs init, decide, sampler, "
            f"trajectory_filter and verify); build one with controllers.make_controller(name).")
    _validate_speculative(model_cfg, gen_cfg, controller, total, draft_params, draft_cfg)
    return prompt.astype(np.int32), valid


def _is_global(x: Any) -> bool:
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _host_rows(x: Any) -> Any:
    """A prompt array spread over several processes: the rows this process holds (what it
    can check); anything else unchanged."""
    return np.asarray(x.addressable_data(0)) if _is_global(x) else x


def generate(
    params: Any,
    model_cfg: ModelConfig,
    prompt: Any,
    gen_cfg: GenerateConfig,
    controller: Any,
    *,
    prompt_valid: Any = None,
    key: jax.Array | None = None,
    mesh: Any = None,
    draft_params: Any = None,
    draft_cfg: ModelConfig | None = None,
) -> GenerateOutput:
    """Decode answers for a batch of (left-padded) prompts.

    Args:
      params: model params (see `model.py`).
      model_cfg: the model's config.
      prompt: int `[B, P]` token ids, left-padded; a 1-D array is one row. On a mesh over
        several processes, a global array fed per process (`multihost.feed`), as is
        `prompt_valid`.
      gen_cfg: static decode settings.
      controller: a Controller (see `controllers.make_controller`).
      prompt_valid: bool `[B, P]`, False on padding; None means no padding.
      key: PRNG key for sampling and random controllers (default key 0).
      mesh: a `jax.sharding.Mesh` from `sharding.make_mesh` (e.g. "data=2,model=2,seq=2"):
        params, prompt, loop carry and KV cache are laid out by the rules in `sharding.py`
        and the model's attention runs sequence-parallel when seq > 1 (the mesh is passed
        down explicitly). None: one device (unchanged).
      draft_params, draft_cfg: a smaller model with the target's tokenizer that drafts for
        a speculative controller (`controller.verify`), instead of self-drafting.
    Returns:
      GenerateOutput with tokens `[B, gen_length]` and DecodeStats.
    """
    fed = _is_global(prompt)    # rows fed per process (dllm_jax.multihost): checked here
    checked = _validate(model_cfg, _host_rows(prompt), _host_rows(prompt_valid), gen_cfg,
                        controller, draft_params, draft_cfg)
    prompt, valid = (prompt, prompt_valid) if fed else checked
    if fed and (mesh is None or prompt_valid is None):
        raise GenerateError("a prompt spread over several processes needs its mesh and "
                            "prompt_valid (see dllm_jax.multihost.feed).")
    if key is None:
        key = jax.random.key(0)
    if mesh is not None:
        args = S.place_generate_inputs(mesh, params, prompt, valid, key, controller)
        if draft_params is not None:
            draft_params = S.shard_params(draft_params, mesh)
        return _generate_jit(*args, draft_params, model_cfg=model_cfg, gen_cfg=gen_cfg,
                             mesh=mesh, draft_cfg=draft_cfg)
    return _generate_jit(params, jnp.asarray(prompt), jnp.asarray(valid), key, controller,
                         draft_params, model_cfg=model_cfg, gen_cfg=gen_cfg,
                         draft_cfg=draft_cfg)


def _speculative_logits(params: Any, cfg: ModelConfig, gen: GenerateConfig, spec: SP.Verify,
                        seq: DS.Sequence, st: DecodeState, start: jax.Array,
                        block_tokens: jax.Array, key: jax.Array, mesh: Any,
                        draft: tuple[Any, ModelConfig] | None) -> tuple[Any, ...]:
    """(logits, next-block logits, a, committed tokens, rank, draft forwards, cache) of a
    speculative step: a plain block forward at the decode's first step when self-drafting
    (nothing to verify yet), else a verification forward."""
    b, lb = block_tokens.shape

    def plain(c: Any) -> tuple[Any, ...]:
        logits, c = DS.block_logits(params, cfg, gen, seq, c, start, st.block_step, mesh, True)
        none, zero = jnp.full((b, lb), -1, jnp.int32), jnp.zeros((b,), jnp.int32)
        nxt = jnp.zeros_like(logits) if gen.num_blocks > 1 else None
        return logits, nxt, zero, none, none, zero, c

    def verify(c: Any, kind: str) -> tuple[Any, ...]:
        return SPS.verify_logits(params, cfg, gen, spec, seq.tokens, seq.positions, seq.valid,
                                c, start, block_tokens, st.drafts, key, mesh, draft, kind)

    first = st.stats.steps == 0 if draft is None else False
    return SPS.speculative_step(gen, plain, verify, first, st.block_step, st.cache)


@functools.partial(jax.jit, static_argnames=("model_cfg", "gen_cfg", "mesh", "draft_cfg"))
def _generate_jit(params: Any, prompt: jax.Array, prompt_valid: jax.Array, key: jax.Array,
                  controller: Any, draft_params: Any = None, *, model_cfg: ModelConfig,
                  gen_cfg: GenerateConfig, mesh: Any = None,
                  draft_cfg: ModelConfig | None = None) -> GenerateOutput:
    cfg = model_cfg
    if cfg.block_causal:        # the mask's blocks are the decode's, as in SDAR's generate
        cfg = cfg.replace(block_size=gen_cfg.block_length)
        if draft_cfg is not None and draft_cfg.block_causal:
            draft_cfg = draft_cfg.replace(block_size=gen_cfg.block_length)
    # The canvas the loop decodes (sequence_layout): the answer, or for block-causal models
    # whole blocks aligned to absolute positions; `gen` is `gen_cfg` over that canvas.
    layout = L.make_layout(cfg, gen_cfg, prompt, prompt_valid)
    gen = L.canvas_config(cfg, gen_cfg)
    b = prompt.shape[0]
    p, g, lb, mask_id = layout.start, layout.length, gen.block_length, cfg.mask_token_id
    tokens0, valid, positions = layout.tokens, layout.valid, layout.positions
    prompt_region = layout.prompt_region
    # A controller that reads the CE filter state declares its (static) settings as
    # `trajectory_filter`; the others declare None and the filter fields stay untouched.
    ce_filter = controller.trajectory_filter
    # A speculative controller declares its decoding order and acceptance rule as `verify`.
    spec = controller.verify
    rule = None if spec is None else spec.rule(gen.temperature)
    draft = None if draft_cfg is None else (draft_params, draft_cfg)
    # Block-causal models (no logit shift) keep an exact cache (block_causal_cache); the
    # speculative loop keeps its refresh at block starts, which is exact there too.
    exact = cfg.block_causal and not cfg.logits_shift and gen.cache != "none" and spec is None
    b2 = 2 * b if gen.cfg_scale > 0 else b
    if exact:
        seq0 = DS.model_batch(cfg, gen, tokens0, positions, valid, prompt_region)
        cache0 = BCC.prefill(params, cfg, gen, seq0.tokens, seq0.positions, seq0.valid, p, mesh)
    elif gen.cache != "none":
        cache0 = KVCache.zeros(cfg.num_layers, b2, p + g, cfg.num_kv_heads, cfg.head_dim,
                               params["embed"].dtype)
    else:
        cache0 = None
    drafts0 = None
    if spec is not None and draft is None:
        drafts0 = Drafts(token=jnp.full((b, lb), -1, jnp.int32),
                         score=jnp.zeros((b, lb), jnp.float32),
                         logq=jnp.zeros((b, lb, cfg.vocab_size), jnp.float32)
                         if rule == "sampling" else None)
    low_conf_ids: tuple[int, ...] = ()
    if gen.confidence_eos_eot_inf:
        low_conf_ids = tuple(i for i in (cfg.eos_token_id, cfg.eot_token_id) if i >= 0)

    trace = None
    if gen.trace:
        s = gen.max_steps
        trace = {name: jnp.zeros((s, b, lb), dtype) for name, dtype in TRACE_FIELDS.items()}
        trace["block"] = jnp.full((s,), -1, jnp.int32)
    state = DecodeState(
        tokens=tokens0,
        traj=Trajectory.zeros(b, g),
        block=jnp.int32(0),
        block_step=jnp.int32(0),
        masked_at_block_start=jnp.full((b,), lb, jnp.int32),
        stats=DecodeStats(nfe=jnp.zeros((b,), jnp.int32), steps=jnp.int32(0),
                          fix_step=jnp.full((b, g), -1, jnp.int32), trace=trace,
                          draft_nfe=jnp.zeros((b,), jnp.int32)),
        controller_state=controller.init(b, lb),
        key=key,
        cache=cache0,
        drafts=drafts0,
    )
    state = S.constrain_state(state, mesh)  # no-op without a mesh

    def cond(st: DecodeState) -> jax.Array:
        return (st.stats.steps < gen.max_steps) & jnp.any(st.tokens[:, p:] == mask_id)

    def body(st: DecodeState) -> DecodeState:
        step = st.stats.steps
        key, k_obs, k_ctl, k_spec, k_next = jax.random.split(st.key, 5)
        a0 = st.block * lb                      # answer index of the block start
        block_tokens = jax.lax.dynamic_slice_in_dim(st.tokens, p + a0, lb, axis=1)
        active = jnp.any(block_tokens == mask_id, axis=1)
        seq = DS.model_batch(cfg, gen, st.tokens, positions, valid, prompt_region)
        n_draft = jnp.zeros((b,), jnp.int32)
        if exact:
            logits, cache = BCC.block_logits(params, cfg, gen, seq.tokens, seq.positions,
                                             seq.valid, st.cache, p + a0, st.block,
                                             st.block_step, mesh)
            logits = SP.finish_logits(cfg, gen, logits)
        elif spec is None:
            logits, cache = DS.block_logits(params, cfg, gen, seq, st.cache, p + a0,
                                          st.block_step, mesh, answer_start=p,
                                          block=st.block, first=step == 0)
        else:
            logits, next_logits, n_acc, spec_tok, rank, n_draft, cache = _speculative_logits(
                params, cfg, gen, spec, seq, st, p + a0, block_tokens, k_spec, mesh, draft)
        feats = F.observe(logits, block_tokens, mask_id, k_obs, gen.temperature,
                          controller.sampler, low_conf_ids)
        accepted = None
        if spec is not None:   # the run the acceptance rule commits; its tokens
            rank = jnp.where(rank < 0,              # a plain step ranks by its own output
                             SP.decoding_rank(spec.order, feats.masked, feats.confidence), rank)
            n_masked = jnp.sum(feats.masked, axis=1, dtype=jnp.int32)
            accepted = feats.masked & (rank < jnp.minimum(n_acc + 1, n_masked)[:, None])
            feats = feats.replace(candidate=jnp.where(spec_tok >= 0, spec_tok, feats.candidate))
        win = F.update_trajectory(st.traj.window(a0, lb), feats, gen.momentum_beta, ce_filter)
        ctx = BlockContext(step=step, block_step=st.block_step, block=st.block,
                           masked_at_block_start=st.masked_at_block_start, active=active,
                           key=k_ctl, steps_per_block=gen.steps_per_block, accepted=accepted)
        commit, cstate = controller.decide(feats, win, ctx, st.controller_state)
        commit = commit & feats.masked & active[:, None]
        drafts = st.drafts
        if spec is not None:   # a prefix of the decoding order, at least one position
            run = jnp.maximum(SP.run_length(commit & accepted, rank), jnp.minimum(n_masked, 1))
            commit = feats.masked & (rank < run[:, None]) & active[:, None]
        new_block = jnp.where(commit, feats.candidate, block_tokens)
        tokens = jax.lax.dynamic_update_slice_in_dim(st.tokens, new_block, p + a0, axis=1)
        fix_win = jax.lax.dynamic_slice_in_dim(st.stats.fix_step, a0, lb, axis=1)
        fix_step = jax.lax.dynamic_update_slice_in_dim(
            st.stats.fix_step, jnp.where(commit, step, fix_win), a0, axis=1)
        answer = tokens[:, p:]
        if gen.stop_at_eos:
            answer, fix_step = DS.fill_after_eos(answer, fix_step, step, mask_id, cfg.eos_token_id,
                                               layout.answer_offset)
            tokens = tokens.at[:, p:].set(answer)

        if spec is not None and draft is None:      # the drafts the next step verifies
            drafts = SPS.next_drafts(feats, logits, rule, gen.temperature)
            if next_logits is not None:             # a completed block: the next block's
                nf = F.observe(next_logits, jnp.full_like(block_tokens, mask_id), mask_id,
                               k_next, gen.temperature, controller.sampler, low_conf_ids)
                done = ~jnp.any(jax.lax.dynamic_slice_in_dim(answer, a0, lb, axis=1) == mask_id,
                                axis=1)
                drafts = SPS.where_rows(done, SPS.next_drafts(nf, next_logits, rule,
                                                            gen.temperature), drafts)
            drafts = SPS.where_rows(active, drafts, st.drafts)
        nxt = DS.next_block(answer, st.block, mask_id, gen)
        moved = nxt != st.block
        nxt_tokens = jax.lax.dynamic_slice_in_dim(answer, nxt * lb, lb, axis=1)
        # block-causal: every block's schedule is a full block's (SDAR), the partial first
        # one included; a step whose quota exceeds the masks left commits them all
        masked_start = jnp.where(moved, lb if cfg.block_causal else
                                 jnp.sum(nxt_tokens == mask_id, axis=1, dtype=jnp.int32),
                                 st.masked_at_block_start)
        tr = st.stats.trace
        if tr is not None:
            rec = {name: getattr(feats, name) for name in TRACE_FIELDS if name != "commit"}
            rec.update(commit=commit, block=st.block)
            tr = {k: v.at[step].set(rec[k]) for k, v in tr.items()}
        stats = DecodeStats(nfe=st.stats.nfe + active.astype(jnp.int32),
                            steps=step + 1, fix_step=fix_step, trace=tr,
                            draft_nfe=st.stats.draft_nfe + n_draft * active)
        return S.constrain_state(DecodeState(
            tokens=tokens,
            traj=st.traj.write_window(a0, win),
            block=nxt,
            block_step=jnp.where(moved, 0, st.block_step + 1).astype(jnp.int32),
            masked_at_block_start=masked_start,
            stats=stats,
            controller_state=cstate,
            key=key,
            cache=cache,
            drafts=drafts,
        ), mesh)

    final = jax.lax.while_loop(cond, body, state)
    canvas, stats = final.tokens[:, p:], final.stats
    if cfg.block_causal:        # each row's answer from its canvas
        canvas = L.answer_of(canvas, layout, gen_cfg.gen_length)
        stats = stats.replace(fix_step=L.answer_of(stats.fix_step, layout, gen_cfg.gen_length))
    return GenerateOutput(tokens=canvas, stats=stats)


__all__ = ["GenerateError", "GenerateOutput", "generate", "ConfigError"]
