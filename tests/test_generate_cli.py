"""`dllm-jax generate`: the JSON contract on a converted tiny checkpoint, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from controllers import make_controller
from dllm_jax.checkpoint import load_model
from dllm_jax.cli import main
from dllm_jax.config import GenerateConfig
from dllm_jax.decode import generate
from dllm_jax.tasks.vocab import build_task_tokenizer
from dllm_jax.tokenizer import Tokenizer

try:
    from tests.hf_checkpoints import hf_config, random_state_dict, write_hf_checkpoint
except ImportError:  # tests/ not a package
    from hf_checkpoints import hf_config, random_state_dict, write_hf_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    tok = build_task_tokenizer(root / "tok")
    files = {name: (root / "tok" / name).read_text() for name in
             ("tokenizer.json", "tokenizer_config.json")}
    cfg = hf_config("llada", vocab_size=tok.vocab_size, embedding_size=tok.vocab_size,
                    mask_token_id=2, eos_token_id=1, pad_token_id=0)
    src = write_hf_checkpoint(root / "hf", random_state_dict("llada", cfg, seed=3), cfg,
                              extra_files=files)
    dst = root / "model"
    assert main(["convert", str(src), str(dst), "--dtype", "float32", "--quiet"]) == 0
    return dst


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_contract_matches_library(model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = _run(capsys, "generate", "--model", str(model_dir), "--prompt", "sort: 9 4 7 1",
                      "--gen-length", "8", "--block-length", "4", "--steps", "8",
                      "--controller", "threshold", "--threshold", "0.5", "--json")
    assert rc == 0
    result = json.loads(out)
    assert set(result) == {"tokens", "text", "nfe", "steps"}
    cfg, params = load_model(model_dir)
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode("sort: 9 4 7 1")
    want = generate(params, cfg, np.asarray([ids]), GenerateConfig(8, 4, 8),
                    make_controller("threshold", threshold=0.5), key=jax.random.key(0))
    answer = [int(t) for t in np.asarray(want.tokens[0])]
    if cfg.eos_token_id in answer:
        answer = answer[:answer.index(cfg.eos_token_id)]
    assert result["tokens"] == answer
    assert result["text"] == tok.decode(answer)
    assert result["nfe"] == int(want.stats.nfe[0]) and result["steps"] == int(want.stats.steps)


def test_prompt_ids_and_cache(model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = _run(capsys, "generate", "--model", str(model_dir), "--prompt-ids", "5,6,7",
                      "--gen-length", "8", "--cache", "dual", "--json")
    assert rc == 0
    assert len(json.loads(out)["tokens"]) <= 8


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "a", "--prompt-ids", "1"], "exactly one"),
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt", "   "], "empty"),
    (["--prompt-ids", "5", "--controller", "fastest"], "unknown controller"),
    (["--prompt-ids", "5", "--controller", "threshold", "--threshold", "1.5"], "threshold"),
    (["--prompt-ids", "5", "--gen-length", "10", "--block-length", "4"], "multiple"),
    (["--prompt-ids", "5", "--cache", "triple"], "cache"),
])
def test_bad_input_is_one_line(model_dir: Path, capsys: pytest.CaptureFixture, argv: list[str],
                               message: str) -> None:
    rc, out, err = _run(capsys, "generate", "--model", str(model_dir), *argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_missing_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _, err = _run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "5")
    assert rc == 2 and "does not exist" in err


def test_draft_model_for_simsd(capsys: pytest.CaptureFixture) -> None:
    """`--draft-model DIR` drafts with another model folder: greedy left-to-right SimSD with
    the target itself as the draft gives the left_to_right answer in fewer forwards."""
    from dllm_jax.session import resolve_model_dir

    bundled = str(resolve_model_dir(None))
    common = ["generate", "reverse: Eve Bob Zoe", "--gen-length", "32", "--json"]
    assert main(common + ["--controller", "left_to_right"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert main(common + ["--controller", "simsd", "--draft-model", bundled]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["tokens"] == base["tokens"] and spec["text"] == "Zoe Bob Eve"
    assert spec["nfe"] < base["nfe"]
    for argv, needle in ((["--controller", "threshold", "--draft-model", bundled], "--draft-model"),
                         (["--controller", "simsd", "--draft-model", "/nonexistent/m"],
                          "--draft-model")):
        assert main(common + argv) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3
