"""Progress on long work (README, "Errors are sentences"; issue: progress bars): a bar on a
terminal only, nothing of it in logs or with --quiet, and one summary line at the end."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dllm_jax import cli, progress
from dllm_jax.train.loop import Progress
from tests.hf_checkpoints import hf_config, random_state_dict, write_hf_checkpoint


class Terminal(io.StringIO):
    """A text stream that says it is a terminal, so that tqdm draws on it."""

    def isatty(self) -> bool:
        return True


def test_bar_draws_only_on_a_terminal_and_not_when_quiet() -> None:
    for stream, quiet, drawn in ((Terminal(), False, True), (Terminal(), True, False),
                                 (io.StringIO(), False, False)):
        with progress.bar(10, "work", quiet=quiet, stream=stream, mininterval=0) as b:
            for _ in range(10):
                b.update(1)
        text = stream.getvalue()
        assert ("work" in text and "10/10" in text) == drawn, (quiet, text)
        if not drawn:
            assert text == ""


def test_summary_and_line() -> None:
    out = io.StringIO()
    progress.summary("done: 3 rows", stream=out)
    progress.summary("hidden", quiet=True, stream=out)
    progress.line("a line", stream=out)
    assert out.getvalue() == "done: 3 rows\na line\n"


def test_training_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere() -> None:
    tty, log = Terminal(), io.StringIO()
    for stream in (tty, log):
        p = Progress(20, stream, tokens_per_step=100)
        p.start(0)
        p.update(10, 1.5, 1e-3)
        p.update(20, 1.25, 1e-3)
        p.close()
    assert "train" in tty.getvalue() and "loss 1.2500" in tty.getvalue()
    assert "\r" in tty.getvalue()
    lines = log.getvalue().splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == ["step 10/20", "step 20/20"]
    assert "\r" not in log.getvalue()


def _hf_source(tmp_path: Path) -> Path:
    hfc = hf_config("llada")
    sd = random_state_dict("llada", hfc, seed=0, dtype=np.float32)
    return write_hf_checkpoint(tmp_path / "hf", sd, hfc, fmt="safetensors")


def test_convert_draws_a_byte_bar_on_a_terminal_and_is_silent_with_quiet(
        tmp_path: Path, monkeypatch, capsys) -> None:
    src = _hf_source(tmp_path)
    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    assert cli.main(["convert", str(src), str(tmp_path / "a"), "--dtype", "float32"]) == 0
    text = term.getvalue()
    assert "\rconvert:" in text                          # the bar was drawn
    assert text.rstrip().splitlines()[-1].startswith("wrote ")  # the summary line is last
    quiet = Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    assert cli.main(["convert", str(src), str(tmp_path / "b"), "--quiet"]) == 0
    assert quiet.getvalue() == ""


def test_train_quiet_prints_nothing(tmp_path: Path, capsys) -> None:
    rc = cli.main(["train", "--out", str(tmp_path / "m"), "--steps", "2", "--batch-size", "4",
                   "--pool-size", "64", "--model-size", "tiny", "--quiet"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    assert (tmp_path / "m" / "dllm_config.json").exists()
