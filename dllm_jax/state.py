"""What the decode loop carries: pytrees with fixed shapes.

Notation: B = batch, T = prompt + answer length, G = answer length, Lb = block length,
S = max steps of the loop. Every array keeps its shape for the whole decode.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Features:
    """Per-token observations of one step, over the active block `[B, Lb]`.

    candidate: int32 token the model proposes (argmax, or a sample when temperature > 0).
    confidence: float32 probability of the candidate (-inf where the position is not masked).
    entropy: float32 entropy of the predictive distribution, in nats.
    margin: float32 top-1 minus top-2 probability.
    masked: bool, the position still holds MASK.
    """

    candidate: jax.Array
    confidence: jax.Array
    entropy: jax.Array
    margin: jax.Array
    masked: jax.Array


@struct.dataclass
class Trajectory:
    """Per-position histories over the whole answer `[B, G]` (CE fields `[B, G, ...]`), updated
    by `features.update_trajectory`.

    prev_candidate: int32 candidate at the last observation (-1 before the first).
    prev_confidence: float32 confidence at the last observation (0 before the first).
    momentum: float32 exponentially smoothed confidence change per step.
    stable: int32 consecutive observations with the same candidate (1 after the first).
    flips: int32 number of times the candidate changed.
    observed: int32 number of steps the position was observed while masked.
    ce_mean: float32 `[B, G, 2]` Confidence-Extrapolation filter posterior mean
      [level, slope] of the candidate's log-odds (zeros until the first observation, and
      always zeros when the controller declares no `trajectory_filter`).
    ce_cov: float32 `[B, G, 2, 2]` its posterior covariance.
    """

    prev_candidate: jax.Array
    prev_confidence: jax.Array
    momentum: jax.Array
    stable: jax.Array
    flips: jax.Array
    observed: jax.Array
    ce_mean: jax.Array
    ce_cov: jax.Array

    @classmethod
    def zeros(cls, batch: int, length: int) -> "Trajectory":
        zf = jnp.zeros((batch, length), jnp.float32)
        zi = jnp.zeros((batch, length), jnp.int32)
        return cls(prev_candidate=zi - 1, prev_confidence=zf, momentum=zf, stable=zi,
                   flips=zi, observed=zi, ce_mean=jnp.zeros((batch, length, 2), jnp.float32),
                   ce_cov=jnp.zeros((batch, length, 2, 2), jnp.float32))

    def window(self, start: jax.Array, size: int) -> "Trajectory":
        """The `[B, size]` slice beginning at answer index `start` (a traced scalar)."""
        return jax.tree_util.tree_map(
            lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1), self)

    def write_window(self, start: jax.Array, win: "Trajectory") -> "Trajectory":
        """Write a `[B, size]` window back at answer index `start`."""
        return jax.tree_util.tree_map(
            lambda a, w: jax.lax.dynamic_update_slice_in_dim(a, w, start, axis=1), self, win)


@struct.dataclass
class BlockContext:
    """What a controller may know about the step beyond per-token features.

    step: int32 scalar, steps taken so far in the whole decode (0-based).
    block_step: int32 scalar, steps taken so far in the active block (0-based).
    block: int32 scalar, index of the active block.
    masked_at_block_start: int32 `[B]`, MASKs in the active block when it began.
    active: bool `[B]`, the row still has MASKs in the active block.
    key: PRNG key for this step (random remasking, sampled orderings).
    steps_per_block: static int, the step budget of one block (schedules read it).
    accepted: bool `[B, Lb]` in a speculative loop (the controller declares `verify`): the
      positions the verification's acceptance rule commits this step, a prefix of the
      decoding order (`dllm_jax.speculative`); None in other loops.
    """

    step: jax.Array
    block_step: jax.Array
    block: jax.Array
    masked_at_block_start: jax.Array
    active: jax.Array
    key: jax.Array
    steps_per_block: int = struct.field(pytree_node=False, default=1)
    accepted: Any = None


@struct.dataclass
class DecodeStats:
    """What a decode reports besides the tokens.

    nfe: int32 `[B]`, forward passes each row took part in while unfinished (a classifier-free
      guidance step is one forward over the conditional and unconditional copies, as in
      LLaDA, and counts 1).
    steps: int32 scalar, loop iterations.
    fix_step: int32 `[B, G]`, the step at which each answer position was committed (-1: never).
    trace: optional dict of per-step features `[S, B, Lb]` (+ `block` `[S]`), or None.
    draft_nfe: int32 `[B]`, forward passes of a draft model (speculative decoding with
      `draft_params`; zeros otherwise), not counted in `nfe`.
    """

    nfe: jax.Array
    steps: jax.Array
    fix_step: jax.Array
    trace: Any = None
    draft_nfe: Any = None


@struct.dataclass
class Drafts:
    """Pending self-drafts of a speculative loop, over the active block `[B, Lb]`: the
    previous step's candidates, verified by the next step's forward.

    token: int32 draft tokens. score: float32 their confidence (the "confidence" order).
    logq: float32 `[B, Lb, V]` log-probabilities of the distributions the drafts were drawn
      from (sampling acceptance), or None (greedy).
    """

    token: jax.Array
    score: jax.Array
    logq: Any = None


@struct.dataclass
class DecodeState:
    """The loop carry.

    tokens: int32 `[B, T]` prompt (left-padded) then answer, MASK where undecided.
    traj: Trajectory over the answer.
    block: int32 scalar, active block index.
    block_step: int32 scalar, steps spent in the active block.
    masked_at_block_start: int32 `[B]`.
    stats: DecodeStats being filled.
    controller_state: whatever the controller carries.
    key: PRNG key.
    cache: KVCache or None (no cache).
    drafts: Drafts of a self-drafting speculative loop, else None.
    """

    tokens: jax.Array
    traj: Trajectory
    block: jax.Array
    block_step: jax.Array
    masked_at_block_start: jax.Array
    stats: DecodeStats
    controller_state: Any
    key: jax.Array
    cache: Any = None
    drafts: Any = None
