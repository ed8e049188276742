"""Confidence Extrapolation (CE): forecast each token's confidence a few steps ahead.

The filter (our design after arXiv 2605.30753, see shared/SPEC.md "Our controllers"): one
local-linear-trend Kalman filter per answer position on the candidate's log-odds
y_t = logit(clip(c_t, 1e-6, 1 - 1e-6)), state [level, slope], restarted when the candidate
flips. Its state lives in the Trajectory (`ce_mean [B, G, 2]`, `ce_cov [B, G, 2, 2]`) and is
updated by `features.update_trajectory`, the one place trajectories change, with the
`CEFilter` (q, r, slope_var0) that the controller declares as `trajectory_filter`: the filter
settings travel with the controller that reads the filter (a fitted TSPD ships the settings
it was fitted with), and the decode loop never learns controller names.

Forecast h steps ahead from the posterior (mean m, covariance P):
    mean_h = level + h * slope
    var_h  = H F^h P F^h' H' + sum_{i<h} H F^i Q F^i' H' + r
           = P00 + 2h P01 + h^2 P11 + q (h/3 + h(h-1)/2 + (h-1)h(2h-1)/6) + r
i.e. the textbook predictive variance of the next observation h steps ahead: uncertainty of
the current state, process noise accumulated over the h steps, and observation noise.

The `CE` controller = Fast-dLLM's threshold rule plus two rules:
- safe look-ahead: also commit a masked token whose forecast lower bound
  sigmoid(mean_h - z * sd_h) clears the threshold (it would clear it within h steps anyway);
- stabilization: hold a token, even when its confidence clears the threshold, when it is
    oscillating:        flips >= flip_k and the last flip is at most `recent` observations
                        old (stable <= recent);
    falling:            slope < -slope_tol and the forecast mean_h falls below the threshold;
    flat and unsure:    the confidence clears the threshold, but with at least two
                        observations of the current candidate, |slope| <= flat_tol and the
                        filtered level's lower bound level - z * sqrt(P00 + r) below the
                        threshold (it sits at the threshold and is not rising).
  A held token is not committed; when a row commits nothing, the best NON-held masked token
  (by confidence) is committed instead, so the step is spent elsewhere; only when every
  masked token is held does the most confident held one commit (at least one per row).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from controllers.base import at_least_one
from controllers.registry import ControllerOptions, option, register, require
from dllm_jax.features import CEFilter
from dllm_jax.state import BlockContext, Features, Trajectory


def py_logit(p: float) -> float:
    """logit(p) in float64 Python arithmetic (+inf at 1, -inf at 0)."""
    if p >= 1.0:
        return math.inf
    if p <= 0.0:
        return -math.inf
    return math.log(p) - math.log1p(-p)


def process_noise_sum(h: int) -> float:
    """sum_{i<h} (F^i Q F^i')[0, 0] / q = h/3 + h(h-1)/2 + (h-1)h(2h-1)/6."""
    return h / 3.0 + h * (h - 1) / 2.0 + (h - 1) * h * (2 * h - 1) / 6.0


def ce_forecast(traj: Trajectory, horizon: int, f: CEFilter) -> tuple[jax.Array, jax.Array]:
    """(mean_h, sd_h) `[B, Lb]` of the log-odds `horizon` steps ahead (see the module doc)."""
    m, p = traj.ce_mean, traj.ce_cov
    h = float(horizon)
    mean = m[..., 0] + h * m[..., 1]
    var = (p[..., 0, 0] + 2.0 * h * p[..., 0, 1] + h * h * p[..., 1, 1]
           + jnp.float32(f.q * process_noise_sum(horizon)) + jnp.float32(f.r))
    return mean, jnp.sqrt(jnp.maximum(var, 0.0))


@struct.dataclass
class CE:
    """Threshold rule + CE safe look-ahead + CE stabilization (see the module doc).

    threshold: commit threshold on confidence (as Fast-dLLM's, default 0.9).
    horizon: look-ahead h in steps; z: width of the lower bound in forecast sds.
    lookahead / stabilize: switch each rule (both off = the threshold rule).
    flip_k, recent: oscillation = >= flip_k flips, the last one <= recent observations ago.
    slope_tol: a slope below -slope_tol (log-odds per step) counts as falling.
    flat_tol: |slope| <= flat_tol counts as flat.
    trajectory_filter: the CE filter settings the decode loop runs (q, r, slope_var0).
    """

    threshold: float = struct.field(pytree_node=False, default=0.9)
    horizon: int = struct.field(pytree_node=False, default=2)
    z: float = struct.field(pytree_node=False, default=1.0)
    lookahead: bool = struct.field(pytree_node=False, default=True)
    stabilize: bool = struct.field(pytree_node=False, default=True)
    flip_k: int = struct.field(pytree_node=False, default=2)
    recent: int = struct.field(pytree_node=False, default=2)
    slope_tol: float = struct.field(pytree_node=False, default=0.0)
    flat_tol: float = struct.field(pytree_node=False, default=0.1)
    trajectory_filter: CEFilter = struct.field(pytree_node=False, default=CEFilter())
    sampler: str = struct.field(pytree_node=False, default="llada")
    verify: ClassVar[None] = None

    def init(self, batch: int, block: int) -> Any:
        return ()

    def rules(self, feats: Features, traj: Trajectory) -> dict[str, jax.Array]:
        """The rule masks `[B, Lb]` (bool, over masked positions): base (threshold), lookahead,
        oscillating, falling, flat (flat and unsure), hold (any of the three)."""
        f = self.trajectory_filter
        masked = feats.masked
        lt = jnp.float32(py_logit(self.threshold))
        mean_h, sd_h = ce_forecast(traj, self.horizon, f)
        level, slope = traj.ce_mean[..., 0], traj.ce_mean[..., 1]
        base = masked & (feats.confidence >= self.threshold)
        look = masked & (mean_h - self.z * sd_h >= lt)
        osc = masked & (traj.flips >= self.flip_k) & (traj.stable <= self.recent)
        falling = masked & (slope < -self.slope_tol) & (mean_h < lt)
        sd0 = jnp.sqrt(traj.ce_cov[..., 0, 0] + jnp.float32(f.r))
        flat = (base & (traj.stable >= 2) & (jnp.abs(slope) <= self.flat_tol)
                & (level - self.z * sd0 < lt))
        return dict(base=base, lookahead=look, oscillating=osc, falling=falling, flat=flat,
                    hold=osc | falling | flat)

    def decide(self, feats: Features, traj: Trajectory, ctx: BlockContext, state: Any):
        r = self.rules(feats, traj)
        commit = r["base"] | r["lookahead"] if self.lookahead else r["base"]
        conf = jnp.where(feats.masked, feats.confidence, -jnp.inf)
        if self.stabilize:
            commit = commit & ~r["hold"]
            # conf is in [0, 1]: held tokens rank after every non-held one.
            score = jnp.where(r["hold"], conf - 2.0, conf)
        else:
            score = conf
        return at_least_one(commit, score, feats.masked), state


_CE = CEFilter()


@dataclasses.dataclass(frozen=True)
class CERuleOptions(ControllerOptions):
    """The options of CE's commit rules, declared once for `ce` and `ce_fitted` (which
    subclass this; not registered itself). `ce_fitted` re-declares horizon and z with the
    default None ("the fitted one"); the filter options (q, r, slope_var0) are `ce`'s only."""

    threshold: float = option(0.9, "commit threshold on confidence, in (0, 1]")
    horizon: int = option(2, "CE look-ahead in steps, >= 0")
    z: float = option(1.0, "width of the CE forecast's lower bound in sds, >= 0")
    lookahead: bool = option(True, "CE: also commit tokens whose forecast clears the threshold")
    stabilize: bool = option(True, "CE: hold oscillating, falling or flat-and-unsure tokens")
    flip_k: int = option(2, "CE: a token with >= flip_k candidate flips may oscillate, >= 1")
    recent: int = option(2, "CE: ... when its last flip is <= recent observations old, >= 1")
    slope_tol: float = option(0.0, "CE: a slope below -slope_tol counts as falling, >= 0")
    flat_tol: float = option(0.1, "CE: |slope| <= flat_tol counts as flat, >= 0")

    def validate(self) -> None:
        require(0.0 < self.threshold <= 1.0, "threshold", "in (0, 1]", self.threshold, 0.9)
        if self.horizon is not None:
            require(self.horizon >= 0, "horizon", "an integer >= 0 (steps ahead)", self.horizon,
                    2)
        if self.z is not None:
            require(self.z >= 0.0, "z", ">= 0 (forecast sds)", self.z, 1.0)
        require(self.flip_k >= 1, "flip_k", "an integer >= 1", self.flip_k, 2)
        require(self.recent >= 1, "recent", "an integer >= 1", self.recent, 2)
        require(self.slope_tol >= 0.0, "slope_tol", ">= 0", self.slope_tol, 0.0)
        require(self.flat_tol >= 0.0, "flat_tol", ">= 0", self.flat_tol, 0.1)


#: CE's rule options (CERuleOptions' fields), in declaration order.
CE_RULE_OPTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(CERuleOptions))


@register("ce")
@dataclasses.dataclass(frozen=True)
class CEOptions(CERuleOptions):
    """Confidence Extrapolation: the threshold rule plus CE safe look-ahead and stabilization."""

    q: float = option(_CE.q, "CE filter process-noise scale, >= 0")
    r: float = option(_CE.r, "CE filter observation-noise variance (log-odds^2), > 0")
    slope_var0: float = option(_CE.slope_var0, "CE filter slope variance at a restart, > 0")

    def validate(self) -> None:
        super().validate()
        filt = "the CE filter needs q >= 0, r > 0 and slope_var0 > 0"
        require(self.q >= 0.0, "q", f">= 0 ({filt})", self.q, _CE.q)
        require(self.r > 0.0, "r", f"> 0 ({filt})", self.r, _CE.r)
        require(self.slope_var0 > 0.0, "slope_var0", f"> 0 ({filt})", self.slope_var0,
                _CE.slope_var0)

    def build(self, name: str) -> CE:
        return CE(**{k: getattr(self, k) for k in CE_RULE_OPTIONS},
                  trajectory_filter=CEFilter(q=self.q, r=self.r, slope_var0=self.slope_var0))


__all__ = ["CE", "CEOptions", "CERuleOptions", "CE_RULE_OPTIONS", "ce_forecast",
           "process_noise_sum", "py_logit"]
