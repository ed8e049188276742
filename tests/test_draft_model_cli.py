"""`--draft-model DIR` in `dllm-jax batch` and `dllm-jax bench quality` (issue 13): batch gives
generate's answers with the same draft model, the draft is part of batch's recorded settings
(a resume with another one, or none, is refused naming the flag), bench drafts with it for the
simsd settings only, and the misuses are one-line errors before any work. Tiny random LLaDA
target and a smaller draft over the task tokenizer, float32 on CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import pytest

from dllm_jax import session
from dllm_jax.checkpoint import save_model
from dllm_jax.cli import main
from dllm_jax.config import ModelConfig
from dllm_jax.models import init_params
from dllm_jax.tasks.vocab import build_task_tokenizer

SIMSD = ["--gen-length", "8", "--block-length", "4", "--controller", "simsd"]
PROMPTS = [[5, 9, 13, 4], [7, 7, 21, 6]]          # one length: one compile per command


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(target, draft): model folders with the task tokenizer, the draft a smaller model."""
    root = tmp_path_factory.mktemp("draft")
    tok = build_task_tokenizer(root / "tok")
    files = {n: root / "tok" / n for n in ("tokenizer.json", "tokenizer_config.json")}
    ids = dict(vocab_size=tok.vocab_size, mask_token_id=tok.token_id("mask_token"),
               eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    target = ModelConfig.tiny("llada", hidden_size=32, intermediate_size=64, num_heads=4,
                              num_kv_heads=4, head_dim=8, **ids)
    draft = ModelConfig.tiny("llada", hidden_size=16, intermediate_size=32, num_layers=1,
                             num_heads=2, num_kv_heads=2, head_dim=8, **ids)
    return (save_model(root / "target", target, init_params(target, jax.random.key(4), std=0.6),
                       extra_files=files),
            save_model(root / "draft", draft, init_params(draft, jax.random.key(5), std=0.6),
                       extra_files=files))


def _input(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt_ids": p}) + "\n"
                            for i, p in enumerate(PROMPTS)))
    return path


def _one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_batch_draft_model_equals_generate_and_is_in_the_settings(
        models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    target, draft = models
    seen: list[Any] = []
    real = session.Session.generate_ids

    def spy(self: Any, ids: Any, valid: Any, gen: Any, controller: Any, key: Any = None,
            draft: Any = None) -> Any:
        seen.append(None if draft is None else draft.model_dir)
        return real(self, ids, valid, gen, controller, key, draft)

    monkeypatch.setattr(session.Session, "generate_ids", spy)
    inp, out = _input(tmp_path / "p.jsonl"), tmp_path / "a.jsonl"
    argv = ["batch", "--model", str(target), "--input", str(inp), "--output", str(out),
            "--batch-size", "2", "--bucket", "4", "--quiet", *SIMSD, "--draft-model", str(draft)]
    assert main(argv) == 0
    assert seen == [draft]                                   # one batch, drafted by DIR
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for i, ids in enumerate(PROMPTS):
        assert main(["generate", "--model", str(target), "--prompt-ids",
                     ",".join(map(str, ids)), *SIMSD, "--draft-model", str(draft), "--json"]) == 0
        want = json.loads(capsys.readouterr().out)
        assert {k: got[f"p{i}"][k] for k in want} == want    # tokens, text, nfe, steps
    assert seen == [draft] * 3
    sidecar = json.loads((tmp_path / "a.jsonl.settings.json").read_text())
    assert sidecar["settings"]["--draft-model"] == str(draft.absolute())

    # Resume: the same draft has nothing left to do; another one, or none, is refused.
    assert main(argv) == 0
    other = tmp_path / "draft2"
    shutil.copytree(draft, other)
    before = out.read_bytes()
    capsys.readouterr()
    assert main([*argv[:-1], str(other)]) == 2
    _one_line_error(capsys, "--draft-model (was", str(other), "--force-new-settings")
    assert main(argv[:-2]) == 2
    _one_line_error(capsys, "--draft-model (was", "now null")
    assert out.read_bytes() == before and seen == [draft] * 3   # nothing decoded


@pytest.mark.parametrize("cmd", ["batch", "bench"])
def test_misuse_is_one_line_before_any_work(models: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch, cmd: str) -> None:
    target, draft = models

    def no_work(*a: Any, **k: Any) -> None:
        raise AssertionError("a model was loaded before the --draft-model check")

    monkeypatch.setattr(session, "load", no_work)
    inp, out = _input(tmp_path / "p.jsonl"), tmp_path / "a.jsonl"
    if cmd == "batch":
        base = ["batch", "--model", str(target), "--input", str(inp), "--output", str(out),
                *SIMSD[:-1]]
        plain, spec = ["threshold"], ["simsd"]
    else:
        base = ["bench", "quality", "--model", str(target), "--tasks", "copy", "--n", "2",
                "--gen-length", "8", "--settings"]
        plain, spec = ["llada k=8,threshold 0.9"], ["simsd"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*base, *plain, "--draft-model", str(draft)]) == 2
    _one_line_error(capsys, "--draft-model is used only by", "simsd")
    assert main([*base, *spec, "--draft-model", str(tmp_path / "nope")]) == 2
    _one_line_error(capsys, "--draft-model", "does not exist")
    assert main([*base, *spec, "--draft-model", str(empty)]) == 2
    _one_line_error(capsys, "--draft-model", "not a converted dllm-jax checkpoint")
    assert not out.exists() and not Path(str(out) + ".settings.json").exists()


def test_bench_drafts_for_the_simsd_settings_only(models: tuple[Path, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from dllm_jax import decode

    target, draft = models
    calls: list[tuple[str, bool]] = []
    real = decode.generate

    def spy(*a: Any, **k: Any) -> Any:
        calls.append((type(a[4]).__name__, k.get("draft_cfg") is not None))
        return real(*a, **k)

    monkeypatch.setattr(decode, "generate", spy)
    js, md = tmp_path / "q.json", tmp_path / "q.md"
    assert main(["bench", "quality", "--model", str(target), "--tasks", "copy", "--n", "2",
                 "--gen-length", "8", "--settings", "llada k=8,simsd", "--quiet",
                 "--draft-model", str(draft), "--json", str(js), "--out", str(md)]) == 0
    assert calls == [("LowConfidence", False), ("SimSD", True)]
    records = json.loads(js.read_text())
    assert [d["setting"] for d in records] == ["llada k=8", "simsd"]
    assert len({tuple(d) for d in records}) == 1            # one schema for both settings
    assert f"draft with the model {draft}" in md.read_text()
