"""dllm_jax.viz on a real traced decode of the bundled model (CPU, two rows, 32 tokens)."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from controllers import make_controller  # noqa: E402
from dllm_jax import session, viz  # noqa: E402
from dllm_jax.config import GenerateConfig  # noqa: E402

PROMPTS = ["sort: 9 4 7 1", "reverse: Eve Bob Zoe"]


@pytest.fixture(scope="module")
def decoded():
    s = session.load()
    gen = GenerateConfig(gen_length=32, block_length=16, steps=32, trace=True)
    ids, valid = s.pad([s.encode(p) for p in PROMPTS])
    out = s.generate_ids(ids, valid, gen, make_controller("low_confidence"))
    return s, out


def test_canvas_frames_one_per_step_and_last_is_the_answer(decoded) -> None:
    s, out = decoded
    answers = s.answers(out)
    steps = int(out.stats.steps)
    for row, answer in enumerate(answers):
        frames = viz.canvas_frames(s, out, row=row)
        assert len(frames) == steps
        plain = viz.canvas_frames(s, out, row=row, mark=False)
        assert plain[-1] == answer.text
        # low_confidence commits one token per step: at most one bracketed token per frame,
        # and the first commit is always visible (nothing before it can cut the frame).
        assert all(f.count("[") <= 1 for f in frames)
        assert frames[0].count("[") == 1
        assert re.sub(r"\[|\]", "", frames[-1].replace(viz.EOS_MARK, "")).split() == \
            answer.text.split()
        assert viz.MASK in frames[0]
        # a position once shown never changes back to a mask
        shown = [f.split().count(viz.MASK) for f in plain]
        assert shown[0] >= shown[-1]


def test_commit_heatmap_values_are_fix_step(decoded) -> None:
    _, out = decoded
    ax = viz.commit_heatmap(out)
    data = np.ma.filled(ax.images[0].get_array(), -1)
    np.testing.assert_array_equal(data, np.asarray(out.stats.fix_step))
    assert ax.images[0].get_array().shape == (len(PROMPTS), 32)


def test_confidence_trajectories_follow_the_trace(decoded, tmp_path) -> None:
    _, out = decoded
    fix = np.asarray(out.stats.fix_step)[0]
    ax = viz.confidence_trajectories(out, [0, 3, 17])
    y = viz.position_confidence(out, 0)
    assert len(y) == int(out.stats.steps)
    k = int(fix[0])
    assert np.isfinite(y[: k + 1]).all() and np.isnan(y[k + 1:]).all()
    assert np.all((y[: k + 1] >= 0) & (y[: k + 1] <= 1))
    # position 17 lies in the second block: no value before that block started
    y17 = viz.position_confidence(out, 17)
    assert np.isnan(y17[:16]).all()
    assert len(ax.lines) >= 3
    path = viz.save_figure(ax.figure, tmp_path / "traj.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["traj.png"]   # no temp file left


def test_trace_png_and_untraced_error(decoded, tmp_path) -> None:
    s, out = decoded
    path = viz.trace_png(out, tmp_path / "heat.png")
    assert open(path, "rb").read(4) == b"\x89PNG"
    untraced = out.replace(stats=out.stats.replace(trace=None))
    with pytest.raises(viz.VizError, match="trace=True"):
        viz.position_confidence(untraced, 0)
    assert len(viz.canvas_frames(s.tokenizer, untraced, eos_id=s.cfg.eos_token_id)) == int(
        out.stats.steps)


def test_generate_cli_show_steps_and_trace_png(tmp_path) -> None:
    import subprocess
    import sys

    png = tmp_path / "trace.png"
    r = subprocess.run([sys.executable, "-m", "dllm_jax.cli", "generate", "sort: 9 4 7 1",
                        "--show-steps", "--trace-png", str(png)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert len(steps) == 32 and lines[-1] == "1 4 7 9"     # the answer is the last line
    assert steps[-1].split(": ", 1)[1].replace("[", "").replace("]", "") == lines[-1]
    from matplotlib import image

    h, w = image.imread(png).shape[:2]
    assert png.read_bytes()[:4] == b"\x89PNG" and w > 300 and 100 < h < w
