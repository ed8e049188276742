"""`r2`: R2-dLLM's redundancy rules as its authors wrote them (GATECH-EIC/R2-dLLM,
`llada/generate.py`, `generate_with_dual_cache`; arXiv 2604.18995).

They only ADD commits on top of Fast-dLLM's threshold rule. Within one step, in this order,
each rule seeing the commits of the rules before it (B = batch, Lb = block length):

1. threshold: every masked token with confidence >= `threshold`, and the single most
   confident masked token always (Fast-dLLM's `get_transfer_index`).
2. window sweep (`window` > 0): every window of `window` consecutive positions lying inside
   the block (Lb - window + 1 of them; none when the block is shorter) is judged on the state
   after rule 1: it is skipped when it holds more than `max_unmasked` decoded tokens (this
   step's threshold commits count), or no masked one; otherwise its score is the mean
   confidence of its still-masked positions, and when score >= `spatial_threshold` all of
   them commit. Every window sees the same state (the commits are applied after the sweep).
3. token clusters (`token_cluster` != "none"; only when the window rule is on, as upstream):
   maximal runs of >= `cluster_size` (2 in their LLaDA code; Dream's `token_cluster_size`)
   adjacent still-masked positions with the same candidate token; when
   the run's best confidence is > `spatial_threshold` (strict), ONE token of the run commits:
   the most confident (first of equals), the middle one (index len // 2) or a random one.
4. temporal finalisation (`temporal_steps` > 0): per position, a streak of consecutive steps
   with the same candidate, counted over the steps at which the position was still masked
   after rules 1-3 (a step whose rules committed it, or a new candidate, restarts the count);
   a position whose streak reaches `temporal_steps` (the current step included) with streak
   confidence >= `temporal_threshold` commits. Streak confidence: `temporal_eval` "ave" (the
   mean over the streak, upstream's function default), "last" (this step's; their eval
   scripts) or "max".

A drawing for one row, block of 8, window 3, max_unmasked 1, spatial threshold 0.8
(`#` decoded before the step, numbers = confidence of the masked positions):

    position   0    1    2    3    4    5    6    7
    before     #   .95  .85  .80  .10  .70  .88   #
    rule 1     #    T   .85  .80  .10  .70  .88   #     threshold 0.9: position 1 commits
    windows   [0-2] 2 decoded > 1: skipped    [1-3] 1 decoded, mean(.85, .80) = .825: commit 2, 3
              [2-4] mean .58   [3-5] mean .53   [4-6] mean .56   [5-7] mean(.70, .88) = .79
    result     #    T    W    W   .10  .70  .88   #

Defaults are their eval scripts' values (threshold 0.9, window 3, spatial threshold 0.8, at
most 1 decoded token per window, token cluster by confidence, temporal 3 steps / 0.8 /
"last"). 0 turns a rule off (`window=0`: rules 2 and 3; `temporal_steps=0`: rule 4), as
upstream's None does.

Deviations, stated: upstream computes confidences in float64, we in float32 (window means
can round differently exactly at the threshold); with temperature > 0 upstream's rules 3-4
read the argmax token of the logits and its probability while rules 1-2 read the Gumbel
sample, here every rule reads the step's candidate (identical at temperature 0, the setting
of their scripts); upstream runs batch 1, this runs the rules per row of a batch.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from controllers.base import at_least_one
from controllers.registry import ControllerOptions, option, register, require
from dllm_jax.state import BlockContext, Features, Trajectory

TOKEN_CLUSTER_MODES = ("confidence", "mid", "random", "none")
TEMPORAL_EVALS = ("ave", "last", "max")


@struct.dataclass
class StreakState:
    """Per block position `[B, Lb]`: the temporal rule's streak (upstream's auto-confirm).

    ids: int32 candidate of the streak (-1: none); count: int32 its length in steps;
    total: float32 sum of its confidences; peak: float32 their maximum.
    """

    ids: jax.Array
    count: jax.Array
    total: jax.Array
    peak: jax.Array

    @classmethod
    def zeros(cls, batch: int, block: int) -> "StreakState":
        zi = jnp.zeros((batch, block), jnp.int32)
        zf = jnp.zeros((batch, block), jnp.float32)
        return cls(ids=zi - 1, count=zi, total=zf, peak=zf)


def threshold_rule(conf: jax.Array, masked: jax.Array, threshold: float) -> jax.Array:
    """Rule 1 `[B, Lb]`: confidence >= threshold, plus the most confident masked token."""
    return at_least_one(masked & (conf >= threshold), conf, masked)


def window_sweep(conf: jax.Array, masked: jax.Array, window: int, spatial_threshold: float,
                 max_unmasked: int) -> jax.Array:
    """Rule 2 `[B, Lb]`: the masked positions of every qualifying window (module doc, 2).

    conf: float32 `[B, Lb]` (read where masked); masked: bool `[B, Lb]`, the state after rule 1.
    """
    b, lb = masked.shape
    if window <= 0 or lb < window:
        return jnp.zeros_like(masked)
    n_win = lb - window + 1
    member = (jnp.arange(lb)[None, :] >= jnp.arange(n_win)[:, None]) & (
        jnp.arange(lb)[None, :] < jnp.arange(n_win)[:, None] + window)   # [n_win, Lb]
    inside = member[None] & masked[:, None, :]                             # [B, n_win, Lb]
    n_masked = jnp.sum(inside, axis=2)                                     # [B, n_win]
    conf_sum = jnp.sum(jnp.where(inside, conf[:, None, :], 0.0), axis=2)
    mean = conf_sum / jnp.maximum(n_masked, 1).astype(jnp.float32)
    ok = (n_masked > 0) & (mean >= spatial_threshold)
    if max_unmasked >= 0:
        ok = ok & (window - n_masked <= max_unmasked)
    hit = jnp.any(ok[:, :, None] & member[None], axis=1)                  # [B, Lb]
    return hit & masked


def token_clusters(conf: jax.Array, cand: jax.Array, masked: jax.Array, spatial_threshold: float,
                   mode: str, key: jax.Array, min_size: int = 2) -> jax.Array:
    """Rule 3 `[B, Lb]`: one token of each maximal run (>= min_size) of adjacent masked
    positions with the same candidate whose best confidence > spatial_threshold (module doc, 3)."""
    b, lb = masked.shape
    pos = jnp.arange(lb)
    joins = masked[:, 1:] & masked[:, :-1] & (cand[:, 1:] == cand[:, :-1])  # i-1 ~ i
    start = masked & ~jnp.concatenate([jnp.zeros((b, 1), bool), joins], axis=1)
    run = jnp.cumsum(start.astype(jnp.int32), axis=1)                       # run id per pos
    same = (run[:, :, None] == run[:, None, :]) & masked[:, :, None] & masked[:, None, :]
    length = jnp.sum(same, axis=2)                                          # [B, Lb]
    cm = jnp.where(masked, conf, -jnp.inf)
    best = jnp.max(jnp.where(same, cm[:, None, :], -jnp.inf), axis=2)
    run_start = jnp.min(jnp.where(same, pos[None, None, :], lb), axis=2)
    offset = pos[None, :] - run_start
    if mode == "confidence":
        first_best = jnp.min(jnp.where(same & (cm[:, None, :] == best[:, :, None]),
                                       pos[None, None, :], lb), axis=2)
        chosen = pos[None, :] == first_best
    elif mode == "mid":
        chosen = offset == length // 2
    else:  # random: one uniform draw per run, read at its start
        u = jax.random.uniform(key, (b, lb))
        u_run = jnp.sum(jnp.where(same & (pos[None, None, :] == run_start[:, :, None]),
                                  u[:, None, :], 0.0), axis=2)
        pick = jnp.minimum((u_run * length).astype(jnp.int32), length - 1)
        chosen = offset == pick
    return masked & chosen & (length >= min_size) & (best > spatial_threshold)


@struct.dataclass
class R2:
    """The authors' R2 rules (see the module doc); options as in `R2Options`."""

    threshold: float = struct.field(pytree_node=False, default=0.9)
    window: int = struct.field(pytree_node=False, default=3)
    spatial_threshold: float = struct.field(pytree_node=False, default=0.8)
    max_unmasked: int = struct.field(pytree_node=False, default=1)
    token_cluster: str = struct.field(pytree_node=False, default="confidence")
    cluster_size: int = struct.field(pytree_node=False, default=2)
    temporal_steps: int = struct.field(pytree_node=False, default=3)
    temporal_threshold: float = struct.field(pytree_node=False, default=0.8)
    temporal_eval: str = struct.field(pytree_node=False, default="last")
    sampler: str = struct.field(pytree_node=False, default="llada")
    trajectory_filter: ClassVar[None] = None
    verify: ClassVar[None] = None

    def init(self, batch: int, block: int) -> StreakState:
        return StreakState.zeros(batch, block)

    def rules(self, feats: Features, state: StreakState, key: jax.Array
              ) -> tuple[dict[str, jax.Array], StreakState]:
        """Each rule's commits `[B, Lb]` (rule order as in the module doc) and the new streaks."""
        masked0 = feats.masked
        conf = jnp.where(masked0, feats.confidence, 0.0).astype(jnp.float32)
        cand = feats.candidate
        out = {"threshold": threshold_rule(feats.confidence, masked0, self.threshold)}
        left = masked0 & ~out["threshold"]
        out["window"] = window_sweep(conf, left, self.window, self.spatial_threshold,
                                     self.max_unmasked)
        left = left & ~out["window"]
        if self.window > 0 and self.token_cluster != "none":
            out["cluster"] = token_clusters(conf, cand, left, self.spatial_threshold,
                                            self.token_cluster, key, self.cluster_size)
        else:
            out["cluster"] = jnp.zeros_like(left)
        left = left & ~out["cluster"]
        out["temporal"], state = self._temporal(conf, cand, masked0, left, state)
        return out, state

    def _temporal(self, conf: jax.Array, cand: jax.Array, masked0: jax.Array, active: jax.Array,
                  st: StreakState) -> tuple[jax.Array, StreakState]:
        if self.temporal_steps <= 0:
            return jnp.zeros_like(active), st
        same = active & (st.ids == cand)
        fresh = active & ~same
        reset = masked0 & ~active                   # committed by rules 1-3 this step
        ids = jnp.where(fresh, cand, jnp.where(reset, -1, st.ids))
        count = jnp.where(same, st.count + 1, jnp.where(fresh, 1, jnp.where(reset, 0, st.count)))
        total = jnp.where(same, st.total + conf, jnp.where(fresh, conf,
                                                           jnp.where(reset, 0.0, st.total)))
        peak = jnp.where(same, jnp.maximum(st.peak, conf),
                         jnp.where(fresh, conf, jnp.where(reset, 0.0, st.peak)))
        if self.temporal_eval == "ave":
            value = total / jnp.maximum(count, 1)
        elif self.temporal_eval == "last":
            value = conf
        else:
            value = peak
        commit = active & (count >= self.temporal_steps) & (value >= self.temporal_threshold)
        # a confirmed streak is cleared; a row with no masked position is cleared entirely
        clear = commit | ~jnp.any(masked0, axis=1, keepdims=True)
        st = StreakState(ids=jnp.where(clear, -1, ids), count=jnp.where(clear, 0, count),
                         total=jnp.where(clear, 0.0, total), peak=jnp.where(clear, 0.0, peak))
        return commit, st

    def decide(self, feats: Features, traj: Trajectory, ctx: BlockContext, state: StreakState
               ) -> tuple[jax.Array, StreakState]:
        # a new block's positions start without streaks
        fresh = StreakState.zeros(*feats.masked.shape)
        state = jax.tree.map(lambda f, s: jnp.where(ctx.block_step == 0, f, s), fresh, state)
        r, state = self.rules(feats, state, ctx.key)
        commit = r["threshold"] | r["window"] | r["cluster"] | r["temporal"]
        return commit, state


@register("r2")
@dataclasses.dataclass(frozen=True)
class R2Options(ControllerOptions):
    """R2-dLLM's rules as its authors wrote them (threshold + window sweep + token clusters +
    temporal finalisation); defaults are their eval scripts' values; 0 turns a rule off."""

    threshold: float = option(0.9, "commit threshold on confidence, in (0, 1]")
    r2_window: int = option(3, "R2: window of the confidence sweep (0: no window sweep and "
                               "no token clusters), >= 0")
    r2_spatial_threshold: float = option(0.8, "R2: mean confidence a window needs (and a token "
                                              "cluster's best must exceed), in [0, 1]")
    r2_max_unmasked: int = option(1, "R2: decoded tokens a window may hold (-1: any), >= -1")
    r2_token_cluster: str = option("confidence", "R2: which token of a same-token run commits",
                                   choices=TOKEN_CLUSTER_MODES)
    r2_cluster_size: int = option(2, "R2: shortest same-token run the token-cluster rule "
                                     "takes (Dream's token_cluster_size), >= 2")
    r2_temporal_steps: int = option(3, "R2: steps a candidate must hold to be finalised "
                                       "(0: no temporal rule), >= 0")
    r2_temporal_threshold: float = option(0.8, "R2: streak confidence the temporal rule needs, "
                                               "in [0, 1]")
    r2_temporal_eval: str = option("last", "R2: streak confidence = mean, last or max",
                                   choices=TEMPORAL_EVALS)

    def validate(self) -> None:
        require(0.0 < self.threshold <= 1.0, "threshold", "in (0, 1]", self.threshold, 0.9)
        require(self.r2_window >= 0, "r2_window", "an integer >= 0", self.r2_window, 3)
        require(0.0 <= self.r2_spatial_threshold <= 1.0, "r2_spatial_threshold", "in [0, 1]",
                self.r2_spatial_threshold, 0.8)
        require(self.r2_max_unmasked >= -1, "r2_max_unmasked", "an integer >= -1",
                self.r2_max_unmasked, 1)
        require(self.r2_cluster_size >= 2, "r2_cluster_size", "an integer >= 2",
                self.r2_cluster_size, 2)
        require(self.r2_temporal_steps >= 0, "r2_temporal_steps", "an integer >= 0",
                self.r2_temporal_steps, 3)
        require(0.0 <= self.r2_temporal_threshold <= 1.0, "r2_temporal_threshold", "in [0, 1]",
                self.r2_temporal_threshold, 0.8)

    def build(self, name: str) -> R2:
        return R2(threshold=self.threshold, window=self.r2_window,
                  spatial_threshold=self.r2_spatial_threshold, max_unmasked=self.r2_max_unmasked,
                  token_cluster=self.r2_token_cluster, cluster_size=self.r2_cluster_size,
                  temporal_steps=self.r2_temporal_steps,
                  temporal_threshold=self.r2_temporal_threshold,
                  temporal_eval=self.r2_temporal_eval)


__all__ = ["R2", "R2Options", "StreakState", "TEMPORAL_EVALS", "TOKEN_CLUSTER_MODES",
           "threshold_rule", "token_clusters", "window_sweep"]
