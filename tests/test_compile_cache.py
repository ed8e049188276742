"""Warm starts (dllm_jax/compile_cache.py): a second `dllm-jax generate` process loads its
compiled programs from the persistent cache instead of compiling them (counted by JAX's own
cache events, not timed); `--no-compile-cache` and DLLM_JAX_COMPILE_CACHE=off leave it alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from dllm_jax import compile_cache

ROOT = Path(__file__).resolve().parents[1]


def _generate(env: dict, *extra: str) -> tuple[int, int, str]:
    proc = subprocess.run([sys.executable, "-m", "dllm_jax.cli", "generate", "sort: 9 4 7 1",
                           "--compile-cache-stats", *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"compile cache \((.*)\): (\d+) hits, (\d+) compiles", proc.stderr)
    assert m, proc.stderr
    assert proc.stdout.strip() == "1 4 7 9"
    return int(m.group(2)), int(m.group(3)), m.group(1)


def test_second_process_hits_the_cache(tmp_path: Path) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", DLLM_JAX_COMPILE_CACHE=str(tmp_path / "cc"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    hits1, compiles1, where = _generate(env)
    assert where == str(tmp_path / "cc") and compiles1 > 0 and hits1 == 0
    assert any((tmp_path / "cc").iterdir())
    hits2, compiles2, _ = _generate(env)
    assert hits2 >= compiles1 and compiles2 == 0      # every program came from the cache
    before = sorted(p.name for p in (tmp_path / "cc").iterdir())
    hits3, compiles3, where3 = _generate(env, "--no-compile-cache")
    assert where3 == "off" and hits3 == 0
    assert sorted(p.name for p in (tmp_path / "cc").iterdir()) == before


def test_chosen_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    assert compile_cache.chosen_dir(False) == tmp_path / "dllm-jax" / "jax-compile"
    assert compile_cache.chosen_dir(True) is None
    monkeypatch.setenv(compile_cache.ENV, "OFF")
    assert compile_cache.chosen_dir(False) is None
    monkeypatch.setenv(compile_cache.ENV, "~/cc")
    assert compile_cache.chosen_dir(False) == Path(os.path.expanduser("~/cc"))
