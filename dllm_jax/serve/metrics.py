"""The server's counters, rendered in the Prometheus text exposition format (version 0.0.4).

    dllm_requests_total{route, status}       requests answered, by route and HTTP status
    dllm_queue_depth / dllm_queue_rows       requests / rows waiting for a slot
    dllm_running_rows                        rows decoding now
    dllm_batches_total, dllm_batch_rows_total compiled decode calls (blocks) run and the live
                                             rows they held
    dllm_batch_occupancy                     histogram of live rows per call (of --max-batch)
    dllm_batch_size                          slots of a batch (every call is padded to it)
    dllm_joined_rows_total                   rows that joined a batch between two blocks
    dllm_answers_total                       answer rows finished
    dllm_generated_tokens_total              answer tokens (cut at EOS) of finished rows
    dllm_decode_seconds_total                wall time spent in decode calls
    dllm_tokens_per_second                   generated tokens / decode seconds so far
    dllm_answer_nfe                          histogram of forward passes per answer row
    dllm_request_latency_seconds             histogram of request latency (non-stream)
    dllm_first_event_seconds                 histogram of time to a stream's first decoded
                                             event
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from typing import Callable, Sequence


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: `le` upper bounds, +Inf last)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = sorted(set(float(b) for b in bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += float(value)
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.bounds + [math.inf], self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{_fmt(b)}"}} {acc}')
        return out + [f"{name}_sum {_fmt(self.sum)}", f"{name}_count {self.count}"]


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Thread-safe counters of one server (the scheduler thread and the request handlers
    write them). `queue` returns (waiting requests, waiting rows, running rows)."""

    def __init__(self, max_batch: int,
                 queue: Callable[[], tuple[int, int, int]] | None = None) -> None:
        self._lock = threading.Lock()
        self.max_batch = max_batch
        self.queue = queue or (lambda: (0, 0, 0))
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.batches = 0
        self.batch_rows = 0
        bounds = sorted({2 ** i for i in range(max_batch.bit_length() + 1)} | {max_batch})
        self.occupancy = Histogram([b for b in bounds if b <= max_batch])
        self.tokens = 0
        self.joined_rows = 0
        self.answer_rows = 0
        self.decode_seconds = 0.0
        self.nfe = Histogram([2 ** i for i in range(13)])
        self.latency = Histogram([0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300])
        self.first_event = Histogram([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])

    def request(self, route: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(route, int(status))] += 1
            if seconds is not None:
                self.latency.observe(seconds)

    def block(self, rows: int, seconds: float) -> None:
        """One compiled decode call over `rows` live rows."""
        with self._lock:
            self.batches += 1
            self.batch_rows += rows
            self.occupancy.observe(rows)
            self.decode_seconds += seconds

    def joined(self, rows: int) -> None:
        with self._lock:
            self.joined_rows += rows

    def answers(self, tokens: int, nfe: Sequence[int]) -> None:
        """Finished answer rows: their tokens (cut at EOS) and forwards."""
        with self._lock:
            self.tokens += tokens
            self.answer_rows += len(nfe)
            for v in nfe:
                self.nfe.observe(v)

    def first_event_after(self, seconds: float) -> None:
        with self._lock:
            self.first_event.observe(seconds)

    def render(self) -> str:
        waiting, waiting_rows, running = self.queue()
        with self._lock:
            blocks: list[tuple[str, str, str, list[str]]] = [
                ("dllm_requests_total", "counter", "Requests answered, by route and status.",
                 [f'dllm_requests_total{{route="{_esc(r)}",status="{s}"}} {n}'
                  for (r, s), n in sorted(self.requests.items())]),
                ("dllm_queue_depth", "gauge", "Requests waiting for a slot.",
                 [f"dllm_queue_depth {waiting}"]),
                ("dllm_queue_rows", "gauge", "Rows waiting for a slot.",
                 [f"dllm_queue_rows {waiting_rows}"]),
                ("dllm_running_rows", "gauge", "Rows decoding now.",
                 [f"dllm_running_rows {running}"]),
                ("dllm_batch_size", "gauge", "Slots of a batch.",
                 [f"dllm_batch_size {self.max_batch}"]),
                ("dllm_batches_total", "counter", "Compiled decode calls (blocks) run.",
                 [f"dllm_batches_total {self.batches}"]),
                ("dllm_batch_rows_total", "counter", "Live rows summed over decode calls.",
                 [f"dllm_batch_rows_total {self.batch_rows}"]),
                ("dllm_batch_occupancy", "histogram", "Live rows per decode call.",
                 self.occupancy.lines("dllm_batch_occupancy")),
                ("dllm_joined_rows_total", "counter", "Rows that joined a running batch.",
                 [f"dllm_joined_rows_total {self.joined_rows}"]),
                ("dllm_answers_total", "counter", "Answer rows finished.",
                 [f"dllm_answers_total {self.answer_rows}"]),
                ("dllm_generated_tokens_total", "counter", "Answer tokens (cut at EOS).",
                 [f"dllm_generated_tokens_total {self.tokens}"]),
                ("dllm_decode_seconds_total", "counter", "Wall time spent in decode calls.",
                 [f"dllm_decode_seconds_total {_fmt(self.decode_seconds)}"]),
                ("dllm_tokens_per_second", "gauge", "Generated tokens per decode second.",
                 [f"dllm_tokens_per_second "
                  f"{_fmt(self.tokens / self.decode_seconds if self.decode_seconds else 0.0)}"]),
                ("dllm_answer_nfe", "histogram", "Forward passes per answer row.",
                 self.nfe.lines("dllm_answer_nfe")),
                ("dllm_request_latency_seconds", "histogram",
                 "Latency of non-streamed requests.",
                 self.latency.lines("dllm_request_latency_seconds")),
                ("dllm_first_event_seconds", "histogram",
                 "Time from a stream's arrival to its first decoded event.",
                 self.first_event.lines("dllm_first_event_seconds")),
            ]
        out = []
        for name, kind, help_, lines in blocks:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *lines]
        return "\n".join(out) + "\n"


__all__ = ["Histogram", "Metrics"]
