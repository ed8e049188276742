"""Several processes, one decode: the global mesh, start-up, agreement, per-host feeding.

`dllm-jax batch --distributed` runs one process per host (a TPU VM of a pod slice, a GPU
node); `jax.distributed` joins them, and ONE mesh spans every process's devices:

- `initialize`: `jax.distributed.initialize` with the coordinator from the flags, else from
  the platform (TPU pods, SLURM, Open MPI, `JAX_COORDINATOR_ADDRESS`); CPU collectives go
  over gloo (`enable_cpu_collectives`, set before the backend starts); heartbeat and shutdown
  timeouts bounded by `peer_timeout`.
- `global_mesh`: the mesh of `--mesh` over `jax.devices()` (axes `mesh.DEVICE_ORDER`, `model`
  innermost). Devices are numbered process by process, so `model` stays inside a process
  while it fits one (model <= devices per process) and `data` runs across processes
  (`axis_placement` says which); a larger `model` spans processes.
- `agree`: all-gathers before any model work: every process's status (an error of one stops
  all with a sentence, not a hang), a digest of input and flags, the rows already answered.
- `feed` / `replicate`: the batch `[B, P]` is cut by the prompt sharding; each process puts
  only the rows its devices hold (`jax.make_array_from_process_local_data`); the key and the
  controller's arrays are replicated from host values.
- `answers_rows`: the rows of a finished batch this process writes: all of them (gathered to
  every process; process 0 writes) or, per host, the rows its devices hold (a row held by
  several processes belongs to the lowest one).
- `Watchdog`: a beat through the coordinator's key-value store; a process silent for
  `peer_timeout` seconds (killed, crashed, hung) makes the others print one `error:` line and
  exit with `EXIT_PEER_LOST` (a failed collective says the same at once).
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
import time
import zlib
from typing import Any, Callable, NoReturn, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dllm_jax.config import ConfigError
from dllm_jax.mesh import ShardingError, make_mesh

EXIT_PEER_LOST = 3          # exit status of a process stopped because another one failed
DEFAULT_PEER_TIMEOUT = 60   # seconds without a beat before a process counts as lost
_KEY = "dllm_jax_batch_alive/"   # + process index: its beat counter
_GONE = "dllm_jax_batch_gone/"   # + process index: its exit status, set as it leaves


class MultihostError(ConfigError):
    """Processes that cannot run together; the message says which and how to fix it."""


# ----------------------------------------------------------------------------- start-up
def enable_cpu_collectives() -> None:
    """Cross-process collectives on CPU over gloo. Call before the backend starts (a no-op
    on JAX versions without the option)."""
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, peer_timeout: int = DEFAULT_PEER_TIMEOUT
               ) -> None:
    """`jax.distributed.initialize` with the given settings (None: detected from the platform);
    heartbeat / shutdown timeouts of the coordination service bounded by `peer_timeout`, so
    a dead process is noticed even where the `Watchdog` is not running; a no-op once
    initialised. Raises MultihostError."""
    if getattr(jax.distributed, "is_initialized", lambda: False)():
        return    # a second command in the same processes (tests, notebooks)
    enable_cpu_collectives()
    kwargs: dict[str, Any] = {k: v for k, v in (("coordinator_address", coordinator_address),
                                                ("num_processes", num_processes),
                                                ("process_id", process_id)) if v is not None}
    accepted = inspect.signature(jax.distributed.initialize).parameters
    # jax's own heartbeat is the fallback (it aborts the process): later than the watchdog.
    for name, value in (("heartbeat_timeout_seconds", 2 * peer_timeout + 10),
                        ("shutdown_timeout_seconds", peer_timeout)):
        if name in accepted:
            kwargs[name] = value
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - environment problems: one sentence
        raise MultihostError(
            f"jax.distributed.initialize() failed ({_first_line(e)}); pass "
            f"--coordinator-address, --num-processes and --process-id (or run where the "
            f"platform provides them: a TPU pod, SLURM), or drop --distributed on one "
            f"host.") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].rstrip(".") if text else type(e).__name__


def is_collective_failure(e: BaseException) -> bool:
    """An error of the runtime (a collective or the coordination service), as raised when
    another process died: `jax.errors.JaxRuntimeError` (older JAX: XlaRuntimeError)."""
    return type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError")


def exit_now(code: int, line: str | None = None, linger: float = DEFAULT_PEER_TIMEOUT
             ) -> NoReturn:
    """Print `line`, flush, and end the process at once: after a failure the runtime's own
    shutdown would wait at a barrier for processes that are gone.

    Several processes: this one says so in the key-value store first; process 0, which hosts
    the coordination service, waits (at most `linger` + 5 seconds) until every other process
    has left or stopped beating, since its going would make jax's client abort the others
    (a fatal log) before they print their own line."""
    if line:
        print(line, file=sys.stderr, flush=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    client = _client() if jax.process_count() > 1 else None
    if client is not None:
        try:
            client.key_value_set(f"{_GONE}{jax.process_index()}", str(code),
                                 allow_overwrite=True)
            if jax.process_index() == 0:
                _wait_for_others(client, jax.process_count(), linger + 5)
        except Exception:  # noqa: BLE001 - nothing left to wait for
            pass
    os._exit(code)


def _wait_for_others(client: Any, count: int, limit: float) -> None:
    """Until every process 1..count-1 has announced its exit or its beat stood still for
    4 s (gone without a word), or `limit` seconds."""
    start = time.monotonic()
    beats: dict[int, tuple[str | None, float]] = {p: (None, start) for p in range(1, count)}
    while beats and time.monotonic() - start < limit:
        now = time.monotonic()
        for p in list(beats):
            if _try_get(client, f"{_GONE}{p}") is not None:
                del beats[p]
                continue
            beat = _try_get(client, f"{_KEY}{p}")
            if beat != beats[p][0]:
                beats[p] = (beat, now)
            elif now - beats[p][1] > 4.0:
                del beats[p]
        time.sleep(0.1)


def _try_get(client: Any, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception:  # noqa: BLE001 - missing key (or no coordinator)
        return None


# ----------------------------------------------------------------------------- the mesh
def global_mesh(spec: str | None) -> Mesh:
    """The mesh of `spec` (e.g. "data=2,model=4") over every process's devices; with several
    processes it must use all of them (a process without a device would hold nothing).
    Raises ShardingError."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = make_mesh(spec, devices=devices)
    if jax.process_count() > 1 and mesh.devices.size != len(devices):
        raise ShardingError(
            f"{spec} uses {mesh.devices.size} of the {len(devices)} devices of the "
            f"{jax.process_count()} processes, but a --distributed mesh must use them all; "
            f"give sizes whose product is {len(devices)} (e.g. data=-1,model=2), or pass "
            f"--hosts-independent for one mesh per host.")
    return mesh


def is_multiprocess(mesh: Mesh) -> bool:
    return len({d.process_index for d in mesh.devices.flat}) > 1


def axis_placement(mesh: Mesh) -> dict[str, str]:
    """For each mesh axis of size > 1: "inside" (every group along it lies in one process)
    or "across" (it spans processes)."""
    procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
    out = {}
    for i, name in enumerate(mesh.axis_names):
        if procs.shape[i] > 1:
            inside = bool((procs == np.take(procs, [0], axis=i)).all())
            out[name] = "inside" if inside else "across"
    return out


def describe(mesh: Mesh) -> str:
    """"data across processes, model inside each process" (for the start line)."""
    if not is_multiprocess(mesh):
        return "one process"
    return ", ".join(f"{a} {'inside each process' if p == 'inside' else 'across processes'}"
                     for a, p in axis_placement(mesh).items())


# ----------------------------------------------------------------------------- agreement
def digest(*parts: bytes) -> int:
    """A 31-bit checksum of byte strings (what every process must have alike)."""
    value = 0
    for part in parts:
        value = zlib.crc32(part, value)
    return value & 0x7FFFFFFF


def agree(mesh: Mesh, failed: bool, check: int, done: np.ndarray) -> np.ndarray:
    """Share, across the processes of `mesh`, this process's status, the `check` digest and
    `done` (bool `[N]`: input rows it found answered); returns the union of `done` `[N]`.

    Raises MultihostError when another process failed (this one is fine) or the digests
    differ. A process that failed itself gets the union back and raises its own error."""
    done = np.asarray(done, bool)
    if not is_multiprocess(mesh):
        return done
    from jax.experimental import multihost_utils

    mine = np.concatenate([[int(failed), check], done.astype(np.int32)]).astype(np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))      # [processes, 2 + N]
    if failed:
        return every[:, 2:].any(0)
    bad = [int(p) for p in np.flatnonzero(every[:, 0])]
    if bad:
        raise MultihostError(
            f"process{'es' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of "
            f"{len(every)} stopped before decoding (the reason is in its log); fix that and "
            f"start every process again.")
    if len(set(every[:, 1].tolist())) > 1:
        raise MultihostError(
            "the processes read different --input files or decoding flags (checksums "
            f"{sorted(set(every[:, 1].tolist()))}); give every process the same --input file "
            f"and the same command line.")
    return every[:, 2:].any(0)


def _client() -> Any:
    """The coordination client `jax.distributed.initialize` made (orbax uses it too), or None."""
    from jax._src import distributed

    return getattr(distributed.global_state, "client", None)


def barrier(name: str, timeout: float = 7 * 24 * 3600) -> None:
    """Wait until every process has arrived here (a no-op for one process). Waiting is not
    bounded by a short timeout, since processes decode unequal shares (--hosts-independent);
    a process that died is noticed by the `Watchdog` running meanwhile."""
    if jax.process_count() == 1:
        return
    client = _client()
    if client is None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
    else:
        client.wait_at_barrier(name, int(timeout * 1000))


# ----------------------------------------------------------------------------- feeding
def local_rows(sharding: jax.sharding.Sharding, shape: Sequence[int]) -> tuple[int, int]:
    """[lo, hi): the rows of a `[B, ...]` array that this process's devices hold."""
    starts, stops = [], []
    for dev, index in sharding.devices_indices_map(tuple(shape)).items():
        if dev.process_index == jax.process_index():
            rows = index[0] if index else slice(None)
            lo, hi, _ = rows.indices(shape[0])
            starts.append(lo)
            stops.append(hi)
    return min(starts), max(stops)


def feed(mesh: Mesh, batch: np.ndarray) -> Any:
    """`batch` `[B, P]` (the same on every process) as the decode's prompt array: within one
    process the numpy array itself; across processes a global array whose rows each process
    puts from its own part (rows over `data`, as `sharding.prompt_sharding`)."""
    if not is_multiprocess(mesh):
        return batch
    from dllm_jax.sharding import prompt_sharding

    sharding = prompt_sharding(mesh, batch.shape)
    lo, hi = local_rows(sharding, batch.shape)
    return jax.make_array_from_process_local_data(sharding, batch[lo:hi], batch.shape)


def replicate(mesh: Mesh, tree: Any) -> Any:
    """The jax arrays of `tree` (a PRNG key, a controller's fitted arrays) replicated over a
    multi-process mesh from their host values (a single-device array cannot be `device_put`
    there); unchanged within one process."""
    if not is_multiprocess(mesh):
        return tree
    rep = NamedSharding(mesh, P())

    def put(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(x)), rep)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), rep)

    return jax.tree.map(put, tree)


# ----------------------------------------------------------------------------- results
def _host_value(x: Any) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def answers_rows(mesh: Mesh, out: Any, per_host: bool) -> tuple[list[int], Any]:
    """(rows, host output) of a finished batch: the row numbers this process writes and an
    object like the GenerateOutput with numpy `tokens` `[B, G]`, `stats.nfe` `[B]`,
    `stats.steps` (rows other than `rows` may be zero).

    Within one process: every row. Across processes: all rows, gathered, on process 0 (none
    elsewhere); with `per_host`, the rows this process's devices hold (the lowest process
    of those holding a row writes it), with no cross-process transfer of the answers."""
    from types import SimpleNamespace

    n = int(out.tokens.shape[0])
    if not is_multiprocess(mesh):
        return list(range(n)), out
    steps = int(np.asarray(out.stats.steps.addressable_data(0)))
    if not per_host:
        tokens, nfe = _host_value(out.tokens), _host_value(out.stats.nfe)
        rows = list(range(n)) if jax.process_index() == 0 else []
    else:
        from dllm_jax.sharding import prompt_sharding

        sharding = prompt_sharding(mesh, out.tokens.shape)
        place = jax.jit(lambda a, b: (a, b), out_shardings=(
            sharding, prompt_sharding(mesh, out.stats.nfe.shape)))
        tok, nf = place(out.tokens, out.stats.nfe)
        tokens = np.zeros(out.tokens.shape, np.int32)
        nfe = np.zeros(out.stats.nfe.shape, np.int32)
        owner: dict[int, int] = {}
        for dev, index in sharding.devices_indices_map(tuple(tok.shape)).items():
            lo = index[0].indices(n)[0] if index else 0
            owner[lo] = min(owner.get(lo, dev.process_index), dev.process_index)
        mine: set[int] = set()
        for a, b in zip(tok.addressable_shards, nf.addressable_shards):
            lo, hi, _ = (a.index[0] if a.index else slice(None)).indices(n)
            if owner[lo] == jax.process_index() and lo not in mine:
                tokens[lo:hi] = np.asarray(a.data)
                nfe[lo:hi] = np.asarray(b.data)
                mine.update(range(lo, hi))
        rows = sorted(mine)
    return rows, SimpleNamespace(tokens=tokens, stats=SimpleNamespace(nfe=nfe, steps=steps))


def restored_share(params: Any) -> tuple[int, int]:
    """(bytes this process holds, bytes of the whole params): the sum over leaves of the
    distinct shards on this process's devices, i.e. what its restore read from the
    checkpoint (orbax reads each addressable shard's slice, nothing else)."""
    local = total = 0
    for leaf in jax.tree.leaves(params):
        total += leaf.size * leaf.dtype.itemsize
        seen = set()
        for shard in leaf.addressable_shards:
            key = tuple((s.start, s.stop) for s in shard.index)
            if key not in seen:
                seen.add(key)
                local += shard.data.size * leaf.dtype.itemsize
    return local, total


# ----------------------------------------------------------------------------- watchdog
class Watchdog:
    """Beats through the coordinator's key-value store and watches the other processes' beats.

    A process whose beat has not changed for `timeout` seconds (or a coordinator that cannot
    be reached for as long) ends this process with one `error:` line and EXIT_PEER_LOST.
    Use as a context manager around the work; leave it only after a `barrier`, so that a
    process that finished first is not taken for a dead one. A no-op for one process or
    where the runtime offers no key-value store."""

    def __init__(self, timeout: float, on_lost: Callable[[str], None] | None = None) -> None:
        self.timeout = float(timeout)
        self.index, self.count = jax.process_index(), jax.process_count()
        self.on_lost = on_lost or (lambda line: exit_now(EXIT_PEER_LOST, line, timeout))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = _client() if self.count > 1 else None

    def __enter__(self) -> "Watchdog":
        if self._client is not None:
            self._thread = threading.Thread(target=self._run, name="dllm-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        interval = max(0.2, min(1.0, self.timeout / 10))
        start = time.monotonic()
        seen = {p: (None, start) for p in range(self.count) if p != self.index}
        coordinator = start
        beat = 0
        while not self._stop.wait(interval):
            now = time.monotonic()
            beat += 1
            try:
                self._client.key_value_set(f"{_KEY}{self.index}", str(beat),
                                           allow_overwrite=True)
                coordinator = now
            except TypeError:       # a runtime without overwrite: no watchdog
                return
            except Exception:  # noqa: BLE001 - unreachable coordinator: judged below
                pass
            for p, (value, when) in seen.items():
                try:
                    got = self._client.key_value_try_get(f"{_KEY}{p}")
                except Exception:  # noqa: BLE001 - not started yet, or unreachable
                    continue
                if got != value:
                    seen[p] = (got, now)
            if self._stop.is_set():
                return
            if now - coordinator > self.timeout:
                return self.on_lost(
                    f"error: process {self.index} of {self.count} lost the coordinator "
                    f"(process 0) for {self.timeout:.0f} s: it was killed or crashed (see its "
                    f"log); stopping. Start every process again with the same command to "
                    f"resume: the answers written so far are kept.")
            lost = [p for p, (_, when) in seen.items() if now - when > self.timeout]
            if lost:
                return self.on_lost(
                    f"error: process {self.index} of {self.count}: process "
                    f"{', '.join(map(str, lost))} stopped responding for "
                    f"{self.timeout:.0f} s (killed, crashed or hung: see its log); stopping. "
                    f"Start every process again with the same command to resume: the answers "
                    f"written so far are kept.")


def lost_peer_line(e: BaseException) -> str:
    """The one line for a collective that failed because another process went away."""
    return (f"error: process {jax.process_index()} of {jax.process_count()}: a collective "
            f"with the other processes failed ({_first_line(e)[:200]}); another process "
            f"probably stopped (see its log). Start every process again with the same command "
            f"to resume: the answers written so far are kept.")


__all__ = ["DEFAULT_PEER_TIMEOUT", "EXIT_PEER_LOST", "MultihostError", "ShardingError",
           "Watchdog", "agree", "answers_rows", "axis_placement", "barrier", "describe",
           "digest", "enable_cpu_collectives", "exit_now", "feed", "global_mesh",
           "initialize", "is_collective_failure", "is_multiprocess", "local_rows",
           "lost_peer_line", "replicate", "restored_share"]

