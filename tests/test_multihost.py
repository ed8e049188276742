"""`dllm-jax batch --distributed` with real OS processes on this machine: 2 processes of 4
simulated CPU devices (and 4 of 2), gloo collectives, the coordinator on a loopback port.

- one global mesh (data=2,model=4; data=4,model=2 written per host; data=2,model=2,seq=2)
  answers token for token as one process on one device;
- a killed process makes the other exit with status 3 and one `error:` line at once; a hung
  (SIGSTOPped) one makes the other three do so within --peer-timeout; a rerun resumes with
  every id exactly once (one output file, and per host);
- with `model` across processes each process restores only its devices' shards (the byte
  count each prints equals the count the sharding rules give);
- an error of one process before decoding stops every process with one sentence.

Run as a script (`python tests/test_multihost.py '[[argv...], ...]'`) this file is the
worker: it runs `dllm-jax` once per argv list, in one process (one jax.distributed start).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
GEN = ["--gen-length", "8", "--block-length", "4", "--steps", "8", "--controller",
       "threshold", "--threshold", "0.5", "--cache", "dual", "--batch-size", "4",
       "--bucket", "4"]
LAUNCH_TIMEOUT = 240


# ----------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """`n` worker processes of `devices` CPU devices each, running `runs` (argv lists without
    the distributed flags) one after the other; stderr of process i in `logs[i]`."""

    def __init__(self, tmp: Path, n: int, devices: int, runs: list[list[str]],
                 peer_timeout: int = 10) -> None:
        port = _free_port()
        # A low backend optimisation level only saves compile time on the shared CPU.
        flags = (f"--xla_force_host_platform_device_count={devices} "
                 "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.logs = [tmp / f"launch-{port}-{i}.log" for i in range(n)]
        self.procs = []
        for i in range(n):
            flags = ["--distributed", "--coordinator-address", f"127.0.0.1:{port}",
                     "--num-processes", str(n), "--process-id", str(i),
                     "--peer-timeout", str(peer_timeout)]
            argv = json.dumps([["batch", *run, *flags] for run in runs])
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen([sys.executable, __file__, argv], env=env,
                                                   cwd=ROOT, stdout=log, stderr=log))

    def err(self, i: int) -> str:
        return self.logs[i].read_text()

    def wait(self, timeout: float = LAUNCH_TIMEOUT) -> list[int]:
        deadline = time.time() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.time())) for p in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def wait_for_output(self, paths: list[Path], timeout: float = LAUNCH_TIMEOUT) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.exists() and p.stat().st_size > 0 for p in paths):
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.02)
        self.kill()
        pytest.fail("no answer appeared while all processes ran:\n" + self.err(0)[-3000:])


def _answers(*paths: Path) -> list[dict]:
    out = []
    for path in paths:
        if path.exists():
            text = path.read_text()
            assert not text or text.endswith("\n")
            out += [json.loads(line) for line in text.splitlines()]
    return out


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _assert_exactly_once(records: list[dict], reference: dict) -> None:
    ids = [json.dumps(r["id"]) for r in records]
    assert len(ids) == len(set(ids)), "an id was written twice"
    assert sorted(ids) == sorted(reference), "an id is missing"
    for r in records:
        assert r == reference[json.dumps(r["id"])], f"answer of {r['id']} differs"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny float32 LLaDA-shaped model, a small and a long input, and the single-process
    one-device answers for both (the CLI in this process)."""
    import jax

    from dllm_jax.checkpoint import save_model
    from dllm_jax.cli import main
    from dllm_jax.config import ModelConfig
    from dllm_jax.models import init_params
    from dllm_jax.tasks.vocab import build_task_tokenizer

    root = tmp_path_factory.mktemp("multihost")
    tok = build_task_tokenizer(root / "tok")
    cfg = ModelConfig.tiny("llada", vocab_size=tok.vocab_size, hidden_size=32,
                           intermediate_size=64, num_heads=4, num_kv_heads=4, head_dim=8,
                           mask_token_id=tok.token_id("mask_token"), eos_token_id=tok.eos_id,
                           pad_token_id=tok.pad_id)
    params = init_params(cfg, jax.random.key(4), std=0.6)
    model = save_model(root / "model", cfg, params, extra_files={
        n: root / "tok" / n for n in ("tokenizer.json", "tokenizer_config.json")})
    small, long = root / "small.jsonl", root / "long.jsonl"
    # small: 12 prompts, two buckets (one of them a text prompt); long: 24 prompts, 3 buckets
    lines = [json.dumps({"id": i, "prompt_ids": [4 + (j * 7 + i) % 20 for j in range(1 + i % 7)]})
             for i in range(11)] + [json.dumps({"id": "t", "prompt": "sort: 3 1 2"})]
    small.write_text("\n".join(lines) + "\n")
    long.write_text("".join(json.dumps({"id": f"k{i}", "prompt_ids": [
        4 + (j * 5 + i) % 20 for j in range(1 + i % 12)]}) + "\n" for i in range(24)))
    refs = {}
    for name, path in (("small", small), ("long", long)):
        out = root / f"{name}.reference.jsonl"
        assert main(["batch", "--model", str(model), "--input", str(path), "--output",
                     str(out), "--quiet", *GEN]) == 0
        refs[name] = {json.dumps(r["id"]): r for r in _answers(out)}
    return SimpleNamespace(root=root, model=model, cfg=cfg, small=small, long=long, refs=refs)


def _run(setup: SimpleNamespace, inp: Path, out: Path, mesh: str, *extra: str) -> list[str]:
    return ["--model", str(setup.model), "--input", str(inp), "--output", str(out),
            "--mesh", mesh, *GEN, *extra]


# ----------------------------------------------------------------------------- tests
def test_global_mesh_answers_as_one_device(setup: SimpleNamespace, tmp_path: Path) -> None:
    """2 processes x 4 devices, three meshes in one launch; the second written per host."""
    outs = {"data=2,model=4": tmp_path / "a.jsonl", "data=4,model=2": tmp_path / "b.jsonl",
            "data=2,model=2,seq=2": tmp_path / "c.jsonl"}
    runs = [_run(setup, setup.small, out, mesh, *(["--output-per-host"] if "data=4" in mesh
                                                 else [])) for mesh, out in outs.items()]
    t0 = time.time()
    launch = Launch(tmp_path, 2, 4, runs)
    rcs = launch.wait()
    print(f"2 processes, 3 meshes: {time.time() - t0:.1f} s")
    assert rcs == [0, 0], launch.err(0)[-3000:] + launch.err(1)[-3000:]
    ref = setup.refs["small"]
    _assert_exactly_once(_answers(outs["data=2,model=4"]), ref)
    _assert_exactly_once(_answers(outs["data=2,model=2,seq=2"]), ref)
    b = outs["data=4,model=2"]
    per_host = [_answers(Path(f"{b}.{i}-of-2")) for i in range(2)]
    assert not b.exists() and all(per_host), "each process writes its own rows"
    _assert_exactly_once(per_host[0] + per_host[1], ref)
    err0 = launch.err(0)
    # model inside a process, data across processes; only process 0 reports progress
    assert "mesh data=2,model=4,seq=1 (data across processes, model inside each process)" in err0
    assert "12 answered, 0 skipped" in err0 and "answered" not in launch.err(1)
    assert not _error_lines(err0 + launch.err(1))


def test_killed_process_stops_the_other_and_rerun_resumes(setup: SimpleNamespace,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "k.jsonl"
    run = _run(setup, setup.long, out, "data=2,model=4")
    launch = Launch(tmp_path, 2, 4, [run])
    launch.wait_for_output([out])
    launch.procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    rcs = launch.wait(timeout=60)
    waited = time.time() - t0
    assert rcs[0] == 3, launch.err(0)[-3000:]
    assert waited < 30, f"the survivor took {waited:.0f} s to stop"
    [line] = _error_lines(launch.err(0))
    assert "process 0 of 2" in line and "Start every process again" in line
    assert "Traceback" not in launch.err(0)
    first = _answers(out)
    assert 0 < len(first) < len(setup.refs["long"]), "the kill did not land mid-run"

    rerun = Launch(tmp_path, 2, 4, [run])
    assert rerun.wait() == [0, 0], rerun.err(0)[-3000:]
    records = _answers(out)
    assert records[:len(first)] == first
    _assert_exactly_once(records, setup.refs["long"])
    assert f"{len(first)} skipped" in rerun.err(0)


def _expected_share(cfg: object, sizes: dict[str, int], local_model: int) -> tuple[int, int]:
    """(bytes one process holds, total) of the params when each process holds `local_model`
    of the `sizes["model"]` model shards (and everything not split over model)."""
    from dllm_jax import sharding as S
    from dllm_jax.models import param_shapes

    import jax

    shapes, axes = param_shapes(cfg), S.param_axes(cfg)
    fake = SimpleNamespace(shape=sizes)
    held = total = 0
    for leaf, ax in zip(jax.tree.leaves(shapes), jax.tree.leaves(
            axes, is_leaf=lambda x: isinstance(x, tuple))):
        nbytes = leaf.size * leaf.dtype.itemsize
        total += nbytes
        split = "model" in tuple(S.logical_to_spec(ax, leaf.shape, fake))
        held += nbytes * local_model // sizes["model"] if split else nbytes
    return held, total


def test_four_processes_hung_one_per_host_resume_and_shards(setup: SimpleNamespace,
                                                            tmp_path: Path) -> None:
    """4 processes x 2 devices, data=2,model=4: model spans two processes."""
    out = tmp_path / "q.jsonl"
    files = [Path(f"{out}.{i}-of-4") for i in range(4)]
    run = _run(setup, setup.long, out, "data=2,model=4", "--output-per-host")
    launch = Launch(tmp_path, 4, 2, [run], peer_timeout=5)
    launch.wait_for_output(files)
    os.kill(launch.procs[1].pid, signal.SIGSTOP)       # hung, not dead: no socket closes
    t0 = time.time()
    try:
        rcs = [launch.procs[i].wait(timeout=90) for i in (0, 2, 3)]
    finally:
        launch.kill()
    waited = time.time() - t0
    assert rcs == [3, 3, 3], (rcs, [launch.err(i)[-1500:] for i in (0, 2, 3)])
    assert waited < 5 + 30, f"the others took {waited:.0f} s to stop"
    lines = [_error_lines(launch.err(i)) for i in (0, 2, 3)]
    assert all(len(x) == 1 for x in lines), lines
    assert any("process 1 stopped responding for 5 s" in x[0] for x in lines), lines
    err0 = launch.err(0)
    assert "(data across processes, model across processes)" in err0
    held, total = _expected_share(setup.cfg, {"data": 2, "seq": 1, "model": 4}, 2)
    assert held < total
    for i in range(4):
        assert f"process {i}/4 restored {held} of {total} bytes" in launch.err(i)
    first = _answers(*files)
    assert 0 < len(first) < len(setup.refs["long"]), "the hang did not land mid-run"

    rerun = Launch(tmp_path, 4, 2, [run], peer_timeout=5)
    assert rerun.wait() == [0, 0, 0, 0], rerun.err(0)[-3000:]
    _assert_exactly_once(_answers(*files), setup.refs["long"])


def test_an_error_of_one_process_stops_all_with_a_sentence(setup: SimpleNamespace,
                                                           tmp_path: Path) -> None:
    """Process 0 refuses the output (recorded with other settings); process 1, which has
    nothing wrong, does not wait for it: both stop before the model loads."""
    out = tmp_path / "s.jsonl"
    out.write_text('{"id": 0, "tokens": []}\n')
    Path(f"{out}.settings.json").write_text(json.dumps(
        {"format": "dllm-jax-batch-settings", "version": 1, "settings": {"--steps": 99}}))
    t0 = time.time()
    launch = Launch(tmp_path, 2, 4, [_run(setup, setup.small, out, "data=2,model=4")])
    assert launch.wait(timeout=120) == [2, 2]
    assert time.time() - t0 < 60
    [e0] = _error_lines(launch.err(0))
    [e1] = _error_lines(launch.err(1))
    assert "holds answers made with other settings" in e0
    assert e1.startswith("error: process 0 of 2 stopped before decoding")
    assert "restored" not in launch.err(0) + launch.err(1)
    assert out.read_text() == '{"id": 0, "tokens": []}\n'


def test_flags_without_distributed_are_one_line_errors(setup: SimpleNamespace, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    from dllm_jax.cli import main

    base = ["batch", "--model", str(setup.model), "--input", str(setup.small), "--output",
            str(tmp_path / "o.jsonl")]
    assert main([*base, "--output-per-host"]) == 2
    assert "error: --output-per-host needs --distributed" in capsys.readouterr().err
    assert main([*base, "--distributed", "--hosts-independent", "--output-per-host"]) == 2
    assert "drop --output-per-host" in capsys.readouterr().err
    assert main([*base, "--peer-timeout", "0", "--distributed"]) == 2
    assert "--peer-timeout" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


if __name__ == "__main__":
    from dllm_jax.cli import main as _main

    for _argv in json.loads(sys.argv[1]):
        _rc = _main(_argv)
        if _rc:
            sys.exit(_rc)
