"""Logits -> per-token features, and the one place where trajectories are updated.

All arithmetic is float32. Shapes: logits `[B, Lb, V]`, everything else `[B, Lb]`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import jax
import jax.numpy as jnp

from dllm_jax.state import Features, Trajectory

Sampler = Literal["llada", "dream"]
NEG_INF = -jnp.inf


def suppress_tokens(logits: jax.Array, token_ids: tuple[int, ...]) -> jax.Array:
    """Set the logits of `token_ids` to -inf (LLaDA's `logits_eos_inf`)."""
    if not token_ids:
        return logits
    ids = jnp.asarray(token_ids, jnp.int32)
    return logits.at[..., ids].set(NEG_INF)


def observe(
    logits: jax.Array,
    block_tokens: jax.Array,
    mask_id: int,
    key: jax.Array,
    temperature: float = 0.0,
    sampler: Sampler = "llada",
    low_confidence_ids: tuple[int, ...] = (),
) -> Features:
    """Candidates and their confidence, entropy and margin for one step.

    Args:
      logits: float32 `[B, Lb, V]` for the active block (cfg already applied).
      block_tokens: int32 `[B, Lb]` current tokens of the block (MASK where undecided).
      mask_id: the MASK token id.
      key: PRNG key (used only when temperature > 0).
      temperature: 0 is greedy. "llada": Gumbel-max on the logits with noise scale
        `temperature`, confidence read from the untempered softmax (LLaDA `generate`).
        "dream": sample from softmax(logits / temperature), confidence read from that
        tempered distribution (Dream `sample_tokens`).
      sampler: which convention above.
      low_confidence_ids: token ids removed from the distribution that confidence is read
        from (LLaDA's `confidence_eos_eot_inf`: the softmax is renormalised without them, so
        a candidate equal to one of them gets confidence 0).
    Returns:
      Features; confidence is -inf where the position is not masked.
    """
    logits = logits.astype(jnp.float32)
    if sampler == "dream" and temperature > 0:
        dist_logits = logits / temperature
    else:
        dist_logits = logits
    logp = jax.nn.log_softmax(dist_logits, axis=-1)
    probs = jnp.exp(logp)
    if temperature > 0:
        if sampler == "llada":
            # argmax(exp(l) / (-log u)^T) == argmax(l - T * log(-log u)).
            u = jax.random.uniform(key, logits.shape, jnp.float32, minval=1e-20, maxval=1.0)
            candidate = jnp.argmax(logits - temperature * jnp.log(-jnp.log(u)), axis=-1)
        else:
            candidate = jax.random.categorical(key, dist_logits, axis=-1)
    else:
        candidate = jnp.argmax(logits, axis=-1)
    candidate = candidate.astype(jnp.int32)
    conf_probs = probs
    if low_confidence_ids:
        conf_probs = jax.nn.softmax(suppress_tokens(dist_logits, low_confidence_ids), axis=-1)
    confidence = jnp.take_along_axis(conf_probs, candidate[..., None], axis=-1)[..., 0]
    top2 = jax.lax.top_k(probs, 2)[0]
    margin = top2[..., 0] - top2[..., 1]
    entropy = -jnp.sum(jnp.where(probs > 0, probs * logp, 0.0), axis=-1)
    masked = block_tokens == mask_id
    confidence = jnp.where(masked, confidence, NEG_INF)
    return Features(candidate=candidate, confidence=confidence, entropy=entropy,
                    margin=margin, masked=masked)


#: Confidences are clipped to [CONF_CLIP, 1 - CONF_CLIP] before taking log-odds.
CONF_CLIP = 1e-6


@dataclasses.dataclass(frozen=True)
class CEFilter:
    """Static settings of the Confidence-Extrapolation (CE) filter: one local-linear-trend
    Kalman filter per answer position on y_t = logit(clip(c_t)) (log-odds of the candidate).

    State x = [level, slope], transition F = [[1, 1], [0, 1]], observation H = [1, 0].
    q: process-noise scale; Q = q * [[1/3, 1/2], [1/2, 1]] (white-noise acceleration integrated
      over one step: the slope does a random walk and the level integrates it, so a trend may
      bend smoothly; a diagonal Q would let the level jump independently of the slope).
    r: observation-noise variance of y (log-odds units squared).
    slope_var0: slope variance at a (re)start. A (re)start (first observation, or a candidate
      flip) sets level = y, slope = 0, covariance diag(r, slope_var0): the level is known as
      well as one observation tells, the slope not at all.
    A controller that reads the filter declares one as its `trajectory_filter` attribute; the
    decode loop passes it to `update_trajectory`, the one place trajectories change.
    """

    q: float = 0.05
    r: float = 0.25
    slope_var0: float = 1.0

    def __post_init__(self) -> None:
        if not (self.q >= 0 and self.r > 0 and self.slope_var0 > 0):
            raise ValueError(f"CE filter needs q >= 0, r > 0 and slope_var0 > 0; got q={self.q}, "
                             f"r={self.r}, slope_var0={self.slope_var0}.")


def log_odds(confidence: jax.Array) -> jax.Array:
    """logit(clip(c, CONF_CLIP, 1 - CONF_CLIP)) in float32; non-finite c counts as 0."""
    c = jnp.where(jnp.isfinite(confidence), confidence, 0.0).astype(jnp.float32)
    c = jnp.clip(c, CONF_CLIP, 1.0 - CONF_CLIP)
    return jnp.log(c) - jnp.log1p(-c)


def ce_filter_step(mean: jax.Array, cov: jax.Array, y: jax.Array, restart: jax.Array,
                   f: CEFilter) -> tuple[jax.Array, jax.Array]:
    """One predict + update of the CE filter, elementwise over any leading shape `[...]`.

    mean `[..., 2]`, cov `[..., 2, 2]`, y and restart `[...]`. Where `restart`, the state is
    re-initialised from y (see `CEFilter`); elsewhere x' = F x, P' = F P F' + Q, then the
    Kalman update with y. Written on the three distinct covariance entries, so P stays
    exactly symmetric.
    """
    lv, sl = mean[..., 0], mean[..., 1]
    p00, p01, p11 = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
    q, r = jnp.float32(f.q), jnp.float32(f.r)
    # predict
    lp = lv + sl
    a00 = p00 + 2.0 * p01 + p11 + q / 3.0
    a01 = p01 + p11 + q / 2.0
    a11 = p11 + q
    # update (H = [1, 0])
    s = a00 + r
    innov = y - lp
    k0, k1 = a00 / s, a01 / s
    lv_n = lp + k0 * innov
    sl_n = sl + k1 * innov
    c00 = a00 * (r / s)
    c01 = a01 * (r / s)
    c11 = a11 - a01 * k1
    # restart
    lv_n = jnp.where(restart, y, lv_n)
    sl_n = jnp.where(restart, 0.0, sl_n)
    c00 = jnp.where(restart, r, c00)
    c01 = jnp.where(restart, 0.0, c01)
    c11 = jnp.where(restart, jnp.float32(f.slope_var0), c11)
    new_mean = jnp.stack([lv_n, sl_n], axis=-1)
    new_cov = jnp.stack([jnp.stack([c00, c01], -1), jnp.stack([c01, c11], -1)], axis=-2)
    return new_mean.astype(jnp.float32), new_cov.astype(jnp.float32)


def update_trajectory(traj: Trajectory, feats: Features, beta: float = 0.5,
                      ce: Optional[CEFilter] = None) -> Trajectory:
    """Fold one step's features into the `[B, Lb]` trajectory window of the active block.

    Only masked positions are updated; committed ones keep their history.
    momentum_t = beta * momentum_{t-1} + (1 - beta) * (c_t - c_{t-1}) (0 at the first step).
    With `ce` (a controller's `trajectory_filter`), the CE filter (`ce_filter_step`) also
    takes the step, restarting at the first observation and whenever the candidate flips;
    without it the CE fields are left as they are.
    """
    m = feats.masked
    conf = jnp.where(jnp.isfinite(feats.confidence), feats.confidence, 0.0)
    first = traj.observed == 0
    same = feats.candidate == traj.prev_candidate
    delta = jnp.where(first, 0.0, conf - traj.prev_confidence)
    if ce is not None:
        ce_mean, ce_cov = ce_filter_step(traj.ce_mean, traj.ce_cov, log_odds(feats.confidence),
                                         first | ~same, ce)
        ce_mean = jnp.where(m[..., None], ce_mean, traj.ce_mean)
        ce_cov = jnp.where(m[..., None, None], ce_cov, traj.ce_cov)
    else:
        ce_mean, ce_cov = traj.ce_mean, traj.ce_cov
    new = dict(
        prev_candidate=feats.candidate,
        prev_confidence=conf,
        momentum=jnp.where(first, 0.0, beta * traj.momentum + (1.0 - beta) * delta),
        stable=jnp.where(same & ~first, traj.stable + 1, 1),
        flips=traj.flips + (~same & ~first).astype(jnp.int32),
        observed=traj.observed + 1,
    )
    new = {k: jnp.where(m, v, getattr(traj, k)) for k, v in new.items()}
    return Trajectory(**new, ce_mean=ce_mean, ce_cov=ce_cov)
