"""What the scheduler thread runs on the device: a `Lane` (a continuous batch decoded block by
block, `blocks.py`) or, for what a lane cannot decode, one whole `decode.generate` call.

A Lane holds `max_batch` slots of one prompt width and one decode setting. `admit` puts
jobs' rows into free slots (their prompt is prefilled by the block's first step), `step`
decodes one block of every live row, reports each job's rows to its listener (streaming)
and completes the jobs whose rows have all finished, freeing their slots; `release` frees
the slots of jobs that were cancelled (timeout, client gone). A lane of a request that
samples (`DecodeSettings.uses_key`) is exclusive: its rows take slots 0..n-1 and nothing
joins, so its draws equal `generate`'s on `[prompt] * n` with `key(seed)`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, Callable

import numpy as np

from dllm_jax.serve import blocks as BL
from dllm_jax.serve.metrics import Metrics
from dllm_jax.serve.protocol import DecodeSettings


@dataclasses.dataclass(frozen=True)
class RowResult:
    """One row of a job, as decoded so far (`done`: finished).

    tokens: int `[G]` answer ids (MASK where undecided); fix_step: int `[G]` the row's own
    step that committed each token (-1: not yet); confidence: float `[G]` the committed
    candidate's confidence (NaN: not committed, or filled after EOS, or unknown).
    nfe, steps: forwards and loop steps of the row. batch_rows: live rows of its batch at
    its last block. joined_after: blocks its batch had decoded before the row joined (0:
    it started the batch). queued_s / decode_s: seconds waiting / from admission to now.
    """

    tokens: np.ndarray
    fix_step: np.ndarray
    confidence: np.ndarray
    nfe: int
    steps: int
    done: bool
    batch_rows: int
    joined_after: int
    queued_s: float
    decode_s: float


Listener = Callable[["Job", list[RowResult]], None]


@dataclasses.dataclass(eq=False)
class Job:
    """One prompt of a request: `rows` copies of its ids (several only for a request that
    samples). `listener(job, rows)` (optional, called from the scheduler thread) gets the
    rows after every block; `future` resolves to the final `list[RowResult]`."""

    ids: list[int]
    rows: int
    settings: DecodeSettings
    controller: Any
    listener: Listener | None = None
    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    _cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Give the job up (timeout, client gone): dropped from the queue, or its slots
        freed at the next block boundary."""
        self._cancelled.set()
        self.future.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


def width_ladder(n: int, bucket: int, limit: int) -> int:
    """The padded prompt width for a prompt of n tokens: the smallest bucket * 2^k >= n,
    capped at `limit` (the room the answer leaves), and never below n."""
    w = bucket
    while w < n:
        w *= 2
    return max(min(w, limit), n)


class Lane:
    """A continuous batch of `max_batch` slots, prompt width `width`, one decode setting."""

    def __init__(self, session: Any, head: Job, width: int, max_batch: int,
                 metrics: Metrics) -> None:
        import jax

        self.session, self.metrics, self.width = session, metrics, width
        self.settings, self.controller = head.settings, head.controller
        self.gen = dataclasses.replace(head.settings.gen, trace=False)
        self.exclusive = head.settings.uses_key
        self.slots = BL.empty_slots(session.cfg, self.gen, self.controller, batch=max_batch,
                                    width=width, dtype=session.params["embed"].dtype,
                                    key=jax.random.key(head.settings.seed))
        self.owner: list[tuple[Job, int] | None] = [None] * max_batch
        self.blocks = 0
        self._done: dict[Job, dict[int, RowResult]] = {}
        self._joined: dict[Job, tuple[float, int]] = {}

    # ------------------------------------------------------------------ slots
    @property
    def free(self) -> int:
        return sum(o is None for o in self.owner)

    @property
    def live(self) -> int:
        return len(self.owner) - self.free

    def jobs(self) -> list[Job]:
        return list(dict.fromkeys(o[0] for o in self.owner if o is not None))

    def accepts(self, job: Job) -> bool:
        """Whether `job` may join now: same settings, a greedy decode in a shared lane,
        a prompt that fits the width, enough free slots."""
        return (not self.exclusive and not job.settings.uses_key
                and job.settings.group == self.settings.group and len(job.ids) <= self.width
                and job.rows <= self.free)

    def admit(self, jobs: list[Job]) -> None:
        import jax.numpy as jnp

        b = len(self.owner)
        take = np.zeros(b, bool)
        ids = np.full((b, self.width), self.session.pad_id, np.int32)
        valid = np.ones((b, self.width), bool)
        now = time.perf_counter()
        for job in jobs:
            row_ids, row_valid = self.session.pad([job.ids], width=self.width)
            for r in range(job.rows):
                i = self.owner.index(None)
                self.owner[i] = (job, r)
                take[i], ids[i], valid[i] = True, row_ids[0], row_valid[0]
            self._joined[job] = (now, self.blocks)
            self._done[job] = {}
            if self.blocks:
                self.metrics.joined(job.rows)
        if take.any():
            self.slots = BL.admit(self.slots, jnp.asarray(take), jnp.asarray(ids),
                                  jnp.asarray(valid), self.controller, cfg=self.session.cfg,
                                  gen=self.gen)

    def release(self, jobs: list[Job]) -> None:
        """Free the slots of `jobs` (their rows stop at once)."""
        import jax.numpy as jnp

        drop = np.array([o is not None and o[0] in jobs for o in self.owner])
        if not drop.any():
            return
        for i in np.flatnonzero(drop):
            self.owner[i] = None
        for job in jobs:
            self._done.pop(job, None)
            self._joined.pop(job, None)
        self.slots = BL.release(self.slots, jnp.asarray(drop), cfg=self.session.cfg,
                                gen=self.gen)

    # ------------------------------------------------------------------ one block
    def step(self) -> None:
        """Decode one block of every live row; report rows, complete finished jobs."""
        import jax

        sess, gen = self.session, self.gen
        live = self.live
        t0 = time.perf_counter()
        self.slots = BL.run_block(sess.params, self.slots, self.controller, cfg=sess.cfg,
                                  gen=gen)
        p = self.width
        tok, fix, conf, nfe, steps = jax.device_get((
            self.slots.tokens[:, p:], self.slots.fix_step, self.slots.confidence,
            self.slots.nfe, self.slots.steps))
        now = time.perf_counter()
        self.blocks += 1
        self.metrics.block(live, now - t0)
        done = BL.finished(tok, steps, gen, sess.cfg.mask_token_id)
        rows: dict[Job, dict[int, RowResult]] = {}
        for i, o in enumerate(self.owner):
            if o is None:
                continue
            job, r = o
            since, joined = self._joined[job]
            rows.setdefault(job, {})[r] = RowResult(
                tokens=tok[i], fix_step=fix[i], confidence=conf[i], nfe=int(nfe[i]),
                steps=int(steps[i]), done=bool(done[i]), batch_rows=live, joined_after=joined,
                queued_s=since - job.submitted, decode_s=now - since)
            if done[i]:
                self.owner[i] = None
                self._done[job][r] = rows[job][r]
        for job, got in rows.items():
            snapshot = [got.get(r) or self._done[job][r] for r in range(job.rows)]
            if job.listener is not None:
                try:
                    job.listener(job, snapshot)
                except Exception:  # noqa: BLE001 - the request's event loop is gone
                    job.cancel()
            if len(self._done[job]) == job.rows:
                finals = [self._done[job][r] for r in range(job.rows)]
                self._finish(job, finals)

    def _finish(self, job: Job, finals: list[RowResult]) -> None:
        from dllm_jax.tokenizer import cut_at_eos

        eos = self.session.cfg.eos_token_id
        self.metrics.answers(sum(len(cut_at_eos(f.tokens, eos)) for f in finals),
                             [f.nfe for f in finals])
        del self._done[job], self._joined[job]
        if not job.future.done():
            job.future.set_result(finals)

    def fail(self, error: BaseException) -> None:
        for job in self.jobs():
            if not job.future.done():
                job.future.set_exception(error)
        self.owner = [None] * len(self.owner)


def decode_whole(session: Any, jobs: list[Job], max_batch: int, bucket: int,
                 metrics: Metrics, draft: Any = None) -> None:
    """Decode `jobs` (equal settings) in one `Session.generate_ids` call, padded to
    `max_batch` rows (speculative controllers, a session on a mesh, DiffusionGemma): the
    rows' listeners get the whole denoising at the end (confidences from the loop's trace;
    none from a canvas decode), then the futures resolve. `draft`: the draft model's Session,
    used when the jobs' controller is speculative (`serve --draft-model`)."""
    import jax

    head = jobs[0].settings
    listen = any(j.listener is not None for j in jobs)
    canvas = session.cfg.arch == "diffusion_gemma"      # its canvas decode keeps no trace
    gen = dataclasses.replace(head.gen, trace=listen and not canvas)
    seqs = [j.ids for j in jobs for _ in range(j.rows)]
    limit = session.cfg.max_position - gen.gen_length
    width = width_ladder(max(map(len, seqs)), bucket, limit)
    ids, valid = session.pad(seqs, width=width, rows=max_batch)
    t0 = time.perf_counter()
    ctrl = jobs[0].controller
    out = session.generate_ids(ids, valid, gen, ctrl, key=jax.random.key(head.seed),
                               draft=draft if ctrl.verify is not None else None)
    tokens, nfe = np.asarray(out.tokens), np.asarray(out.stats.nfe)
    fix, steps = np.asarray(out.stats.fix_step), int(out.stats.steps)
    seconds = time.perf_counter() - t0
    conf = np.full(tokens.shape, np.nan, np.float32)
    if gen.trace:  # the committed candidate's confidence, from the trace
        tc, tb = np.asarray(out.stats.trace["confidence"]), np.asarray(out.stats.trace["block"])
        rr, pos = np.nonzero(fix >= 0)
        s = fix[rr, pos]
        off = pos - tb[s] * gen.block_length
        inside = (off >= 0) & (off < gen.block_length)       # not filled after EOS
        conf[rr[inside], pos[inside]] = tc[s[inside], rr[inside], off[inside]]
    metrics.block(len(seqs), seconds)
    r = 0
    for job in jobs:
        finals = []
        for _ in range(job.rows):
            finals.append(RowResult(
                tokens=tokens[r], fix_step=fix[r], confidence=conf[r], nfe=int(nfe[r]),
                steps=steps, done=True, batch_rows=len(seqs), joined_after=0,
                queued_s=t0 - job.submitted, decode_s=seconds))
            r += 1
        from dllm_jax.tokenizer import cut_at_eos

        metrics.answers(sum(len(cut_at_eos(f.tokens, session.cfg.eos_token_id))
                            for f in finals), [f.nfe for f in finals])
        if job.listener is not None:
            job.listener(job, finals)
        job.future.set_result(finals)


__all__ = ["Job", "Lane", "Listener", "RowResult", "decode_whole", "width_ladder"]
