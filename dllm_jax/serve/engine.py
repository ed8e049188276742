"""The batching scheduler: one thread owns the device and decodes batches of waiting requests.

How batching works here (and what "continuous" means for a compiled dLLM decode):

- Requests become `Job`s (one per prompt: one row, or `n` rows for a request that samples)
  and wait in a bounded FIFO queue (`submit` raises a 429 ApiError when it is full).
- The scheduler thread takes the oldest waiting job and, behind it in arrival order, every
  waiting job with the same decode settings (`DecodeSettings.group`: GenerateConfig and
  controller) until `max_batch` rows are filled; it pads the prompts on the left to the
  longest one rounded up to a multiple of `bucket` (as `dllm-jax batch` does), fills the
  remaining rows with copies of a real row, and runs `decode.generate` once. So shapes are
  `[max_batch, bucket * k]`: a few compiles per setting, whatever the traffic.
- `decode.generate` runs the whole denoising of a batch in one compiled `lax.while_loop`, so a
  running batch cannot take new rows: requests that arrive while it runs wait for the NEXT
  batch, which starts as soon as the device is free (no fixed window; `batch_wait` can hold a
  not-full batch back a few milliseconds to collect more). Slot refill between blocks of a
  running batch is not done.
- Rows never influence each other in `generate` (blocks advance in lockstep, a finished row
  waits unchanged), so a greedy answer is the same alone or in a full batch. A request whose
  decode draws on the PRNG key (temperature > 0, a random controller, or an explicit `seed`)
  is decoded in a batch of its own, rows 0..n-1, with `key(seed)`: its answers then equal
  `Session.generate([prompt] * n, key=jax.random.key(seed))` whatever else is queued.
- A batch with a streaming job decodes with `GenerateConfig(trace=True)`, so the job gets the
  per-step commits to replay (see `stream.py`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import threading
import time
from typing import Any

import numpy as np

from dllm_jax.serve.metrics import Metrics
from dllm_jax.serve.protocol import ApiError, DecodeSettings, bad_field


@dataclasses.dataclass(eq=False)
class Job:
    """One prompt of a request: `rows` copies of its ids decode in one batch."""

    ids: list[int]
    rows: int
    settings: DecodeSettings
    controller: Any
    trace: bool = False
    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass(frozen=True)
class RowResult:
    """One decoded row. tokens / fix_step `[G]` (fix_step: the loop step that fixed each
    answer token, -1 never); with a trace, confidence `[S, Lb]` of the candidates at each
    step and block `[S]` (the active block, -1 after the last step)."""

    tokens: np.ndarray
    nfe: int
    steps: int
    fix_step: np.ndarray
    confidence: np.ndarray | None
    block: np.ndarray | None
    batch_rows: int
    queued_s: float
    decode_s: float


def bucket_length(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Engine:
    """The scheduler. `submit(job)` -> the job's Future of `list[RowResult]` (one per row).

    Args:
      session: a `dllm_jax.session.Session` (its mesh, if any, shards each batch).
      max_batch: rows per batch (rounded up to a multiple of the mesh's data axis).
      bucket: prompt widths are padded to multiples of this (and of the mesh's seq axis).
      max_queue: most rows waiting; beyond it `submit` raises ApiError(429).
      batch_wait: seconds a not-full batch waits for more compatible requests (0: none).
    """

    def __init__(self, session: Any, *, max_batch: int = 8, bucket: int = 16,
                 max_queue: int = 256, batch_wait: float = 0.0,
                 metrics: Metrics | None = None) -> None:
        data, seq = 1, 1
        if session.mesh is not None:
            from dllm_jax import sharding as S

            sizes = S.mesh_sizes(session.mesh)
            data, seq = sizes["data"], sizes["seq"]
        self.session = session
        self.max_batch = bucket_length(max(1, int(max_batch)), data)
        self.bucket = math.lcm(max(1, int(bucket)), seq)
        self.max_queue = int(max_queue)
        self.batch_wait = float(batch_wait)
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
        """(waiting jobs, waiting rows, rows of the batch decoding now)."""
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
        """Stop: queued jobs fail with a 503 error, the running batch finishes."""
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

    # ------------------------------------------------------------------ scheduler
    def _take(self) -> list[Job]:
        """The next batch (called with the lock held): the oldest live job and the
        compatible jobs behind it, FIFO, up to max_batch rows."""
        self._pending = [j for j in self._pending if not j.future.cancelled()]
        if not self._pending:
            return []
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
        return [j for j in batch if j.future.set_running_or_notify_cancel()]

    def _head_rows(self) -> int:
        head = self._pending[0]
        if head.settings.uses_key:
            return self.max_batch
        return sum(j.rows for j in self._pending if not j.settings.uses_key
                   and j.settings.group == head.settings.group)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed and not self._pending:
                    return
                if self.batch_wait > 0:
                    end = time.perf_counter() + self.batch_wait
                    while (not self._closed and self._pending
                           and self._head_rows() < self.max_batch
                           and (left := end - time.perf_counter()) > 0):
                        self._cond.wait(left)
                batch = self._take()
                self._running = sum(j.rows for j in batch)
            if batch:
                self._run(batch)
            with self._cond:
                self._running = 0

    def _run(self, batch: list[Job]) -> None:
        try:
            results = self._decode(batch)
        except BaseException as e:  # noqa: BLE001 - every waiting request gets the error
            err = e if isinstance(e, ApiError) else ApiError(
                500, f"the decode failed: {type(e).__name__}: {e}", type="server_error",
                code="decode_failed")
            for job in batch:
                job.future.set_exception(err)
            return
        for job, rows in zip(batch, results):
            job.future.set_result(rows)

    def _decode(self, batch: list[Job]) -> list[list[RowResult]]:
        import jax

        sess, head = self.session, batch[0].settings
        gen = dataclasses.replace(head.gen, trace=any(j.trace for j in batch))
        seqs = [j.ids for j in batch for _ in range(j.rows)]
        width = bucket_length(max(len(s) for s in seqs), self.bucket)
        width = max(min(width, sess.cfg.max_position - gen.gen_length), max(map(len, seqs)))
        ids, valid = sess.pad(seqs, width=width, rows=self.max_batch)
        t0 = time.perf_counter()
        out = sess.generate_ids(ids, valid, gen, batch[0].controller,
                                key=jax.random.key(head.seed))
        tokens = np.asarray(out.tokens)
        seconds = time.perf_counter() - t0
        nfe, fix = np.asarray(out.stats.nfe), np.asarray(out.stats.fix_step)
        steps = int(out.stats.steps)
        conf = blocks = None
        if gen.trace:
            conf = np.asarray(out.stats.trace["confidence"])
            blocks = np.asarray(out.stats.trace["block"])
        from dllm_jax.session import cut_at_eos

        eos = sess.cfg.eos_token_id
        n_real = len(seqs)
        self.metrics.batch(n_real, seconds,
                           sum(len(cut_at_eos(tokens[r], eos)) for r in range(n_real)),
                           [int(v) for v in nfe[:n_real]])
        results, r = [], 0
        for job in batch:
            rows = []
            for _ in range(job.rows):
                rows.append(RowResult(
                    tokens=tokens[r], nfe=int(nfe[r]), steps=steps, fix_step=fix[r],
                    confidence=None if conf is None else conf[:, r],
                    block=blocks, batch_rows=n_real, queued_s=t0 - job.submitted,
                    decode_s=seconds))
                r += 1
            results.append(rows)
        return results


__all__ = ["Engine", "Job", "RowResult", "bucket_length"]
