"""Warm starts for the command line: JAX's persistent compilation cache, on by default.

Every `dllm-jax` process would otherwise compile its decode again (~10 s at 8B shapes on a
GPU, seconds on a CPU). The CLIs point JAX's own persistent cache
(`jax_compilation_cache_dir`) at a folder under the user's cache directory, so a second
process with the same shapes loads the compiled program instead:

- default folder: `$XDG_CACHE_HOME/dllm-jax/jax-compile` (`~/.cache/...` without it);
- `DLLM_JAX_COMPILE_CACHE=DIR` chooses another folder, `DLLM_JAX_COMPILE_CACHE=off` or
  `--no-compile-cache` (every subcommand) turns it off;
- `--compile-cache-stats` prints one line at exit: the cache hits and the compiles.

Library code never turns it on by itself (importing dllm_jax changes no JAX setting).
JAX's own cache is used rather than a hand-written one: it keys entries on the program, the
backend, the device kind and the JAX / XLA versions, so a stale entry is never loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

ENV = "DLLM_JAX_COMPILE_CACHE"
_HITS, _MISSES = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"


def default_dir() -> Path:
    """`$XDG_CACHE_HOME/dllm-jax/jax-compile`, or `~/.cache/dllm-jax/jax-compile`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dllm-jax" / "jax-compile"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The cache flags every subcommand takes."""
    p.add_argument("--no-compile-cache", action="store_true",
                   help=f"do not read or write JAX's persistent compilation cache (default "
                        f"{default_dir()}; or set {ENV}=DIR / off)")
    p.add_argument("--compile-cache-stats", action="store_true",
                   help="print the compilation cache's hits and compiles at exit")


def chosen_dir(no_cache: bool) -> Path | None:
    """The cache folder to use, or None when it is turned off (flag or environment)."""
    setting = os.environ.get(ENV, "").strip()
    if no_cache or setting.lower() == "off":
        return None
    return Path(os.path.expanduser(setting)) if setting else default_dir()


def enable(no_cache: bool = False, stats: bool = False) -> Callable[[], None]:
    """Turn the cache on for this process (see the module doc); returns the function that
    prints the stats line (a no-op without `stats`)."""
    import jax
    from jax import monitoring

    counts = {_HITS: 0, _MISSES: 0}
    if stats:
        monitoring.register_event_listener(
            lambda event, **_: counts.__setitem__(event, counts[event] + 1)
            if event in counts else None)
    path = chosen_dir(no_cache)
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", str(path))
        # cache every program the decode compiles, small CPU ones included
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

    def report() -> None:
        if stats:
            where = "off" if path is None else str(path)
            print(f"compile cache ({where}): {counts[_HITS]} hits, {counts[_MISSES]} compiles",
                  file=sys.stderr, flush=True)

    return report


__all__ = ["ENV", "add_arguments", "chosen_dir", "default_dir", "enable"]
