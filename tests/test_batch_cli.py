"""`dllm-jax batch`: JSONL in/out, killed mid-run and restarted -> every id exactly once;
malformed lines reported with their line numbers and skipped; answers equal the library's."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from controllers import make_controller
from dllm_jax import batch_cli as B
from dllm_jax.checkpoint import load_model, save_model
from dllm_jax.cli import main
from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.decode import generate
from dllm_jax.models import init_params
from dllm_jax.session import left_pad
from dllm_jax.tasks.vocab import build_task_tokenizer
from dllm_jax.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
GEN_ARGS = ["--gen-length", "8", "--block-length", "4", "--steps", "8",
            "--controller", "threshold", "--threshold", "0.5", "--cache", "dual"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batch")
    tok = build_task_tokenizer(root / "tok")
    cfg = ModelConfig.tiny("llada", vocab_size=tok.vocab_size, hidden_size=32,
                           intermediate_size=64, num_heads=4, num_kv_heads=4, head_dim=8,
                           mask_token_id=tok.token_id("mask_token"), eos_token_id=tok.eos_id,
                           pad_token_id=tok.pad_id)
    params = init_params(cfg, jax.random.key(4), std=0.6)
    return save_model(root / "model", cfg, params, extra_files={
        n: root / "tok" / n for n in ("tokenizer.json", "tokenizer_config.json")})


def _write_input(path: Path) -> list[str]:
    """12 good prompts (lengths 1..21: several buckets); malformed lines 3, 7, 9, 12, 15."""
    lines, ids = [], []
    good = iter(range(12))
    for n in range(1, 18):
        if n == 3:
            lines.append("{this is not json")
        elif n == 7:
            lines.append(json.dumps({"prompt": "no id here"}))
        elif n == 9:
            lines.append(json.dumps({"id": "p0", "prompt_ids": [5, 6]}))  # repeated id
        elif n == 12:
            lines.append(json.dumps({"id": "empty", "prompt_ids": []}))
        elif n == 15:
            lines.append(json.dumps({"id": "both", "prompt": "a", "prompt_ids": [4]}))
        else:
            i = next(good)
            if i % 3 == 0:
                digits = " ".join(str(d % 10) for d in range(i))
                rec = {"id": f"p{i}", "prompt": f"sort: {digits}"}
            else:
                rec = {"id": i if i % 3 == 1 else f"p{i}",
                       "prompt_ids": [4 + (j * 7 + i) % 20 for j in range(2 * i - 1)]}
            ids.append(json.dumps(rec["id"]))
            lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return ids


def _answers(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_kill_and_restart_every_id_once(model_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    want_ids = _write_input(inp)
    argv = ["batch", "--model", str(model_dir), "--input", str(inp), "--output", str(out),
            "--batch-size", "2", "--bucket", "4", *GEN_ARGS]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "dllm_jax.cli", *argv], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.stat().st_size > 0:
            break
        time.sleep(0.01)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, err1 = proc.communicate(timeout=60)
    assert still_running, f"the run ended before it could be killed:\n{err1[-2000:]}"
    first = _answers(out)
    assert 0 < len(first) < len(want_ids), "the kill did not land mid-run"
    # Malformed lines are reported by number before decoding starts, and are not fatal.
    for n in (3, 7, 9, 12, 15):
        assert f"prompts.jsonl:{n}:" in err1, err1
    # A write cut by a kill leaves a partial last line: the restart must drop it.
    with open(out, "a") as f:
        f.write('{"id": "p11", "tokens": [1, 2')

    assert main(argv) == 1                        # 1: lines were rejected
    err2 = capsys.readouterr().err
    assert "partial last line" in err2
    assert f"{len(first)} already in" in err2
    # one summary line: answered / skipped / rejected / seconds
    [summary] = [x for x in err2.splitlines() if " answered, " in x]
    assert re.fullmatch(
        rf"batch: {len(want_ids) - len(first)} answered, {len(first)} skipped \(already in "
        rf".*answers\.jsonl\), 5 of 17 input lines rejected \(reported above\), "
        rf"[0-9.]+ s; {len(want_ids) - len(first)} answers written to .*answers\.jsonl\.",
        summary), summary
    records = _answers(out)
    got = [json.dumps(r["id"]) for r in records]
    assert sorted(got) == sorted(want_ids) and len(got) == len(set(got))
    assert records[:len(first)] == first          # the first run's batches are kept as written

    # A second restart has nothing to do and writes nothing.
    before = out.read_bytes()
    assert main(argv) == 1
    assert out.read_bytes() == before

    # Answers equal the library's decode of each prompt alone (batch and bucket invariance).
    cfg, params = load_model(model_dir)
    tok = Tokenizer.from_dir(model_dir)
    by_id = {json.dumps(r["id"]): r for r in records}
    gen = GenerateConfig(gen_length=8, block_length=4, steps=8, cache="dual")
    for line in inp.read_text().splitlines()[:2]:  # one text prompt, one id prompt
        rec = json.loads(line)
        ids = tok.encode(rec["prompt"]) if "prompt" in rec else rec["prompt_ids"]
        want = generate(params, cfg, np.asarray([ids]), gen,
                        make_controller("threshold", threshold=0.5), key=jax.random.key(0))
        answer = [int(t) for t in np.asarray(want.tokens[0])]
        if cfg.eos_token_id in answer:
            answer = answer[:answer.index(cfg.eos_token_id)]
        assert by_id[json.dumps(rec["id"])]["tokens"] == answer
        assert by_id[json.dumps(rec["id"])]["text"] == tok.decode(answer)


def test_parse_line_errors() -> None:
    assert B.parse_line('{"id": 3, "prompt_ids": [1, 2]}') == (3, None, [1, 2])
    assert B.parse_line('{"id": "a", "prompt": "hi"}') == ("a", "hi", None)
    for bad, words in [("[1]", "not a JSON object"), ("{", "not valid JSON"),
                       ('{"prompt": "x"}', 'no "id"'), ('{"id": 1.5, "prompt": "x"}', "string"),
                       ('{"id": true, "prompt": "x"}', "string"), ('{"id": 1}', "exactly one"),
                       ('{"id": 1, "prompt": "  "}', "non-empty string"),
                       ('{"id": 1, "prompt_ids": [1, "2"]}', "list of integers")]:
        with pytest.raises(ValueError, match=words):
            B.parse_line(bad)


def test_recover_output_truncates_only_a_partial_tail(tmp_path: Path) -> None:
    out = tmp_path / "a.jsonl"
    out.write_text('{"id": 1, "tokens": []}\n{"id": "x", "tokens": []}\n{"id": 2, "tok')
    msgs: list[str] = []
    assert B.recover_output(str(out), msgs.append) == {"1", "x"}
    assert out.read_text().endswith('"x", "tokens": []}\n') and len(msgs) == 1
    assert B.recover_output(str(tmp_path / "missing.jsonl")) == set()


def test_host_slices_partition_the_input(tmp_path: Path) -> None:
    inp = tmp_path / "p.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt_ids": [i + 1]}) + "\n"
                           for i in range(10)))
    seen = []
    for host in range(3):
        seen += [it[1] for it in B.read_input(str(inp), host, 3)]
    assert sorted(seen) == list(range(10))
    assert B.output_path("out.jsonl", 1, 3) == "out.jsonl.1-of-3"
    assert B.output_path("out-{process}.jsonl", 2, 3) == "out-2.jsonl"
    assert B.output_path("out.jsonl", 0, 1) == "out.jsonl"


def test_batches_bucket_by_length() -> None:
    lengths = [9, 1, 5, 2, 8, 3]
    batches = B.make_batches(lengths, 2)
    assert [[lengths[i] for i in b] for b in batches] == [[1, 2], [3, 5], [8, 9]]
    ids, valid = left_pad([[7, 8], [9]], 0, width=4, rows=4)
    assert ids.tolist() == [[0, 0, 7, 8], [0, 0, 0, 9], [0, 0, 7, 8], [0, 0, 7, 8]]
    assert valid.sum(1).tolist() == [2, 1, 2, 2]
    assert B.bucket_length(5, 4) == 8


def test_bad_mesh_is_one_line_error(model_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    inp = tmp_path / "p.jsonl"
    inp.write_text('{"id": 1, "prompt_ids": [4]}\n')
    rc = main(["batch", "--model", str(model_dir), "--input", str(inp), "--output",
               str(tmp_path / "o.jsonl"), "--mesh", "data=3"])
    assert rc == 2
    assert "error: --mesh:" in capsys.readouterr().err


def test_progress_bar_over_rows_and_quiet_summary(model_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the bar counts input rows (one update per batch) instead of per-batch
    lines; --quiet prints nothing when no line is rejected."""
    from dllm_jax import progress

    inp, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt_ids": [4 + i] * (1 + i)}) + "\n"
                           for i in range(5)))
    bars = []

    class Bar:
        def __init__(self, total: int, desc: str, **kwargs: object) -> None:
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, n: int) -> None:
            self.n += n

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(progress, "bar", Bar)
    monkeypatch.setattr(progress, "shows_bar", lambda quiet, stream=None: not quiet)
    argv = ["batch", "--model", str(model_dir), "--input", str(inp), "--output", str(out),
            "--batch-size", "2", "--bucket", "4", *GEN_ARGS]
    assert main(argv) == 0
    err = capsys.readouterr().err
    [bar] = bars
    assert (bar.total, bar.n, bar.closed) == (5, 5, True)
    assert "batch 1/" not in err                 # the bar replaces the per-batch lines
    assert "5 answered, 0 skipped" in err
    out.unlink()
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
