"""dllm_jax.viz_controllers on traced decodes of the bundled model: CE's forecast band, TSPD's
p(converged) replayed from the trace, and the dependency cliff from benchmark records."""

from __future__ import annotations

import numpy as np
import pytest

from controllers import make_controller
from dllm_jax import session, viz
from dllm_jax import viz_controllers as vc
from dllm_jax.config import GenerateConfig

PROMPTS = ["shuffle: Quinn Uma Rupert Carol", "reverse: Eve Bob Zoe"]
GEN = GenerateConfig(gen_length=32, block_length=32, steps=32, trace=True)


@pytest.fixture(scope="module")
def sess():
    return session.load()


def _decode(s, ctrl):
    ids, valid = s.pad([s.encode(p) for p in PROMPTS])
    return s.generate_ids(ids, valid, GEN, ctrl)


def test_ce_band_draws_the_traced_confidences(sess) -> None:
    out = _decode(sess, make_controller("low_confidence"))
    fix = np.asarray(out.stats.fix_step)[0]
    pos = int(np.argmax(fix))                       # the last committed: observed longest
    ax = vc.ce_forecast_band(out, pos, horizon=2, z=1.0)
    observed = ax.lines[0].get_ydata()
    want = viz.position_confidence(out, pos)
    np.testing.assert_allclose(observed, want[~np.isnan(want)], rtol=1e-5)
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert np.ptp(band) > 0 and len(observed) == int(fix[pos]) + 1
    with pytest.raises(viz.VizError, match="never observed"):
        vc.ce_forecast_band(out, GEN.gen_length + 5)      # outside the answer


def test_tspd_probability_replays_the_decisions(sess) -> None:
    tspd = make_controller("tspd", model_dir=str(sess.model_dir), tau=0.9)
    out = _decode(sess, tspd)
    fix = np.asarray(out.stats.fix_step)[0]
    positions = [int(p) for p in np.argsort(-fix)[:4]]
    ax = vc.tspd_probability(out, tspd, GEN, positions)
    curves = [ln for ln in ax.lines if str(ln.get_label()).startswith("pos ")]
    assert len(curves) == len(positions)
    for pos, line in zip(positions, curves):
        p = line.get_ydata()
        before = p[:fix[pos]]
        before = before[~np.isnan(before)]
        # TSPD commits every masked token with p >= tau: none exceeded it before its commit
        assert (before < tspd.tau).all(), (pos, before)
        assert not np.isnan(p[fix[pos]])


def test_dependency_cliff_one_line_per_task() -> None:
    recs = [{"task": t, "dependency": d, "setting": f"llada k={k}", "nfe_mean": 32 / k,
             "accuracy": a}
            for t, d, accs in (("copy", "low", (1, 1, 1)), ("shuffle", "high", (1, .5, .3)))
            for k, a in zip((1, 2, 4), accs)]
    recs.append({"task": "copy", "dependency": "low", "setting": "threshold 0.9",
                 "nfe_mean": 3.0, "accuracy": 1.0})
    ax = vc.dependency_cliff(recs)
    lines = [ln for ln in ax.lines if len(ln.get_xdata())]
    assert len(lines) == 2
    assert sorted(lines[1].get_ydata().tolist()) == [30.0, 50.0, 100.0]
    with pytest.raises(viz.VizError, match="no records"):
        vc.dependency_cliff(recs, family="dream")
