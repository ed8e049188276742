"""Confidence Extrapolation: the filter against a float64 numpy Kalman reference, the
forecast of a log-odds ramp, the stabilization rules, and the decode properties."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controllers import CE, make_controller
from controllers.ce import ce_forecast, py_logit
from dllm_jax.config import GenerateConfig
from dllm_jax.features import CEFilter, update_trajectory
from dllm_jax.state import BlockContext, Features, Trajectory
from tests.controller_props import (check_batch_equals_rows, check_compiles_once,
                                    check_decode_properties)

# ------------------------------------------------------------------ float64 reference

F64 = np.array([[1.0, 1.0], [0.0, 1.0]])
H64 = np.array([1.0, 0.0])


class NumpyCE:
    """Textbook local-linear-trend Kalman filter, one per position, float64."""

    def __init__(self, n: int, q: float, r: float, slope_var0: float):
        self.q, self.r, self.v0 = q, r, slope_var0
        self.Q = q * np.array([[1 / 3, 1 / 2], [1 / 2, 1.0]])
        self.x = np.zeros((n, 2))
        self.P = np.zeros((n, 2, 2))
        self.prev = np.full(n, -1)
        self.obs = np.zeros(n, int)

    def step(self, cand: np.ndarray, conf: np.ndarray, masked: np.ndarray) -> None:
        for i in range(len(cand)):
            if not masked[i]:
                continue
            # The filter observes float32 confidences (clipped with float32 bounds): the
            # reference takes the same observations, then works in float64.
            c = float(np.clip(np.float32(conf[i]), np.float32(1e-6), np.float32(1 - 1e-6)))
            y = math.log(c) - math.log1p(-c)
            if self.obs[i] == 0 or cand[i] != self.prev[i]:
                self.x[i] = [y, 0.0]
                self.P[i] = np.diag([self.r, self.v0])
            else:
                x = F64 @ self.x[i]
                P = F64 @ self.P[i] @ F64.T + self.Q
                S = H64 @ P @ H64 + self.r
                K = P @ H64 / S
                self.x[i] = x + K * (y - H64 @ x)
                self.P[i] = (np.eye(2) - np.outer(K, H64)) @ P
            self.prev[i] = cand[i]
            self.obs[i] += 1

    def forecast(self, h: int) -> tuple[np.ndarray, np.ndarray]:
        Fh = np.linalg.matrix_power(F64, h)
        mean = (self.x @ Fh.T)[:, 0]
        noise = sum((np.linalg.matrix_power(F64, i) @ self.Q
                     @ np.linalg.matrix_power(F64, i).T)[0, 0] for i in range(h))
        var = np.einsum("ij,njk,lk->nil", Fh, self.P, Fh)[:, 0, 0] + noise + self.r
        return mean, np.sqrt(var)


def _feats(cand, conf, masked) -> Features:
    conf = np.where(masked, conf, -np.inf)
    z = jnp.zeros(np.shape(cand), jnp.float32)
    return Features(candidate=jnp.asarray(cand, jnp.int32), confidence=jnp.asarray(conf, jnp.float32),
                    entropy=z, margin=z, masked=jnp.asarray(masked))


_update = jax.jit(update_trajectory, static_argnames=("beta", "ce"))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("filt", [CEFilter(), CEFilter(q=0.3, r=0.05, slope_var0=4.0),
                                  CEFilter(q=0.0, r=1.0, slope_var0=0.5)])
def test_filter_matches_numpy_reference(seed: int, filt: CEFilter) -> None:
    rng = np.random.default_rng(seed)
    b, lb, steps = 3, 8, 30
    n = b * lb
    ref = NumpyCE(n, filt.q, filt.r, filt.slope_var0)
    traj = Trajectory.zeros(b, lb)
    cand = rng.integers(0, 3, n)
    base = rng.uniform(-4, 4, n)
    slope = rng.uniform(-0.6, 0.6, n)
    for t in range(steps):
        flip = rng.random(n) < 0.15
        cand = np.where(flip, rng.integers(0, 3, n), cand)
        y = base + slope * t + rng.normal(0, 0.7, n)
        conf = 1 / (1 + np.exp(-y))
        extreme = rng.random(n) < 0.05                      # clipped to [1e-6, 1 - 1e-6]
        conf = np.where(extreme, rng.choice([0.0, 1e-9, 1.0], n), conf)
        masked = rng.random(n) < 0.9
        ref.step(cand, conf, masked)
        traj = _update(traj, _feats(cand.reshape(b, lb), conf.reshape(b, lb),
                                    masked.reshape(b, lb)), ce=filt)
        np.testing.assert_allclose(np.asarray(traj.ce_mean).reshape(n, 2), ref.x,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(traj.ce_cov).reshape(n, 2, 2), ref.P,
                                   rtol=1e-5, atol=1e-5)
    for h in range(5):
        mean, sd = ce_forecast(traj, h, filt)
        rm, rs = ref.forecast(h)
        np.testing.assert_allclose(np.asarray(mean).ravel(), rm, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(sd).ravel(), rs, rtol=1e-5, atol=1e-5)


def test_no_filter_leaves_ce_fields() -> None:
    traj = Trajectory.zeros(1, 2)
    out = update_trajectory(traj, _feats([[1, 2]], [[0.5, 0.9]], [[True, True]]))
    assert not np.asarray(out.ce_mean).any() and not np.asarray(out.ce_cov).any()
    assert np.asarray(out.observed).tolist() == [[1, 1]]


# ------------------------------------------------------------------ rules


def _run(ctrl, seq) -> list[np.ndarray]:
    """Feed (cand, conf) rows [Lb] per step through update_trajectory + decide (positions stay
    masked: the harness never commits); returns the commit mask of each step."""
    lb = len(seq[0][0])
    traj = Trajectory.zeros(1, lb)
    out = []
    for t, (cand, conf) in enumerate(seq):
        f = _feats([cand], [conf], [[True] * lb])
        traj = update_trajectory(traj, f, 0.5, getattr(ctrl, "trajectory_filter", None))
        ctx = BlockContext(step=jnp.int32(t), block_step=jnp.int32(t), block=jnp.int32(0),
                           masked_at_block_start=jnp.array([lb]), active=jnp.array([True]),
                           key=jax.random.key(0), steps_per_block=64)
        commit, _ = jax.jit(ctrl.decide)(f, traj, ctx, ())
        out.append(np.asarray(commit[0]))
    return out


def _sig(y: float) -> float:
    return 1 / (1 + math.exp(-y))


def test_ramp_is_forecast_to_cross_at_the_right_step() -> None:
    """y_t = -3 + 0.5 t crosses logit(0.9) = 2.197 first at t = 11."""
    filt = CEFilter(q=0.01, r=0.1, slope_var0=1.0)
    lt = py_logit(0.9)
    ys = [-3 + 0.5 * t for t in range(16)]
    cross = next(t for t, y in enumerate(ys) if y >= lt)
    assert cross == 11
    traj = Trajectory.zeros(1, 1)
    for t in range(7):                                      # observe t = 0..6
        traj = update_trajectory(traj, _feats([[4]], [[_sig(ys[t])]], [[True]]), ce=filt)
    means = [float(ce_forecast(traj, h, filt)[0][0, 0]) for h in range(10)]
    assert next(h for h, m in enumerate(means) if m >= lt) == cross - 6
    # The CE look-ahead (z = 0, horizon 3) commits at t = 11 - 3 = 8, three steps before the
    # threshold rule, whose confidence at t = 8 is only sigmoid(1) = 0.73.
    seq = [([4, 9], [_sig(ys[t]), 0.99]) for t in range(14)]
    ce = CE(threshold=0.9, horizon=3, z=0.0, stabilize=False, trajectory_filter=filt)
    first = next(t for t, c in enumerate(_run(ce, seq)) if c[0])
    assert first == cross - 3
    thr = make_controller("threshold", threshold=0.9)
    assert next(t for t, c in enumerate(_run(thr, seq)) if c[0]) == cross
    # A lower bound (z = 1) is more careful: later than the mean, never before.
    ce1 = ce.replace(z=1.0)
    first1 = next(t for t, c in enumerate(_run(ce1, seq)) if c[0])
    assert cross - 3 < first1 <= cross


def test_oscillating_candidate_is_held() -> None:
    """Position 0 alternates its candidate at confidence 0.95 (the threshold rule commits it
    every step); CE holds it once it has flipped twice and spends the step elsewhere."""
    seq = [([5 + t % 2, 7, 8], [0.95, 0.5, 0.3]) for t in range(6)]
    thr = _run(make_controller("threshold", threshold=0.9), seq)
    assert all(c[0] for c in thr)
    ce = _run(make_controller("ce", threshold=0.9), seq)
    for t, c in enumerate(ce):
        if t >= 2:                                          # flips >= 2, last flip just now
            assert not c[0] and c[1] and not c[2], (t, c)
    # Without stabilization CE keeps the threshold commits.
    ce_off = _run(make_controller("ce", threshold=0.9, stabilize=False), seq)
    assert all(c[0] for c in ce_off)


def test_falling_and_flat_tokens_are_held_steady_ones_commit() -> None:
    # 0: confidence falling fast through the threshold; 1: steady at 0.97; 2: flat just above
    # the threshold (0.905); 3: low filler.
    ys = [6.0 - 1.2 * t for t in range(4)]                    # 6.0, 4.8, 3.6, 2.4 (0.917)
    seq = [([1, 2, 3, 4], [_sig(ys[t]), 0.97, 0.905, 0.2]) for t in range(4)]
    ce = make_controller("ce", threshold=0.9)
    out = _run(ce, seq)
    last = out[-1]
    assert _sig(ys[-1]) >= 0.9
    assert not last[0], "a token whose forecast falls below the threshold is held"
    assert last[1], "a steady confident token commits"
    assert not last[2], "a flat token at the threshold is held"
    r = ce.rules(*_last_state(ce, seq))
    assert bool(r["falling"][0, 0]) and bool(r["flat"][0, 2]) and not bool(r["hold"][0, 1])


def _last_state(ctrl, seq):
    lb = len(seq[0][0])
    traj = Trajectory.zeros(1, lb)
    for cand, conf in seq:
        f = _feats([cand], [conf], [[True] * lb])
        traj = update_trajectory(traj, f, 0.5, ctrl.trajectory_filter)
    return f, traj


def test_both_rules_off_is_the_threshold_rule() -> None:
    rng = np.random.default_rng(3)
    seq = [(list(rng.integers(0, 3, 8)), list(rng.uniform(0.5, 1.0, 8))) for _ in range(8)]
    a = _run(make_controller("ce", threshold=0.8, lookahead=False, stabilize=False), seq)
    b = _run(make_controller("threshold", threshold=0.8), seq)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------ decode properties


@pytest.mark.parametrize("kind", ["peaked", "flat"])
@pytest.mark.parametrize("kwargs", [dict(), dict(threshold=0.5, horizon=3, z=0.0),
                                    dict(threshold=0.99, q=0.5, r=0.05)])
def test_ce_decode_properties(kind: str, kwargs: dict) -> None:
    check_decode_properties(make_controller("ce", **kwargs), kind)


def test_ce_batch_equals_rows_and_compiles_once() -> None:
    ctrl = make_controller("ce", threshold=0.5)
    check_batch_equals_rows(ctrl)
    check_compiles_once(ctrl)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_ce_composes_with_cache(cache: str) -> None:
    gen = GenerateConfig(gen_length=16, block_length=8, steps=8, trace=True, cache=cache)
    check_decode_properties(make_controller("ce", threshold=0.5), "peaked", gen)


def test_ce_validation_messages() -> None:
    for kw, msg in ((dict(threshold=0.0), "threshold must be in"),
                    (dict(horizon=-1), "horizon must be an integer >= 0"),
                    (dict(z=-1.0), "z must be >= 0"),
                    (dict(r=0.0), "r > 0"),
                    (dict(flip_k=0), "flip_k must be an integer >= 1")):
        with pytest.raises(ValueError, match=msg):
            make_controller("ce", **kw)
