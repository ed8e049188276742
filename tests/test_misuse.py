"""Every CLI under misuse, faults and concurrency (issue 15): bad flags, missing / damaged /
unwritable files, words outside the vocabulary, resumes of nothing, rejected batch lines,
ids 1 and "1", two batch runs on one output, restarts with other settings, atomic writes.

Each failure must be: a non-zero exit, no traceback, at most three lines of stderr naming
the flag or file, and no partial output file. Most cases run `dllm_jax.cli.main` in-process
(the console script is `sys.exit(main())`); those about the process itself (noise printed
at exit, two processes at once) run the CLI as a subprocess.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from dllm_jax import files
from dllm_jax.checkpoint import save_model
from dllm_jax.cli import main
from dllm_jax.config import ModelConfig
from dllm_jax.models import init_params
from dllm_jax.tasks.vocab import build_task_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GEN = ["--gen-length", "8", "--block-length", "4", "--steps", "8",
       "--controller", "threshold", "--threshold", "0.5"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu",
           PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny task model (train_config.json: unknown words are errors), the same without the
    run record (unknown words are warnings), one without tokenizer.json, one with a truncated
    params file."""
    root = tmp_path_factory.mktemp("misuse")
    tok = build_task_tokenizer(root / "tok")
    cfg = ModelConfig.tiny("llada", vocab_size=tok.vocab_size, hidden_size=32,
                           intermediate_size=64, num_heads=4, num_kv_heads=4, head_dim=8,
                           mask_token_id=tok.token_id("mask_token"), eos_token_id=tok.eos_id,
                           pad_token_id=tok.pad_id)
    (root / "tok" / "train_config.json").write_text(json.dumps(
        {"train": {"answer_length": 8}, "model": cfg.to_dict()}))
    task = save_model(root / "task", cfg, init_params(cfg, jax.random.key(4), std=0.6),
                      extra_files={n: root / "tok" / n for n in (
                          "tokenizer.json", "tokenizer_config.json", "train_config.json")})
    plain = root / "plain"
    shutil.copytree(task, plain)
    (plain / "train_config.json").unlink()
    notok = root / "notok"
    shutil.copytree(task, notok)
    (notok / "tokenizer.json").unlink()
    damaged = root / "damaged"
    shutil.copytree(task, damaged)
    chunk = max((p for p in (damaged / "params").rglob("*") if p.is_file()
                 and p.parent.name != "params"), key=lambda p: p.stat().st_size)
    with open(chunk, "r+b") as f:
        f.truncate(chunk.stat().st_size // 2)
    return {"task": task, "plain": plain, "notok": notok, "damaged": damaged,
            "damaged_param": chunk.parent.name}


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _subprocess(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dllm_jax.cli", *map(str, argv)], env=ENV,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _assert_clean_error(rc: int, err: str, *needles: str, max_lines: int = 3) -> None:
    assert rc != 0, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= max_lines and lines[-1].startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def _prompts(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def _leftovers(out: Path) -> list[Path]:
    return [p for p in (out, Path(f"{out}.lock"), Path(f"{out}.settings.json")) if p.exists()]


# ----------------------------------------------------------------------------- bad flags
@pytest.mark.parametrize("argv,needle", [
    (["--gen-length", "-4"], "--gen-length"),
    (["--gen-length", "abc"], "--gen-length"),
    (["--steps", "0"], "--steps"),
    (["--steps", "64", "--gen-length", "8"], "--steps 8 or less"),       # the silent cap
    (["--gen-length", "10", "--block-length", "4"], "--block-length"),   # flags, not API names
    (["--steps", "6", "--gen-length", "8", "--block-length", "2"], "--steps"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--cfg", "-0.5"], "--cfg"),
    (["--refresh-every", "-1"], "--refresh-every"),
    (["--seed", "-1"], "--seed"),
    (["--cache", "triple"], "--cache"),
    (["--controller", "threshold", "--factor", "2"], "--factor"),
])
def test_generate_bad_flags(models: dict, capsys: pytest.CaptureFixture, argv: list[str],
                            needle: str) -> None:
    rc, out, err = _run(capsys, "generate", "sort: 3 1 2", "--model", models["task"], *argv)
    _assert_clean_error(rc, err, needle, max_lines=1)
    assert out == ""


def test_steps_above_gen_length_only_for_dream_orders() -> None:
    from dllm_jax.cli import build_parser
    from dllm_jax.cli_options import UsageError, decode_settings

    parse = build_parser().parse_args
    gen, _ = decode_settings(parse(["generate", "x", "--steps", "64", "--gen-length", "8",
                                    "--controller", "entropy"]), "unused")
    assert gen.steps == 64                # Dream's time grid runs every step
    with pytest.raises(UsageError, match="at most 8 steps"):
        decode_settings(parse(["generate", "x", "--steps", "64", "--gen-length", "8"]), "unused")


@pytest.mark.parametrize("argv,needle", [
    (["--batch-size", "0"], "--batch-size"),
    (["--bucket", "-1"], "--bucket"),
    (["--max-errors", "-1"], "--max-errors"),
    (["--gen-length", "-1"], "--gen-length"),
    (["--temperature", "inf"], "--temperature"),
    (["--dtype", "int8"], "int8"),
])
def test_batch_bad_flags(models: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                         argv: list[str], needle: str) -> None:
    inp = _prompts(tmp_path / "in.jsonl", [{"id": 1, "prompt": "sort: 3 1 2"}])
    out = tmp_path / "out.jsonl"
    rc, _, err = _run(capsys, "batch", "--model", models["task"], "--input", inp,
                      "--output", out, *argv)
    _assert_clean_error(rc, err, needle)
    assert not _leftovers(out)


@pytest.mark.parametrize("case", ["missing_folder", "folder", "same_file", "missing_input",
                                  "input_folder", "unwritable"])
def test_batch_bad_files_fail_before_the_model_loads(models: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture,
                                                     case: str) -> None:
    """Checked before loading: the damaged model would fail with its own error otherwise."""
    inp = _prompts(tmp_path / "in.jsonl", [{"id": 1, "prompt": "sort: 3 1 2"}])
    out, needle = {"missing_folder": (tmp_path / "nope" / "out.jsonl", "does not exist"),
                   "folder": (tmp_path, "is a folder"),
                   "same_file": (inp, "same file"),
                   "missing_input": (tmp_path / "out.jsonl", "--input"),
                   "input_folder": (tmp_path / "out.jsonl", "--input"),
                   "unwritable": (Path("/proc/out.jsonl"), "cannot write")}[case]
    if case == "missing_input":
        inp = tmp_path / "missing.jsonl"
    elif case == "input_folder":
        inp = tmp_path
    rc, _, err = _run(capsys, "batch", "--model", models["damaged"], "--input", inp,
                      "--output", out, *GEN)
    _assert_clean_error(rc, err, needle, max_lines=1)
    assert "could not restore" not in err
    if case != "same_file" and not out.is_dir() and out.parent.is_dir():
        assert not _leftovers(out)


@pytest.mark.parametrize("argv,needle", [
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--batch-size", "x"], "--batch-size"),
    (["--steps", "10", "--warmup", "20"], "--warmup"),
    (["--eval", "-1"], "--eval"),
    (["--tasks", "nope"], "--tasks"),
    (["--eps", "1.5"], "--eps"),
    (["--grad-clip", "-1"], "--grad-clip"),
])
def test_train_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                         needle: str) -> None:
    rc, _, err = _run(capsys, "train", "--out", tmp_path / "m", "--model-size", "tiny", *argv)
    _assert_clean_error(rc, err, needle, max_lines=1)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m-ckpt").exists()


def test_train_output_checked_before_training(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    rc, _, err = _run(capsys, "train", "--out", "/proc/dllm-m", "--model-size", "tiny",
                      "--steps", "2")
    _assert_clean_error(rc, err, "--out", max_lines=1)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    rc, _, err = _run(capsys, "train", "--out", tmp_path / "m", "--model-size", "tiny")
    _assert_clean_error(rc, err, "already exists", "--overwrite", max_lines=1)


@pytest.mark.parametrize("layout", ["missing", "empty_out", "empty_ckpt"])
def test_train_resume_of_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                 layout: str) -> None:
    out = tmp_path / "run"
    argv = ["train", "--out", out, "--model-size", "tiny", "--steps", "2", "--resume"]
    if layout == "empty_out":
        out.mkdir()
    elif layout == "empty_ckpt":
        (tmp_path / "ck").mkdir()
        argv += ["--ckpt-dir", tmp_path / "ck"]
    rc, _, err = _run(capsys, *argv)
    _assert_clean_error(rc, err, "no checkpoint to resume", max_lines=1)
    assert "--overwrite" not in err


@pytest.mark.parametrize("argv,needle", [
    (["--n", "0"], "--n"),
    (["--tau", "2"], "--tau"),
    (["--lr", "0"], "--lr"),
    (["--thresholds", "0.9,x"], "--thresholds"),
    (["--tasks", "nope"], "--tasks"),
    (["--gen-length", "10", "--block-length", "4"], "--block-length"),
])
def test_train_controller_bad_flags(models: dict, capsys: pytest.CaptureFixture,
                                    argv: list[str], needle: str) -> None:
    rc, _, err = _run(capsys, "train-controller", "--model", models["task"], *argv)
    _assert_clean_error(rc, err, needle, max_lines=1)
    assert not (models["task"] / "tspd.json").exists()


def test_train_controller_files_checked_first(models: dict, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    rc, _, err = _run(capsys, "train-controller", "--model", models["notok"])
    _assert_clean_error(rc, err, "tokenizer.json", str(models["notok"]), max_lines=1)
    rc, _, err = _run(capsys, "train-controller", "--model", models["damaged"], "--out",
                      tmp_path / "nope" / "tspd.json")
    _assert_clean_error(rc, err, "--out", "does not exist", max_lines=1)


def test_train_controller_writes_a_strict_readable_file(models: dict, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    old = os.umask(0o022)
    try:
        rc, out, _ = _run(capsys, "train-controller", "--model", models["task"], "--tasks",
                          "sort", "--n", "2", "--steps", "3", "--thresholds", "0.9",
                          "--hidden", "0", "--out", tmp_path)
    finally:
        os.umask(old)
    assert rc == 0
    path = tmp_path / "tspd.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644       # the umask, not mkstemp's 0600
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and "NaN" not in out
    json.loads(text)
    assert [p.name for p in tmp_path.iterdir()] == ["tspd.json"]   # no temporary left


def test_generate_missing_and_wrong_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = _run(capsys, "generate", "x", "--model", f)
    _assert_clean_error(rc, err, "--model", "is a file", max_lines=1)
    rc, _, err = _run(capsys, "generate", "x", "--model", tmp_path)
    _assert_clean_error(rc, err, str(tmp_path), max_lines=1)


def test_bad_tokenizer_file_is_one_line(models: dict, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "badtok"
    shutil.copytree(models["plain"], bad)
    (bad / "tokenizer.json").write_text("{not json")
    rc, _, err = _run(capsys, "generate", "sort: 3 1", "--model", bad, *GEN)
    _assert_clean_error(rc, err, "tokenizer.json", max_lines=1)


# ----------------------------------------------------------------------------- damaged params
def test_truncated_params_file_is_one_line_without_internals(models: dict) -> None:
    for _ in range(2):   # orbax's leftover noise at exit comes and goes: try twice
        r = _subprocess("generate", "sort: 3 1 2", "--model", models["damaged"], *GEN)
        _assert_clean_error(r.returncode, r.stderr, models["damaged_param"], max_lines=1)
        for internal in ("TensorStore", "pybind11", "Event loop", "coroutine"):
            assert internal not in r.stderr, r.stderr
        assert r.stdout == ""


# ----------------------------------------------------------------------------- vocabulary
def test_unknown_words_are_an_error_for_task_models_and_a_warning_otherwise(
        models: dict, capsys: pytest.CaptureFixture) -> None:
    rc, out, err = _run(capsys, "generate", "sort: 3 hello 1 wrld", "--model", models["task"],
                        *GEN)
    _assert_clean_error(rc, err, "'hello'", "'wrld'", max_lines=1)
    assert out == ""
    rc, out, err = _run(capsys, "generate", "sort: 3 hello 1", "--model", models["plain"], *GEN,
                        "--json")
    assert rc == 0 and set(json.loads(out)) == {"tokens", "text", "nfe", "steps"}
    assert "warning:" in err and "'hello'" in err and "<unk>" in err
    rc, _, err = _run(capsys, "generate", "sort: 3 <unk> 1", "--model", models["task"], *GEN)
    assert rc == 0 and "warning" not in err          # the token typed literally is no word


# ----------------------------------------------------------------------------- batch
def test_batch_all_lines_invalid_fails_with_the_count(models: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    inp = _prompts(tmp_path / "in.jsonl", ["{oops", {"prompt": "no id"}, {"id": 3}])
    out = tmp_path / "out.jsonl"
    rc, _, err = _run(capsys, "batch", "--model", models["task"], "--input", inp, "--output",
                      out, *GEN)
    assert rc == 1 and "Traceback" not in err
    assert "3 of 3 input lines rejected" in err
    for n in (1, 2, 3):
        assert f"in.jsonl:{n}:" in err
    assert not _leftovers(out)


def test_batch_rejected_lines_counted_and_max_errors(models: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    inp = _prompts(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "sort: 3 1 2"}, {"id": "b", "prompt": "sort: 3 hello 2"},
        {"id": "c", "prompt_ids": [5, 6]}, {"id": "d", "prompt_ids": [10 ** 6]}])
    out = tmp_path / "out.jsonl"
    base = ["batch", "--model", models["task"], "--input", inp, "--output", out, *GEN,
            "--quiet"]
    rc, _, err = _run(capsys, *base, "--max-errors", "1")
    _assert_clean_error(rc, err, "--max-errors 1", max_lines=3)
    assert not _leftovers(out)                     # stopped before anything was decoded
    rc, _, err = _run(capsys, *base)
    assert rc == 1 and "2 of 4 input lines rejected" in err and "'hello'" in err
    assert sorted(json.loads(x)["id"] for x in out.read_text().splitlines()) == ["a", "c"]
    assert not Path(f"{out}.lock").exists()


def test_ids_compare_as_strings(models: dict, tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    inp = _prompts(tmp_path / "in.jsonl", [{"id": 1, "prompt_ids": [5, 6]},
                                           {"id": "1", "prompt_ids": [7]},
                                           {"id": "2", "prompt_ids": [8]}])
    out = tmp_path / "out.jsonl"
    argv = ["batch", "--model", models["task"], "--input", inp, "--output", out, *GEN]
    rc, _, err = _run(capsys, *argv)
    assert rc == 1 and "repeats the id of line 1" in err
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(map(json.dumps, ids)) == ['"2"', "1"]          # as the input wrote them
    # a restart whose input spells an answered id the other way skips it
    _prompts(inp, [{"id": "1", "prompt_ids": [5, 6]}, {"id": 2, "prompt_ids": [8]}])
    before = out.read_bytes()
    assert _run(capsys, *argv)[0] == 0
    assert out.read_bytes() == before


def test_batch_refuses_an_output_locked_by_another_run(models: dict, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    inp = _prompts(tmp_path / "in.jsonl", [{"id": 1, "prompt_ids": [5, 6]}])
    out = tmp_path / "out.jsonl"
    argv = ["batch", "--model", models["task"], "--input", inp, "--output", out, *GEN]
    holder = files.ExclusiveLock(f"{out}.lock", "test")
    holder.acquire()
    try:
        rc, _, err = _run(capsys, *argv)
        _assert_clean_error(rc, err, "in use by another run", f"pid {os.getpid()}",
                            max_lines=1)
        assert not out.exists()
    finally:
        holder.release()
    # a lock file left by a run that died is taken over, with a notice
    Path(f"{out}.lock").write_text(json.dumps({"pid": 999999999, "host": "elsewhere"}))
    rc, _, err = _run(capsys, *argv)
    assert rc == 0 and "taking over the lock left by pid 999999999" in err
    assert len(out.read_text().splitlines()) == 1 and not Path(f"{out}.lock").exists()


def test_two_batch_processes_on_one_output_answer_each_id_once(models: dict,
                                                               tmp_path: Path) -> None:
    inp = _prompts(tmp_path / "in.jsonl",
                   [{"id": i, "prompt_ids": [4 + i % 20] * (1 + i % 5)} for i in range(12)])
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "dllm_jax.cli", "batch", "--model", str(models["task"]),
           "--input", str(inp), "--output", str(out), "--batch-size", "2", *GEN]
    procs = [subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == list(range(12)), results
    for rc, err in results:
        assert "Traceback" not in err, err
        assert rc == 0 or (rc == 2 and "in use by another run" in err), err
    assert not Path(f"{out}.lock").exists()


def test_restart_with_other_settings_is_refused(models: dict, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    inp = _prompts(tmp_path / "in.jsonl", [{"id": 1, "prompt_ids": [5, 6]}])
    out = tmp_path / "out.jsonl"
    base = ["batch", "--model", models["task"], "--input", inp, "--output", out]
    assert _run(capsys, *base, *GEN)[0] == 0
    side = json.loads(Path(f"{out}.settings.json").read_text())
    assert side["settings"]["--steps"] == 8 and side["settings"]["--threshold"] == 0.5
    _prompts(inp, [{"id": 1, "prompt_ids": [5, 6]}, {"id": 2, "prompt_ids": [7]}])
    before = out.read_bytes()
    other = [a if a != "0.5" else "0.7" for a in GEN]
    other[other.index("--steps") + 1] = "4"
    rc, _, err = _run(capsys, *base, *other)
    _assert_clean_error(rc, err, "--steps (was 8, now 4)", "--threshold (was 0.5, now 0.7)",
                        "--force-new-settings", max_lines=1)
    assert out.read_bytes() == before
    # the same settings spelled differently (a default given explicitly) resume
    rc, _, err = _run(capsys, *base, *GEN, "--seed", "0", "--cache", "none")
    assert rc == 0 and len(out.read_text().splitlines()) == 2
    # --force-new-settings appends and records the new settings
    _prompts(inp, [{"id": 3, "prompt_ids": [9]}])
    rc, _, err = _run(capsys, *base, *other, "--force-new-settings")
    assert rc == 0 and "warning: --force-new-settings" in err
    side = json.loads(Path(f"{out}.settings.json").read_text())
    assert side["settings"]["--steps"] == 4


# ----------------------------------------------------------------------------- writer
def test_atomic_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.json"
    old = os.umask(0o027)
    try:
        files.write_json(path, {"a": float("nan"), "b": [1.0, float("inf")], "c": "x"})
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": "x"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(files.FileError, match="No space left"):
        files.write_json(path, {"new": 1})
    monkeypatch.undo()
    assert json.loads(path.read_text())["c"] == "x"          # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # and no temporary is left
    for bad, words in [(tmp_path / "no" / "x.json", "does not exist"),
                       (tmp_path, "is a folder"), (Path("/proc/x.json"), "cannot write")]:
        with pytest.raises(files.FileError, match=words):
            files.check_output_path(bad, "--out")


def test_lock_file_records_its_owner(tmp_path: Path) -> None:
    lock = files.ExclusiveLock(tmp_path / "o.lock", "--output o")
    lock.acquire()
    owner = json.loads((tmp_path / "o.lock").read_text())
    assert owner["pid"] == os.getpid() and owner["host"]
    fd = os.open(tmp_path / "o.lock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    lock.release()
    assert not (tmp_path / "o.lock").exists()
