"""`dllm-jax train-controller --fit ce` and the `ce_fitted` controller: the CLI on a tiny model
writes a strict ce.json that `ce_fitted` builds CE from (the file's filter and look-ahead);
missing / malformed files are one-sentence errors naming the file and the command; flags of
the other fit are refused by name; the bench's "ce fitted" settings need the file."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import jax
import pytest

from controllers import make_controller
from controllers.ce import CE
from controllers.ce_fitted import CE_FILE, CEFitError, read_ce_fit
from dllm_jax.bench.settings import all_settings, select
from dllm_jax.cli import main
from dllm_jax.features import CEFilter


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dllm_jax.checkpoint import save_model
    from dllm_jax.config import ModelConfig
    from dllm_jax.models import init_params
    from dllm_jax.tasks.vocab import build_task_tokenizer

    root = tmp_path_factory.mktemp("cefit")
    tok = build_task_tokenizer(root / "tok")
    cfg = ModelConfig.tiny("llada", vocab_size=tok.vocab_size, hidden_size=32,
                           intermediate_size=64, num_heads=4, num_kv_heads=4, head_dim=8,
                           mask_token_id=tok.token_id("mask_token"), eos_token_id=tok.eos_id,
                           pad_token_id=tok.pad_id, max_position=64)
    return save_model(root / "model", cfg, init_params(cfg, jax.random.key(1), std=0.6),
                      extra_files={n: root / "tok" / n for n in ("tokenizer.json",
                                                                  "tokenizer_config.json")})


def _run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


FIT = ("--tasks", "copy,sort", "--n", "3", "--steps", "5", "--gen-length", "8",
       "--batch-size", "8", "--quiet")


@pytest.fixture(scope="module")
def fitted(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cefit_out")
    assert main(["train-controller", "--model", str(model), "--fit", "ce", "--out", str(out),
                 *FIT]) == 0
    return out / CE_FILE


def test_cli_writes_a_strict_file_that_ce_fitted_reads(fitted: Path, model: Path) -> None:
    text = fitted.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert stat.S_IMODE(fitted.stat().st_mode) & 0o044            # the umask, not 0600
    assert [p.name for p in fitted.parent.iterdir()] == [CE_FILE]   # no temporary left
    d = json.loads(text)
    assert d["format"] == "dllm-jax-ce" and d["version"] == 1
    m = d["metrics"]
    assert m["tasks"] == ["copy", "sort"] and m["split"] == "train" and m["seed"] == 0
    assert m["sources"] == ["reference"] and m["n_prompts"] == 6 and m["n_sequences_total"] > 0
    assert {"loglik_init", "loglik_fit", "loglik_val_init", "loglik_val_fit"} <= set(m)
    assert len(d["coverage"]) == 5 * 4 and {"z", "h", "coverage", "fire", "cross"} <= set(
        d["coverage"][0])
    ctrl = make_controller("ce_fitted", ce_file=fitted, threshold=0.7)
    assert isinstance(ctrl, CE) and ctrl.threshold == 0.7
    cf = d["ce_filter"]
    assert ctrl.trajectory_filter == CEFilter(q=cf["q"], r=cf["r"], slope_var0=cf["slope_var0"])
    assert (ctrl.z, ctrl.horizon) == (d["z"], d["horizon"])
    assert ctrl.trajectory_filter != CEFilter()                    # fitted, not the default
    # model_dir (what the CLI passes) reads MODEL/ce.json; overrides of z / horizon apply
    shutil.copy(fitted, model / CE_FILE)
    try:
        again = make_controller("ce_fitted", model_dir=model, z=2.0, stabilize=False)
        assert again.trajectory_filter == ctrl.trajectory_filter
        assert (again.z, again.horizon, again.stabilize) == (2.0, d["horizon"], False)
    finally:
        (model / CE_FILE).unlink()


def test_missing_and_malformed_files(tmp_path: Path, fitted: Path) -> None:
    with pytest.raises(CEFitError, match=r"no fitted CE filter at .*ce\.json; make it with "
                                         r"`dllm-jax train-controller --model DIR --fit ce`"):
        make_controller("ce_fitted", model_dir=tmp_path)
    bad = tmp_path / CE_FILE
    d = json.loads(fitted.read_text())
    cases = ["{not json", json.dumps({"format": "dllm-jax-tspd"}),
             json.dumps({**d, "version": 7}),
             json.dumps({**d, "ce_filter": {"q": 0.1, "r": -1.0, "slope_var0": 1.0}}),
             json.dumps({**d, "horizon": "3"}),
             json.dumps({k: v for k, v in d.items() if k != "z"})]
    for text in cases:
        bad.write_text(text)
        with pytest.raises(CEFitError) as info:
            read_ce_fit(tmp_path)
        msg = str(info.value)
        assert str(bad) in msg and "--fit ce" in msg and "\n" not in msg, msg
    with pytest.raises(ValueError, match="threshold must be in"):   # option errors as CE's
        make_controller("ce_fitted", ce_file=fitted, threshold=1.5)


@pytest.mark.parametrize("argv,needle", [
    (["--fit", "ce", "--hidden", "4"], "--hidden is for --fit tspd, not --fit ce"),
    (["--fit", "ce", "--tau", "0.5", "--no-ce"], "--tau, --no-ce are for --fit tspd"),
    (["--zs", "1,2"], "--zs is for --fit ce, not --fit tspd"),
    (["--fit", "ce", "--drop", "position"], "--drop is for --fit tspd, not --fit ce"),
    (["--fit", "tspd", "--drop", "speed"], "--drop: unknown feature groups ['speed']"),
    (["--fit", "ce", "--horizons", "0,1"], "--horizons must be comma-separated integers >= 1"),
    (["--fit", "ce", "--val-fraction", "1"], "--val-fraction"),
])
def test_flag_refusals(model: Path, capsys: pytest.CaptureFixture, argv: list[str],
                       needle: str) -> None:
    rc, out, err = _run(capsys, "train-controller", "--model", model, *argv)
    assert rc == 2 and out == "" and needle in err and err.count("\n") == 1, err
    assert not (model / CE_FILE).exists() and not (model / "tspd.json").exists()


def test_bench_setting_needs_the_file(tmp_path: Path, fitted: Path) -> None:
    got = select(all_settings(), "ce fitted")
    assert [s.label for s in got] == ["ce fitted t=0.9", "ce fitted t=0.7"]
    for s in got:
        why = s.unavailable(tmp_path, 32, 32)
        assert why is not None and "no ce.json" in why and "--fit ce" in why
        assert s.unavailable(None, 32, 32) is not None
    shutil.copy(fitted, tmp_path / CE_FILE)
    s = got[1]
    assert s.unavailable(tmp_path, 32, 32) is None
    ctrl = s.build(tmp_path)
    assert ctrl.threshold == 0.7 and ctrl.trajectory_filter == read_ce_fit(fitted).ce_filter
