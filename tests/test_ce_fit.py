"""CE filter fit (`dllm_jax.train.ce_fit`): observation sequences from a hand-made trace, the
predictive likelihood against an independent float64 Kalman filter, recovery of known (q, r,
slope_var0) on data drawn from the local-linear-trend model, and choose_z_h's coverage counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dllm_jax.features import CEFilter
from dllm_jax.train.ce_fit import (CEParams, choose_z_h, concat_sequences, fit_ce_filter,
                                   forecasts, observation_sequences,
                                   predictive_log_likelihood, split_sequences)


# ---------------------------------------------------------------- independent reference

def ref_forecasts(q: float, r: float, sv0: float, y: np.ndarray, valid: np.ndarray,
                  restart: np.ndarray, h: int):
    """Textbook float64 Kalman filter (matrices F, Q, H), one row at a time, and its h-step
    forecasts. Returns lists of (mean, var, target) over scored points, row-major, plus the
    boolean mask of scored (n, t)."""
    fm = np.array([[1.0, 1.0], [0.0, 1.0]])
    qm = q * np.array([[1 / 3, 1 / 2], [1 / 2, 1.0]])
    hm = np.array([[1.0, 0.0]])
    out, scored = [], np.zeros(y.shape, bool)
    for n in range(y.shape[0]):
        length = int(valid[n].sum())
        states = []
        x = p = None
        for t in range(length):
            if t == 0 or restart[n, t]:
                x, p = np.array([y[n, t], 0.0]), np.diag([r, sv0])
            else:
                x, p = fm @ x, fm @ p @ fm.T + qm
                s = (hm @ p @ hm.T)[0, 0] + r
                k = (p @ hm.T)[:, 0] / s
                x = x + k * (y[n, t] - x[0])
                p = p - np.outer(k, hm @ p)
            states.append((x.copy(), p.copy()))
        seg = np.cumsum([t == 0 or restart[n, t] for t in range(length)])
        for t in range(length - h):
            if seg[t + h] != seg[t]:
                continue
            x, p = states[t]
            fh = np.linalg.matrix_power(fm, h)
            mean = (hm @ fh @ x)[0]
            var = (hm @ fh @ p @ fh.T @ hm.T)[0, 0] + r
            for i in range(h):
                fi = np.linalg.matrix_power(fm, i)
                var += (hm @ fi @ qm @ fi.T @ hm.T)[0, 0]
            out.append((mean, var, y[n, t + h]))
            scored[n, t] = True
    return out, scored


def ref_loglik(q, r, sv0, y, valid, restart, hs) -> float:
    total = 0.0
    for h in hs:
        pts, _ = ref_forecasts(q, r, sv0, y, valid, restart, h)
        total += np.mean([-0.5 * (math.log(2 * math.pi * v) + (t - m) ** 2 / v)
                          for m, v, t in pts])
    return total


def small_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    n, t = 6, 10
    lengths = np.array([10, 7, 4, 10, 2, 9])
    valid = np.arange(t)[None] < lengths[:, None]
    y = np.where(valid, rng.normal(0, 2, (n, t)).cumsum(1), 0.0).astype(np.float32)
    restart = np.zeros((n, t), bool)
    restart[:, 0] = True
    restart[0, 4] = restart[3, 2] = restart[3, 3] = restart[5, 6] = True
    return y, valid, restart


# ---------------------------------------------------------------- likelihood vs reference

@pytest.mark.parametrize("hs", [(1,), (2,), (1, 3)])
def test_likelihood_matches_float64_reference(hs):
    y, valid, restart = small_case()
    q, r, sv0 = 0.07, 0.4, 0.8
    got = float(predictive_log_likelihood(CEParams(q, r, sv0), y, valid, restart,
                                          hs if len(hs) > 1 else hs[0]))
    want = ref_loglik(q, r, sv0, y.astype(np.float64), valid, restart, hs)
    assert got == pytest.approx(want, abs=1e-4)
    # the same through a CEFilter, and the per-point forecasts
    assert float(predictive_log_likelihood(CEFilter(q, r, sv0), y, valid, restart, hs)) == \
        pytest.approx(got, abs=1e-6)
    mean, sd, target, scored = (np.asarray(a) for a in forecasts(CEFilter(q, r, sv0), y,
                                                                   valid, restart, hs))
    for k, h in enumerate(hs):
        pts, ref_scored = ref_forecasts(q, r, sv0, y.astype(np.float64), valid, restart, h)
        np.testing.assert_array_equal(scored[k], ref_scored)
        m, v, t = (np.array(a) for a in zip(*pts))
        np.testing.assert_allclose(mean[k][scored[k]], m, atol=1e-4)
        np.testing.assert_allclose(sd[k][scored[k]] ** 2, v, atol=1e-4)
        np.testing.assert_array_equal(target[k][scored[k]], t.astype(np.float32))


# ---------------------------------------------------------------- synthetic recovery

TRUE = dict(q=0.02, r=0.3, slope_var0=0.5)


def simulate(n: int, q: float, r: float, sv0: float, seed: int = 0):
    """Rows of length 12-20 from the local-linear-trend model; half the rows restart once
    (a fresh level and slope, as after a candidate flip) at a random t in [4, length - 4]."""
    rng = np.random.default_rng(seed)
    t_len = 20
    lengths = rng.integers(12, t_len + 1, n)
    cut = np.where(rng.random(n) < 0.5, rng.integers(4, lengths - 3), -1)
    chol = np.linalg.cholesky(q * np.array([[1 / 3, 1 / 2], [1 / 2, 1.0]]))
    y = np.zeros((n, t_len))
    level, slope = rng.normal(0, 3, n), rng.normal(0, math.sqrt(sv0), n)
    for t in range(t_len):
        if t > 0:
            w = rng.standard_normal((n, 2)) @ chol.T
            level, slope = level + slope + w[:, 0], slope + w[:, 1]
        new = cut == t
        level = np.where(new, rng.normal(0, 3, n), level)
        slope = np.where(new, rng.normal(0, math.sqrt(sv0), n), slope)
        y[:, t] = level + rng.normal(0, math.sqrt(r), n)
    valid = np.arange(t_len)[None] < lengths[:, None]
    restart = (np.arange(t_len)[None] == 0) | (np.arange(t_len)[None] == cut[:, None])
    return np.where(valid, y, 0.0).astype(np.float32), valid, restart


def test_fit_recovers_known_q_r_from_wrong_starts():
    y, valid, restart = simulate(2000, TRUE["q"], TRUE["r"], TRUE["slope_var0"])
    wrong = [(10 * TRUE["q"], 10 * TRUE["r"], 10 * TRUE["slope_var0"]),
             (TRUE["q"] / 10, TRUE["r"] / 10, TRUE["slope_var0"] / 10)]
    filt, m = fit_ce_filter(y, valid, restart, horizons=(1, 2), steps=400, lr=0.05,
                            starts=wrong)
    # measured (2000 rows, seeds 0-3): q 0.0189-0.0202, r 0.295-0.300, slope_var0 0.485-0.516
    # (seed 0: 0.0201, 0.300, 0.516); both starts end at the same point.
    rel = {k: abs(getattr(filt, k) / v - 1) for k, v in TRUE.items()}
    assert rel["q"] < 0.15 and rel["r"] < 0.05 and rel["slope_var0"] < 0.2, (filt, rel)
    for run in m["runs"]:
        assert abs(run["q"] / TRUE["q"] - 1) < 0.15 and abs(run["r"] / TRUE["r"] - 1) < 0.05
    truth = float(predictive_log_likelihood(CEParams(**TRUE), y, valid, restart, (1, 2)))
    assert m["loglik_fit"] >= truth - 1e-4
    assert m["loglik_fit"] > m["loglik_init"]
    assert m["n_scored"] == [int(s.sum()) for s in np.asarray(
        forecasts(CEFilter(), y, valid, restart, (1, 2))[3])]
    # the tolerance has teeth: ignoring the restarts (level jumps scored as process noise)
    # moves q out of it
    bad, _ = fit_ce_filter(y, valid, restart & False, horizons=(1, 2), steps=400, lr=0.05,
                           starts=wrong[:1])
    assert abs(bad.q / TRUE["q"] - 1) > 0.15, bad


# ---------------------------------------------------------------- observation sequences

def hand_trace():
    """S = 7 steps, B = 2 rows, Lb = 3, two blocks (answer length 6); step 6 did not run.
    Observations (row, answer position) -> [(step, candidate, confidence)]."""
    obs = {
        (0, 0): [(0, 5, 0.3), (1, 5, 0.5), (2, 7, 0.6)],        # flip at t = 2
        (0, 1): [(0, 8, 0.95)],                                 # committed at once
        (0, 2): [(0, 3, 0.2), (1, 3, 0.7)],
        (0, 3): [(3, 4, 0.4), (4, 9, 0.45), (5, 4, 0.8)],       # flips at t = 1 and t = 2
        (0, 4): [(3, 2, 0.1), (4, 2, 0.2)],
        (1, 0): [(0, 6, 0.5), (1, 6, 0.55)],
        (1, 2): [(0, 1, 0.9)],
        (1, 4): [(3, 2, 0.3), (4, 2, 0.35), (5, 2, 0.9)],
        (1, 5): [(3, 6, 0.6), (4, 6, 0.61), (5, 6, 0.62)],
    }
    s, b, lb = 7, 2, 3
    tr = dict(candidate=np.zeros((s, b, lb), np.int32),
              confidence=np.full((s, b, lb), -np.inf, np.float32),
              masked=np.zeros((s, b, lb), bool), commit=np.zeros((s, b, lb), bool),
              block=np.array([0, 0, 0, 1, 1, 1, -1], np.int32))
    for (row, pos), seq in obs.items():
        for i, (step, cand, conf) in enumerate(seq):
            j = pos % lb
            tr["candidate"][step, row, j] = cand
            tr["confidence"][step, row, j] = conf
            tr["masked"][step, row, j] = True
            tr["commit"][step, row, j] = i == len(seq) - 1
    # the step that did not run holds garbage: it must be ignored
    tr["masked"][6] = True
    tr["confidence"][6] = 0.5
    return tr, obs


def logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def test_observation_sequences_hand_made_trace():
    tr, obs = hand_trace()
    seqs = observation_sequences(tr, min_observations=1, row_offset=10)
    got = {(int(r) - 10, int(p)): i for i, (r, p) in enumerate(zip(seqs.row, seqs.position))}
    assert set(got) == set(obs)
    assert seqs.y.shape == (len(obs), 3)
    for key, seq in obs.items():
        i = got[key]
        n = len(seq)
        assert seqs.valid[i].tolist() == [True] * n + [False] * (3 - n)
        np.testing.assert_allclose(seqs.y[i, :n], [logit(c) for _, _, c in seq], atol=1e-4)
        cands = [c for _, c, _ in seq]
        want = [t == 0 or cands[t] != cands[t - 1] for t in range(n)]
        assert seqs.restart[i, :n].tolist() == want, key
    i = got[(0, 3)]
    assert seqs.restart[i].tolist() == [True, True, True]
    i = got[(0, 0)]
    assert seqs.restart[i].tolist() == [True, False, True]
    # committed positions stop contributing; single observations are dropped by default
    default = observation_sequences(tr)
    assert sorted(zip(default.row.tolist(), default.position.tolist())) == sorted(
        k for k, v in obs.items() if len(v) >= 2)
    # a positions mask keeps only the selected answer positions
    keep = np.zeros((2, 6), bool)
    keep[0, 3] = keep[1, 5] = True
    sel = observation_sequences(tr, positions=keep)
    assert sorted(zip(sel.row.tolist(), sel.position.tolist())) == [(0, 3), (1, 5)]
    # concat pads T; split is by row
    both = concat_sequences([sel, seqs])
    assert both.y.shape == (2 + len(obs), 3) and not both.valid[:2, 3:].any()
    fit, val = split_sequences(default, 0.5, seed=1)
    assert set(fit.row.tolist()).isdisjoint(val.row.tolist())
    assert len(fit.row) + len(val.row) == len(default.row) and len(val.row) > 0


# ---------------------------------------------------------------- choose_z_h

def test_choose_z_h_coverage_is_a_direct_count():
    y, valid, restart = small_case(3)
    q, r, sv0 = 0.3, 0.5, 1.0
    zs, hs = (0.5, 1.0, 2.0), (1, 2)
    table, rec = choose_z_h(CEParams(q, r, sv0), y, valid, restart, zs=zs, horizons=hs,
                            threshold=0.9)
    assert len(table) == len(zs) * len(hs)
    for row in table:
        pts, _ = ref_forecasts(q, r, sv0, y.astype(np.float64), valid, restart, row["h"])
        hits = sum(t >= m - row["z"] * math.sqrt(v) for m, v, t in pts)
        assert row["n"] == len(pts)
        assert row["coverage"] == pytest.approx(hits / len(pts), abs=1e-12)
        assert row["nominal"] == pytest.approx(0.5 * (1 + math.erf(row["z"] / math.sqrt(2))))
        assert row["gap"] == pytest.approx(row["coverage"] - row["nominal"])
    # the stated rule: z = the smallest calibrated z at the recommended h
    if rec["calibrated"]:
        ok = [t["z"] for t in table if t["h"] == rec["h"] and t["coverage"] >= t["nominal"]]
        assert rec["z"] == min(ok)
    # an over-wide filter (huge r) covers everything: z = the smallest on the grid
    _, rec_wide = choose_z_h(CEParams(q, 1e3, sv0), y, valid, restart, zs=zs, horizons=hs)
    assert rec_wide["calibrated"] and rec_wide["z"] == 0.5


# ---------------------------------------------------------------- a real trace

@pytest.mark.parametrize("kind", ["peaked", "flat"])
def test_sequences_reproduce_the_decode_time_filter(kind):
    """On a real `generate(trace=True)` trace, the filter run on the extracted sequences ends
    each position in exactly the state `features.update_trajectory` (the decode loop's update)
    leaves it in."""
    import dataclasses

    import jax.numpy as jnp

    from controllers.baselines import LowConfidence
    from dllm_jax.decode import generate
    from dllm_jax.features import update_trajectory
    from dllm_jax.state import Features, Trajectory
    from tests.controller_props import CFG, GEN, PARAMS, prompts

    gen = dataclasses.replace(GEN, steps=GEN.gen_length)           # one token per step
    prompt, ok = prompts()
    out = generate(PARAMS[kind], CFG, prompt, gen, LowConfidence(), prompt_valid=ok)
    tr = {k: np.asarray(v) for k, v in out.stats.trace.items()}
    filt = CEFilter(q=0.1, r=0.3, slope_var0=0.7)
    traj = Trajectory.zeros(prompt.shape[0], gen.gen_length)
    lb = gen.block_length
    for s in range(int(out.stats.steps)):
        a0 = int(tr["block"][s]) * lb
        feats = Features(**{k: jnp.asarray(tr[k][s]) for k in
                            ("candidate", "confidence", "entropy", "margin", "masked")})
        traj = traj.write_window(a0, update_trajectory(traj.window(a0, lb), feats, 0.5, filt))
    seqs = observation_sequences(tr, min_observations=1)
    assert len(seqs.row) == prompt.shape[0] * gen.gen_length     # every position observed
    mean, _, _, _ = (np.asarray(a) for a in forecasts(filt, seqs.y, seqs.valid, seqs.restart,
                                                       (1, 2)))
    last = seqs.valid.sum(1) - 1
    n = np.arange(len(last))
    level = 2 * mean[0, n, last] - mean[1, n, last]
    slope = mean[1, n, last] - mean[0, n, last]
    want = np.asarray(traj.ce_mean)[seqs.row, seqs.position]
    np.testing.assert_allclose(level, want[:, 0], atol=1e-4)
    np.testing.assert_allclose(slope, want[:, 1], atol=1e-4)
    flips = np.asarray(traj.flips)[seqs.row, seqs.position]
    np.testing.assert_array_equal(seqs.restart.sum(1) - 1, flips)
    np.testing.assert_array_equal(seqs.valid.sum(1),
                                  np.asarray(traj.observed)[seqs.row, seqs.position])
