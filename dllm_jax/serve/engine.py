"""The scheduler: one thread owns the device and decodes waiting requests with continuous
batching, one compiled block at a time.

- Requests become `Job`s (one per prompt: one row, or `n` rows for a request that samples)
  and wait in a bounded FIFO queue (`submit` raises a 429 ApiError when it is full).
- When the device is idle, the oldest waiting job opens a `Lane` (`lanes.py`): `max_batch`
  slots, its decode settings (`DecodeSettings.group`), a prompt width from a short ladder
  (`bucket * 2^k`, so a few compiled shapes per setting), and it is admitted together with
  the compatible jobs queued behind it (FIFO; `batch_wait` can hold a not-full lane back a
  few milliseconds to collect more).
- The lane decodes block by block (`blocks.run_block`: all steps of a block inside one
  compiled loop, every row at its own block). Between two blocks, rows that finished leave
  (their request is answered at once) and queued jobs with the same settings and a prompt
  that fits take the free slots (their prompt is prefilled by the next block's first step).
  Admission is FIFO and stops at the first waiting job that cannot join, so a request with
  other settings waits only until the running lane drains, then opens the next lane.
- Rows never influence each other, so in float32 an answer equals `generate`'s for that
  prompt alone, whether the row opened a lane or joined a full one mid-flight. A request
  that samples (temperature > 0, a random controller, an explicit `seed`) gets an exclusive
  lane, rows 0..n-1, key(seed): its answers equal `Session.generate([prompt] * n,
  key=jax.random.key(seed))` whatever else is queued.
- Speculative controllers (SimSD), sessions on a mesh and DiffusionGemma (its canvas
  sampler) are decoded by one whole `Session.generate_ids` call per batch instead
  (`lanes.decode_whole`); their streams come when that call has finished.
- A cancelled job (request timeout, client gone) leaves the queue, or frees its slots at the
  next block boundary. `close()` answers the queued jobs 503 and lets the lane finish the
  rows it holds.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from typing import Any, Callable

from dllm_jax.serve import blocks as BL
from dllm_jax.serve.lanes import Job, Lane, RowResult, decode_whole, width_ladder
from dllm_jax.serve.metrics import Metrics
from dllm_jax.serve.protocol import ApiError, bad_field


def bucket_length(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Engine:
    """The scheduler. `submit(job)` -> the job's Future of `list[RowResult]` (one per row).

    Args:
      session: a `dllm_jax.session.Session`.
      max_batch: slots per lane (rounded up to a multiple of the mesh's data axis).
      bucket: the prompt width ladder's first rung (widths bucket * 2^k).
      max_queue: most rows waiting; beyond it `submit` raises ApiError(429).
      batch_wait: seconds a new, not-full lane waits for more compatible requests (0: none).
      on_block: called by the scheduler thread between two blocks (instrumentation, tests).
    """

    def __init__(self, session: Any, *, max_batch: int = 8, bucket: int = 16,
                 max_queue: int = 256, batch_wait: float = 0.0,
                 metrics: Metrics | None = None,
                 on_block: Callable[[], None] | None = None, draft: Any = None) -> None:
        data, seq = 1, 1
        if session.mesh is not None:
            from dllm_jax import sharding as S

            sizes = S.mesh_sizes(session.mesh)
            data, seq = sizes["data"], sizes["seq"]
        self.session = session
        self.draft = draft          # a draft model's Session for speculative requests, or None
        self.max_batch = bucket_length(max(1, int(max_batch)), data)
        self.bucket = math.lcm(max(1, int(bucket)), seq)
        self.max_queue = int(max_queue)
        self.batch_wait = float(batch_wait)
        self.on_block = on_block
        self.metrics = metrics or Metrics(self.max_batch)
        self.metrics.queue = self.queue_size
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._running = 0
        self._thread: threading.Thread | None = None
        self._controllers: dict[Any, Any] = {}
        self._ctl_lock = threading.Lock()

    # ------------------------------------------------------------------ requests
    def controller(self, key: tuple[str, tuple[tuple[str, Any], ...]]) -> Any:
        """The controller of `DecodeSettings.controller_key`, built once; a bad option value
        raises ApiError(400) naming it."""
        from controllers import OptionError, get_spec

        with self._ctl_lock:
            if key not in self._controllers:
                name, options = key
                spec = get_spec(name)
                kw = dict(options)
                if spec.fitted:
                    kw["model_dir"] = str(self.session.model_dir)
                try:
                    self._controllers[key] = spec.build(**kw)
                except OptionError as e:
                    raise bad_field(e.option_name, str(e)) from None
                except ValueError as e:  # fitted files missing or unreadable
                    raise bad_field("controller", str(e)) from None
            return self._controllers[key]

    def queue_size(self) -> tuple[int, int, int]:
        """(waiting jobs, waiting rows, rows decoding now)."""
        with self._cond:
            return len(self._pending), sum(j.rows for j in self._pending), self._running

    def submit(self, job: Job) -> concurrent.futures.Future:
        if job.rows > self.max_batch:
            raise bad_field("n", f"n must be at most {self.max_batch} (--max-batch) for a "
                                 f"request that samples, got {job.rows}.")
        with self._cond:
            if self._closed:
                raise ApiError(503, "the server is shutting down; retry on another instance.",
                               type="server_error", code="shutting_down")
            if sum(j.rows for j in self._pending) + job.rows > self.max_queue:
                raise ApiError(429, f"the queue is full ({self.max_queue} rows waiting); retry "
                                    f"later.", type="rate_limit_error", code="queue_full")
            self._pending.append(job)
            self._cond.notify_all()
        self.start()
        return job.future

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="dllm-serve-engine",
                                                daemon=True)
                self._thread.start()

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop: queued jobs fail with a 503 error, the running lane finishes its rows."""
        with self._cond:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ApiError(
                    503, "the server shut down before this request was decoded; retry.",
                    type="server_error", code="shutting_down"))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ scheduling
    def _continuous(self, job: Job) -> bool:
        """Block by block (a Lane), or one whole `generate` call (speculative controllers,
        a mesh, DiffusionGemma's canvas decode, block-causal models: their blocks align to
        each row's absolute positions, `sequence_layout`, which a lane's slots do not)."""
        cfg = self.session.cfg
        return (self.session.mesh is None and cfg.arch != "diffusion_gemma"
                and not cfg.block_causal and BL.supports(job.controller, job.settings.gen.block_length))

    def _start(self, job: Job) -> bool:
        """Mark a queued job running (False: it was cancelled meanwhile)."""
        return not job.cancelled and job.future.set_running_or_notify_cancel()

    def _take_new(self) -> tuple[list[Job], bool]:
        """(jobs, continuous) for a new lane or whole decode (lock held): the oldest live
        job and the compatible jobs behind it, FIFO, up to max_batch rows."""
        self._pending = [j for j in self._pending if not j.cancelled]
        if not self._pending:
            return [], False
        head = self._pending[0]
        batch, rows = [head], head.rows
        if not head.settings.uses_key:
            for job in self._pending[1:]:
                if rows + job.rows > self.max_batch:
                    break
                if not job.settings.uses_key and job.settings.group == head.settings.group:
                    batch.append(job)
                    rows += job.rows
        self._pending = [j for j in self._pending if j not in batch]
        return [j for j in batch if self._start(j)], self._continuous(head)

    def _take_joiners(self, lane: Lane) -> list[Job]:
        """Queued jobs that join `lane` now (lock held): FIFO, up to the first that cannot."""
        self._pending = [j for j in self._pending if not j.cancelled]
        out, free = [], lane.free
        for job in self._pending:
            if job.rows > free or not lane.accepts(job):
                break
            out.append(job)
            free -= job.rows
        self._pending = self._pending[len(out):]
        return [j for j in out if self._start(j)]

    def _head_rows(self) -> int:
        head = self._pending[0]
        if head.settings.uses_key:
            return self.max_batch
        return sum(j.rows for j in self._pending if not j.settings.uses_key
                   and j.settings.group == head.settings.group)

    def _wait_for_work(self) -> tuple[list[Job], bool] | None:
        """Block until there is a new lane to open (None: closed and nothing queued)."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed and not self._pending:
                return None
            if self.batch_wait > 0:
                end = time.perf_counter() + self.batch_wait
                while (not self._closed and self._pending
                       and self._head_rows() < self.max_batch
                       and (left := end - time.perf_counter()) > 0):
                    self._cond.wait(left)
            jobs, continuous = self._take_new()
            self._running = sum(j.rows for j in jobs)
            return jobs, continuous

    def _loop(self) -> None:
        while (work := self._wait_for_work()) is not None:
            jobs, continuous = work
            if jobs:
                try:
                    if continuous:
                        self._run_lane(jobs)
                    else:
                        decode_whole(self.session, jobs, self.max_batch, self.bucket,
                                     self.metrics, draft=self.draft)
                except BaseException as e:  # noqa: BLE001 - every waiting request gets it
                    err = e if isinstance(e, ApiError) else ApiError(
                        500, f"the decode failed: {type(e).__name__}: {e}",
                        type="server_error", code="decode_failed")
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(err)
            with self._cond:
                self._running = 0

    def _run_lane(self, jobs: list[Job]) -> None:
        head = jobs[0]
        limit = self.session.cfg.max_position - head.settings.gen.gen_length
        width = width_ladder(max(len(j.ids) for j in jobs), self.bucket, limit)
        lane = Lane(self.session, head, width, self.max_batch, self.metrics)
        try:
            lane.admit(jobs)
            while lane.live:
                lane.step()
                if self.on_block is not None:
                    self.on_block()
                gone = [j for j in lane.jobs() if j.cancelled]
                if gone:
                    lane.release(gone)
                with self._cond:
                    joiners = [] if self._closed else self._take_joiners(lane)
                    self._running = lane.live + sum(j.rows for j in joiners)
                if joiners:
                    lane.admit(joiners)
        except BaseException as e:
            err = e if isinstance(e, ApiError) else ApiError(
                500, f"the decode failed: {type(e).__name__}: {e}", type="server_error",
                code="decode_failed")
            lane.fail(err)
            raise


__all__ = ["Engine", "Job", "RowResult", "bucket_length"]
