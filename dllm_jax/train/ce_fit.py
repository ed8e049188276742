"""Fit the CE filter (q, r, slope_var0) and choose the look-ahead (z, h) on recorded decodes.

1. `observation_sequences`: from a `generate(trace=True)` trace, one row per answer position:
   its log-odds y_t = `features.log_odds(confidence)` while masked in the active block (t
   counts the position's own observations, as the decode-time filter does), `restart` at its
   first observation and at every candidate flip (segments: the filter restarts there).
2. `predictive_log_likelihood`: run the filter (`features.ce_filter_step`, a `lax.scan` over
   t, vectorised over rows) and score, at every t whose y_{t+h} lies in the same segment,
   log N(y_{t+h}; level_t + h slope_t, var_h), var_h as in `controllers.ce`:
   P00 + 2h P01 + h^2 P11 + q process_noise_sum(h) + r. Mean over scored points, summed over h.
3. `fit_ce_filter`: maximise it over log (q, r, slope_var0) with Adam from a few starts.
4. `choose_z_h`: on validation sequences, coverage of the lower bound mean_h - z sd_h against
   the nominal Phi(z), and a recommended (z, h).
Censoring: a position is no longer observed once committed, so parallel recorders (threshold)
cut the highest trajectories short; the one-token-per-step reference decode is the least
censored source.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from controllers.ce import process_noise_sum, py_logit
from dllm_jax import features as F
from dllm_jax.config import ConfigError
from dllm_jax.features import CEFilter


class CEParams(NamedTuple):
    """Filter settings as (traceable, differentiable) scalars; duck-types `CEFilter` for
    `features.ce_filter_step`. q: process-noise scale; r: observation variance (log-odds^2);
    slope_var0: slope variance at a restart ((log-odds / observation)^2)."""

    q: Any
    r: Any
    slope_var0: Any


class ObservationSequences(NamedTuple):
    """Padded per-position observation rows (N rows, T = the longest row).

    y: float32 `[N, T]` log-odds (0 where not valid). valid: bool `[N, T]` (a prefix of each
    row). restart: bool `[N, T]` True at t = 0 and where the candidate differs from the one at
    t - 1. row: int32 `[N]` batch row (+ row_offset: a prompt id). position: int32 `[N]` answer
    index."""

    y: np.ndarray
    valid: np.ndarray
    restart: np.ndarray
    row: np.ndarray
    position: np.ndarray


def _as_params(params: Any) -> CEParams:
    return CEParams(*(jnp.asarray(v, jnp.float32) for v in (params.q, params.r,
                                                              params.slope_var0)))


def _horizons(h: int | Sequence[int]) -> tuple[int, ...]:
    hs = (int(h),) if isinstance(h, (int, np.integer)) else tuple(int(v) for v in h)
    if not hs or min(hs) < 1:
        raise ConfigError(f"horizons must be integers >= 1, got {h}.")
    return hs


def observation_sequences(trace: Mapping[str, Any], *, positions: Optional[np.ndarray] = None,
                          min_observations: int = 2, row_offset: int = 0
                          ) -> ObservationSequences:
    """Per-position log-odds sequences from one trace (see `ObservationSequences`).

    trace: `DecodeStats.trace`: candidate, confidence, masked `[S, B, Lb]` and block `[S]`
      (-1 for steps that did not run); answer index of (s, j) = block[s] * Lb + j.
    positions: optional bool `[B, G]`: keep only these answer positions (e.g. content).
    min_observations: drop positions observed fewer times (one observation scores nothing).
    """
    cand, block = np.asarray(trace["candidate"]), np.asarray(trace["block"])
    _, b_n, lb = cand.shape
    live = np.asarray(trace["masked"], bool) & (block >= 0)[:, None, None]
    pos = np.broadcast_to(np.maximum(block, 0)[:, None, None] * lb + np.arange(lb), live.shape)
    if positions is not None:
        g = np.asarray(positions).shape[1]
        live = live & (pos < g) & np.asarray(positions, bool)[
            np.arange(b_n)[None, :, None], np.minimum(pos, g - 1)]
    s_i, b_i, j_i = np.nonzero(live)
    key = b_i.astype(np.int64) * (int(pos.max(initial=0)) + 1) + pos[s_i, b_i, j_i]
    order = np.lexsort((s_i, key))                       # by position, then step
    s_i, b_i, j_i, key = s_i[order], b_i[order], j_i[order], key[order]
    y_all = np.asarray(F.log_odds(jnp.asarray(np.asarray(trace["confidence"])[s_i, b_i, j_i])))
    c_all = cand[s_i, b_i, j_i]
    _, start, count = np.unique(key, return_index=True, return_counts=True)
    row_of = np.repeat(np.arange(len(start)), count)
    t = np.arange(len(key)) - np.repeat(start, count)
    flip = np.concatenate([[True], (key[1:] != key[:-1]) | (c_all[1:] != c_all[:-1])])
    y, valid, restart = (np.zeros((len(start), int(count.max(initial=0))), d)
                         for d in (np.float32, bool, bool))
    y[row_of, t], valid[row_of, t], restart[row_of, t] = y_all, True, flip[:len(key)]
    ok = count >= min_observations
    return ObservationSequences(y[ok], valid[ok], restart[ok],
                                (b_i[start] + row_offset).astype(np.int32)[ok],
                                pos[s_i[start], b_i[start], j_i[start]].astype(np.int32)[ok])


def concat_sequences(seqs: Sequence[ObservationSequences]) -> ObservationSequences:
    """Stack several `ObservationSequences`, padding to the longest T."""
    t = max([s.y.shape[1] for s in seqs], default=0)
    return ObservationSequences(*(      # pads [N, T] fields to T = t, stacks [N] ones
        np.concatenate([np.pad(a, ((0, 0), (0, t - a.shape[-1]))[:a.ndim]) for a in arrays])
        for arrays in zip(*seqs)))


def split_sequences(seqs: ObservationSequences, val_fraction: float = 0.25, seed: int = 0
                    ) -> tuple[ObservationSequences, ObservationSequences]:
    """(fit, validation) split by `row` (prompt), so one prompt never lands in both."""
    uniq = np.unique(seqs.row)
    n_val = min(max(int(math.ceil(val_fraction * len(uniq))), 1), len(uniq) - 1)
    val = np.isin(seqs.row, np.random.default_rng(seed).permutation(uniq)[:max(n_val, 0)])
    return (ObservationSequences(*(a[~val] for a in seqs)),
            ObservationSequences(*(a[val] for a in seqs)))


@functools.partial(jax.jit, static_argnames=("horizons",))
def _forecasts(p: CEParams, y: jax.Array, valid: jax.Array, restart: jax.Array,
               horizons: tuple[int, ...]) -> tuple[jax.Array, ...]:
    n, t_len = y.shape
    restart = restart | (jnp.arange(t_len) == 0)[None, :]

    def body(carry, xs):
        mean, cov = carry
        yt, vt, rt = xs
        m2, c2 = F.ce_filter_step(mean, cov, yt, rt, p)
        mean = jnp.where(vt[:, None], m2, mean)
        cov = jnp.where(vt[:, None, None], c2, cov)
        return (mean, cov), (mean, cov)

    init = (jnp.zeros((n, 2), jnp.float32), jnp.zeros((n, 2, 2), jnp.float32))
    _, (m, c) = jax.lax.scan(body, init, (y.T, valid.T, restart.T))   # [T, N, ...]
    m, c = jnp.swapaxes(m, 0, 1), jnp.swapaxes(c, 0, 1)          # [N, T, 2], [N, T, 2, 2]
    seg = jnp.cumsum(restart & valid, axis=1)
    outs = []
    for h in horizons:              # forecast from the posterior at t (see controllers.ce)
        mean = m[..., 0] + h * m[..., 1]
        var = (c[..., 0, 0] + 2.0 * h * c[..., 0, 1] + h * h * c[..., 1, 1]
               + p.q * process_noise_sum(h) + p.r)

        def ahead(a: jax.Array) -> jax.Array:
            return jnp.pad(a, ((0, 0), (0, h)))[:, h:]

        scored = valid & ahead(valid) & (ahead(seg) == seg)
        outs.append((mean, jnp.sqrt(jnp.maximum(var, 1e-12)), ahead(y), scored))
    return tuple(jnp.stack(a) for a in zip(*outs))


def forecasts(params: Any, y: Any, valid: Any, restart: Any, horizons: Sequence[int]
              ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """h-step forecasts from the filtered state at every t, for each h in `horizons` (H).

    params: a `CEFilter` or `CEParams`. y float `[N, T]`, valid / restart bool `[N, T]`
    (restart is forced at t = 0). Returns (mean, sd, target, scored), each `[H, N, T]`:
    forecast mean and sd of y_{t+h} (log-odds), the observed y_{t+h}, and whether it exists
    in the same segment (no restart in (t, t+h]).
    """
    return _forecasts(_as_params(params), jnp.asarray(y, jnp.float32),
                      jnp.asarray(valid, bool), jnp.asarray(restart, bool), _horizons(horizons))


def _loglik(p: CEParams, y: jax.Array, valid: jax.Array, restart: jax.Array,
            horizons: tuple[int, ...]) -> jax.Array:
    mean, sd, target, scored = _forecasts(p, y, valid, restart, horizons)
    lp = -0.5 * (jnp.log(2.0 * jnp.pi) + 2.0 * jnp.log(sd) + ((target - mean) / sd) ** 2)
    per_h = jnp.sum(jnp.where(scored, lp, 0.0), axis=(1, 2)) / jnp.maximum(
        jnp.sum(scored, axis=(1, 2)), 1)
    return jnp.sum(per_h)


def predictive_log_likelihood(params: Any, y: Any, valid: Any, restart: Any,
                              h: int | Sequence[int] = 1) -> jax.Array:
    """Mean h-step predictive log density (nats per scored point) of y under the filter;
    for a tuple of horizons, the sum of the per-horizon means. Shapes as in `forecasts`."""
    return _loglik(_as_params(params), jnp.asarray(y, jnp.float32), jnp.asarray(valid, bool),
                   jnp.asarray(restart, bool), _horizons(h))


_LOG_LO, _LOG_HI = np.log(np.array([[1e-6, 1e-4, 1e-4], [1e2, 1e2, 1e2]], np.float32))


def _theta_params(theta: jax.Array) -> CEParams:
    return CEParams(*jnp.exp(jnp.clip(theta, _LOG_LO, _LOG_HI)))


@functools.partial(jax.jit, static_argnames=("horizons", "steps", "lr"))
def _optimise(theta0: jax.Array, y: jax.Array, valid: jax.Array, restart: jax.Array, *,
              horizons: tuple[int, ...], steps: int, lr: float) -> tuple[jax.Array, jax.Array]:
    opt = optax.adam(lr)

    def objective(theta: jax.Array) -> jax.Array:
        return -_loglik(_theta_params(theta), y, valid, restart, horizons)

    def step(carry, _):
        theta, st = carry
        loss, g = jax.value_and_grad(objective)(theta)
        upd, st = opt.update(g, st, theta)
        return (jnp.clip(optax.apply_updates(theta, upd), _LOG_LO, _LOG_HI), st), loss

    (theta, _), losses = jax.lax.scan(step, (theta0, opt.init(theta0)), None, length=steps)
    return theta, losses


#: Default starting points (q, r, slope_var0): today's guess and two far from it.
STARTS: tuple[tuple[float, float, float], ...] = ((0.05, 0.25, 1.0), (0.005, 2.0, 0.1),
                                                  (0.5, 0.05, 10.0))


def fit_ce_filter(y: Any, valid: Any, restart: Any, horizons: Sequence[int] = (1, 2),
                  steps: int = 400, lr: float = 0.05,
                  starts: Sequence[tuple[float, float, float]] = STARTS,
                  init: CEFilter = CEFilter()) -> tuple[CEFilter, dict[str, Any]]:
    """Maximise `predictive_log_likelihood(., y, valid, restart, horizons)` over
    (log q, log r, log slope_var0) with Adam (full batch, `steps` steps, learning rate `lr`
    in log units) from each of `starts`; return the best as a `CEFilter` and metrics:
    loglik_init (at `init`), loglik_fit (nats per scored point, summed over horizons),
    n_scored per horizon, and each start's end point."""
    hs = _horizons(horizons)
    yj, vj, rj = jnp.asarray(y, jnp.float32), jnp.asarray(valid, bool), jnp.asarray(restart, bool)
    n_scored = np.asarray(jnp.sum(forecasts(init, yj, vj, rj, hs)[3], axis=(1, 2))).tolist()
    if min(n_scored, default=0) == 0:
        raise ConfigError(f"no scored points for horizons {hs}: the sequences are too short.")
    if steps <= 0 or lr <= 0 or not starts:
        raise ConfigError("fit_ce_filter needs steps > 0, lr > 0 and at least one start.")
    runs = []
    for s in starts:
        theta, losses = _optimise(jnp.log(jnp.asarray(s, jnp.float32)), yj, vj, rj,
                                  horizons=hs, steps=int(steps), lr=float(lr))
        ll = float(_loglik(_theta_params(theta), yj, vj, rj, hs))
        q, r, sv = (float(v) for v in _theta_params(theta))
        runs.append({"start": list(s), "q": q, "r": r, "slope_var0": sv, "loglik": ll,
                     "objective_first": -float(losses[0]), "objective_last": -float(losses[-1])})
    best = max(runs, key=lambda d: d["loglik"] if math.isfinite(d["loglik"]) else -math.inf)
    filt = CEFilter(q=best["q"], r=best["r"], slope_var0=best["slope_var0"])
    metrics = {"horizons": list(hs), "n_sequences": int(yj.shape[0]), "n_scored": n_scored,
               "loglik_init": float(predictive_log_likelihood(init, yj, vj, rj, hs)),
               "loglik_fit": best["loglik"], "steps": int(steps), "lr": float(lr),
               "runs": runs}
    return filt, metrics


def choose_z_h(params: Any, y: Any, valid: Any, restart: Any,
               zs: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 3.0),
               horizons: Sequence[int] = (1, 2, 3, 4), threshold: float = 0.9
               ) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Coverage table of the forecast lower bound on (validation) sequences, and a choice.

    For each (z, h), over the scored points (t with y_{t+h} in the same segment):
      coverage = fraction with y_{t+h} >= mean_h - z sd_h; nominal = Phi(z) (one-sided
      Gaussian); gap = coverage - nominal (< 0: the bound is too optimistic).
      fire = fraction of scored points below the threshold now (y_t < logit(threshold)) whose
      bound clears it (what CE's look-ahead would add to the threshold rule);
      precision = fraction of those with y_{t+h} >= logit(threshold) (nan without fires);
      cross = fraction of scored points below the threshold now whose y_{t+h} clears it (the
      most a perfect forecast could fire; the same for every z of one h).
    Rule: z*(h) = the smallest z with coverage >= nominal; among horizons that have one, the
    recommended h is the one whose (z*(h), h) fires most (ties: the smaller h). When no pair is
    calibrated, the recommendation is (max z, min h) with calibrated = False.
    Returns (table: one dict per (z, h) with keys z, h, n, coverage, nominal, gap, fire,
    precision, cross; recommended: {"z", "h", "calibrated"}).
    """
    hs = _horizons(horizons)
    mean, sd, target, scored = (np.asarray(a, np.float64)
                                for a in forecasts(params, y, valid, restart, hs))
    scored = scored.astype(bool)
    lt = py_logit(threshold)
    below = np.asarray(y, np.float64)[None] < lt
    table, best = [], None
    for k, h in enumerate(hs):
        n = int(scored[k].sum())
        cross = float((scored[k] & below[0] & (target[k] >= lt)).sum() / max(n, 1))
        for z in zs:
            lower = mean[k] - z * sd[k]
            cover = float((target[k] >= lower)[scored[k]].mean()) if n else float("nan")
            fired = scored[k] & below[0] & (lower >= lt)
            prec = float((target[k][fired] >= lt).mean()) if fired.any() else float("nan")
            nominal = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
            table.append({"z": float(z), "h": h, "n": n, "coverage": cover, "nominal": nominal,
                          "gap": cover - nominal, "fire": float(fired.sum() / max(n, 1)),
                          "precision": prec, "cross": cross})
        ok = [r for r in table if r["h"] == h and r["coverage"] >= r["nominal"]]
        cand = min(ok, key=lambda r: r["z"], default=None)
        if cand is not None and (best is None or cand["fire"] > best["fire"]):
            best = cand
    if best is None:
        return table, {"z": float(max(zs)), "h": min(hs), "calibrated": False}
    return table, {"z": best["z"], "h": best["h"], "calibrated": True}


__all__ = ["CEParams", "ObservationSequences", "STARTS", "choose_z_h", "concat_sequences",
           "fit_ce_filter", "forecasts", "observation_sequences", "predictive_log_likelihood",
           "split_sequences"]
