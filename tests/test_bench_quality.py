"""`dllm-jax bench quality` on a tiny random task model: rows, tables, plot, bad input."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

from dllm_jax.bench.quality import Setting, evaluate, format_table, plot, summary_by_dependency
from dllm_jax.checkpoint import save_model
from dllm_jax.cli import main
from dllm_jax.config import ModelConfig
from dllm_jax.models import init_params
from dllm_jax.tasks.vocab import build_task_tokenizer


@pytest.fixture(scope="module")
def task_model(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("qmodel")
    tok = build_task_tokenizer(root)
    cfg = ModelConfig.tiny("llada", vocab_size=tok.vocab_size, mask_token_id=2, eos_token_id=1,
                           pad_token_id=0)
    params = init_params(cfg, jax.random.key(0), std=0.3)
    model_dir = root / "model"
    save_model(model_dir, cfg, params)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_text((root / name).read_text())
    return model_dir, cfg, params, tok


def test_rows_and_tables(task_model) -> None:
    _, cfg, params, tok = task_model
    settings = [Setting("llada k=1", "llada fixed k", "low_confidence", (), 1),
                Setting("llada k=4", "llada fixed k", "low_confidence", (), 4),
                Setting("threshold 0.9", "fast-dllm threshold", "threshold", (("threshold", 0.9),))]
    rows = evaluate(params, cfg, tok, ["reverse", "add"], settings, n=6, gen_length=8,
                    batch_size=4)
    assert [(r.task, r.setting) for r in rows] == [(t, s.label) for t in ("reverse", "add")
                                                   for s in settings]
    by = {(r.task, r.setting): r for r in rows}
    # Fixed schedules: k tokens per step exactly (every row starts with 8 MASKs).
    assert by[("reverse", "llada k=1")].nfe == 8 and by[("reverse", "llada k=4")].nfe == 2
    assert by[("add", "llada k=4")].tokens_per_forward == 4
    for r in rows:
        assert r.n == 6 and 0 <= r.accuracy <= 100 and 0 <= r.partial <= 1
        assert r.exact <= r.accuracy  # an exact answer is a valid one
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| reverse | low | llada k=4 |" in table
    assert "low dep. acc %" in summary_by_dependency(rows)


def test_plot_is_png(task_model, tmp_path: Path) -> None:
    _, cfg, params, tok = task_model
    rows = evaluate(params, cfg, tok, ["copy"],
                    [Setting("llada k=1", "llada fixed k", "low_confidence", (), 1),
                     Setting("llada k=2", "llada fixed k", "low_confidence", (), 2)],
                    n=3, gen_length=8)
    path = tmp_path / "q.png"
    plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))


def test_cli(task_model, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir = task_model[0]
    out = tmp_path / "q.md"
    rc = main(["bench", "quality", "--model", str(model_dir), "--tasks", "copy",
               "--settings", "llada k=1,threshold 0.9", "--n", "2", "--gen-length", "8",
               "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    assert "| copy | low | llada k=1 | 2 |" in text and "| copy | low | threshold 0.9 | 2 |" in text
    capsys.readouterr()
    assert main(["bench", "quality", "--model", str(model_dir), "--tasks", "nope"]) == 2
    assert "unknown tasks" in capsys.readouterr().err
    assert main(["bench", "quality", "--model", str(model_dir), "--settings", "k=99"]) == 2
    assert "unknown settings" in capsys.readouterr().err


def test_tspd_targets_table() -> None:
    from dllm_jax.bench.quality import Row, tspd_targets

    def row(task: str, dep: str, setting: str, acc: float, nfe: float) -> Row:
        return Row(task, dep, setting, "f", 10, acc, acc, 1.0, nfe, 32 / nfe)

    rows = [row("shuffle", "high", "llada k=1", 100, 32), row("copy", "low", "llada k=1", 100, 32),
            row("shuffle", "high", "threshold 0.9", 90, 10), row("copy", "low", "threshold 0.9", 100, 10),
            row("shuffle", "high", "tspd+ce tau=0.5", 99, 6), row("copy", "low", "tspd+ce tau=0.5", 100, 6),
            row("shuffle", "high", "tspd+ce tau=0.9", 95, 9), row("copy", "low", "tspd+ce tau=0.9", 100, 9)]
    text = tspd_targets(rows)
    assert "| tspd+ce tau=0.5 | 99.5 | 6.00 | 40.0% | yes | 1.0 | yes |" in text
    assert "| tspd+ce tau=0.9 | 97.5 | 9.00 | 10.0% | yes | 5.0 | no |" in text
