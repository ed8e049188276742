"""r2_centred (our earlier R2 design) rules: the spatial score against a loop reference, the spatial and temporal rules on
hand-made steps, and the decode properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controllers import make_controller
from controllers.r2_centred import spatial_score
from dllm_jax.config import GenerateConfig
from dllm_jax.features import update_trajectory
from dllm_jax.state import BlockContext, Features, Trajectory
from tests.controller_props import (check_batch_equals_rows, check_compiles_once,
                                    check_decode_properties)


def _ref_score(conf: np.ndarray, masked: np.ndarray, w: int, agg: str) -> np.ndarray:
    b, lb = conf.shape
    out = np.zeros((b, lb))
    for r in range(b):
        for i in range(lb):
            vals = []
            for j in range(i - w, i + w + 1):
                if j < 0:
                    vals.append(1.0)                    # decoded context left of the block
                elif j < lb:
                    vals.append(conf[r, j] if masked[r, j] else 1.0)
            out[r, i] = min(vals) if agg == "min" else sum(vals) / len(vals)
    return out


@pytest.mark.parametrize("w", [0, 1, 2, 5])
@pytest.mark.parametrize("agg", ["mean", "min"])
def test_spatial_score_matches_loop_reference(w: int, agg: str) -> None:
    rng = np.random.default_rng(w)
    conf = rng.uniform(0, 1, (3, 9)).astype(np.float32)
    masked = rng.random((3, 9)) < 0.6
    got = spatial_score(jnp.asarray(np.where(masked, conf, -np.inf)), jnp.asarray(masked), w, agg)
    np.testing.assert_allclose(np.asarray(got), _ref_score(conf, masked, w, agg), rtol=1e-6)


def _run(ctrl, seq):
    lb = len(seq[0][0])
    traj = Trajectory.zeros(1, lb)
    out = []
    for t, (cand, conf, masked) in enumerate(seq):
        z = jnp.zeros((1, lb), jnp.float32)
        f = Features(candidate=jnp.asarray([cand], jnp.int32),
                     confidence=jnp.asarray([np.where(masked, conf, -np.inf)], jnp.float32),
                     entropy=z, margin=z, masked=jnp.asarray([masked]))
        traj = update_trajectory(traj, f)
        ctx = BlockContext(step=jnp.int32(t), block_step=jnp.int32(t), block=jnp.int32(0),
                           masked_at_block_start=jnp.array([lb]), active=jnp.array([True]),
                           key=jax.random.key(0), steps_per_block=64)
        out.append(np.asarray(jax.jit(ctrl.decide)(f, traj, ctx, ())[0][0]))
    return out


def test_spatial_rule_clusters_commit_isolated_tokens_wait() -> None:
    r2 = make_controller("r2_centred", threshold=0.9, window=1, floor=0.7, temporal=False)
    m = [True] * 8
    # 0..3: a confident cluster with a 0.86 inside; 6: an isolated 0.95 among 0.3s.
    conf = [0.95, 0.86, 0.97, 0.96, 0.3, 0.3, 0.95, 0.3]
    (c,) = _run(r2, [(list(range(8)), conf, m)])
    assert c[:3].tolist() == [True, True, True], "the cluster (with its 0.86) commits together"
    assert not c[3], "the cluster's edge next to an ambiguous token waits"
    assert not c[6], "an isolated confident token among ambiguous neighbours waits"
    assert not c[4:].any()
    # A weak token never rides on decoded neighbours: the floor stops it.
    masked = jnp.asarray([[False, False, False, True, False, False, False, True]])
    conf2 = jnp.asarray([[-jnp.inf] * 3 + [0.6] + [-jnp.inf] * 3 + [0.2]])
    z = jnp.zeros((1, 8))
    f = Features(candidate=jnp.zeros((1, 8), jnp.int32), confidence=conf2, entropy=z,
                 margin=z, masked=masked)
    wide = r2.replace(window=3)
    score = float(spatial_score(conf2, masked, 3)[0, 3])
    assert score == pytest.approx((6 + 0.6) / 7)
    assert not bool(wide.rules(f, Trajectory.zeros(1, 8))["spatial"][0, 3])
    assert bool(wide.replace(floor=0.5).rules(f, Trajectory.zeros(1, 8))["spatial"][0, 3])
    # The threshold rule would commit the isolated token and not the 0.86.
    (t,) = _run(make_controller("threshold", threshold=0.9), [(list(range(8)), conf, m)])
    assert t[6] and not t[1]


def test_temporal_rule_finalises_stable_tokens() -> None:
    r2 = make_controller("r2_centred", threshold=0.9, k=3, temporal_floor=0.7, spatial=False)
    # 0: stable candidate at 0.75; 1: stable at 0.6 (below the floor); 2: candidate 3, 4, 3,
    # 3, 3 at 0.8; 3: a confident filler (threshold commit, so no fallback commit is needed).
    cands = [3, 4, 3, 3, 3]
    seq = [([1, 2, cands[t], 5], [0.75, 0.6, 0.8, 0.95], [True] * 4) for t in range(5)]
    out = _run(r2, seq)
    assert [bool(c[0]) for c in out] == [False, False, True, True, True]  # stable >= 3 from t=2
    assert not any(bool(c[1]) for c in out)
    assert [bool(c[2]) for c in out] == [False, False, False, False, True]
    assert all(bool(c[3]) for c in out)
    # Without the temporal rule only the filler commits.
    off = _run(r2.replace(temporal=False), seq)
    assert all(c.tolist() == [False, False, False, True] for c in off)


def test_rules_off_is_the_threshold_rule() -> None:
    rng = np.random.default_rng(0)
    seq = [(list(rng.integers(0, 2, 8)), list(rng.uniform(0.4, 1.0, 8)), list(rng.random(8) < 0.8))
           for _ in range(6)]
    a = _run(make_controller("r2_centred", threshold=0.8, spatial=False, temporal=False), seq)
    b = _run(make_controller("threshold", threshold=0.8), seq)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["peaked", "flat"])
@pytest.mark.parametrize("kwargs", [dict(), dict(threshold=0.5, window=2, agg="min", k=2),
                                    dict(threshold=0.99, window=0, temporal_floor=0.0)])
def test_r2_decode_properties(kind: str, kwargs: dict) -> None:
    check_decode_properties(make_controller("r2_centred", **kwargs), kind)


def test_r2_batch_equals_rows_and_compiles_once() -> None:
    ctrl = make_controller("r2_centred", threshold=0.5)
    check_batch_equals_rows(ctrl)
    check_compiles_once(ctrl)


def test_r2_composes_with_cache() -> None:
    gen = GenerateConfig(gen_length=16, block_length=8, steps=8, trace=True, cache="dual")
    check_decode_properties(make_controller("r2_centred", threshold=0.5), "peaked", gen)


def test_r2_validation_messages() -> None:
    for kw, msg in ((dict(window=-1), "window must be an integer >= 0"),
                    (dict(agg="max"), "agg must be one of mean, min"),
                    (dict(k=0), "k must be an integer >= 1"),
                    (dict(floor=1.5), r"floor must be in \[0, 1\]"),
                    (dict(threshold=2.0), "threshold must be in")):
        with pytest.raises(ValueError, match=msg):
            make_controller("r2_centred", **kw)
