"""One streamed request (`stream: true`): the scheduler's row states, handed over after every
block, become server-sent events in OpenAI's chunk format as they arrive.

The scheduler thread calls `Stream.listener(job, rows)`; the rows cross into the event loop
through `call_soon_threadsafe` and an asyncio queue, in the order they were decoded, and
each job's completion follows its last rows through the same queue. Chunks (see
`responses.py`): a chat stream's role chunk at once; per choice, one chunk per step that
committed tokens; each choice's last chunk (rest of the text, `finish_reason`, `dllm`
totals) when its prompt is done; the usage chunk (`stream_options.include_usage`); `data:
[DONE]`. Past the request timeout, or on a decode error, the stream sends an error object
and `[DONE]`; a client that leaves cancels its rows (their slots are freed at the next
block boundary).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from dllm_jax.serve import responses as R
from dllm_jax.serve.lanes import Job, RowResult
from dllm_jax.serve.protocol import ApiError, stop_strings

#: Seconds a running stream may take to finish after SIGTERM (uvicorn's own grace: 30 s).
STREAM_GRACE_S = 25.0


class Stream:
    """Built inside the request handler (it captures the running event loop); `listener`
    goes on the request's jobs before they are submitted."""

    def __init__(self, server: Any, req: Any, rid: str, chat: bool, t0: float) -> None:
        self.server, self.req, self.rid, self.chat, self.t0 = server, req, rid, chat, t0
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Job, list[RowResult] | None]] = asyncio.Queue()

    def listener(self, job: Job, rows: list[RowResult]) -> None:
        """Called by the scheduler thread after each block with the job's rows."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("rows", job, rows))

    def response(self, prompts: list[list[int]], jobs: list[Job]) -> Any:
        from sse_starlette.sse import EventSourceResponse

        for job in jobs:
            job.future.add_done_callback(lambda _f, j=job: self.loop.call_soon_threadsafe(
                self.queue.put_nowait, ("done", j, None)))
        # on shutdown, a running stream gets STREAM_GRACE_S to finish before it is cut
        return EventSourceResponse(self._events(prompts, jobs), ping=15,
                                   shutdown_grace_period=STREAM_GRACE_S)

    def _data(self, body: Any) -> dict[str, str]:
        return {"data": body if isinstance(body, str) else json.dumps(body)}

    async def _events(self, prompts: list[list[int]], jobs: list[Job]
                      ) -> AsyncIterator[dict[str, str]]:
        req, chat, server = self.req, self.chat, self.server
        model, n = server.model_name, req.n
        position = {job: i for i, job in enumerate(jobs)}
        lb = jobs[0].settings.gen.block_length
        streams = {i: R.ChoiceStream(server.session, stop_strings(req), lb)
                   for i in range(len(jobs) * n)}

        def indices(job: Job, r: int) -> list[int]:
            base = position[job] * n
            return [base + r] if job.rows > 1 else [base + j for j in range(n)]

        def step_chunks(job: Job, rows: list[RowResult]) -> list[dict[str, Any]]:
            out = []
            for r, row in enumerate(rows):
                for index in indices(job, r):
                    for delta, d in streams[index].update(row):
                        out.append(R.chunk(self.rid, model, chat, index, delta, None, d))
            return out

        if chat:
            for i in range(len(jobs) * n):
                yield self._data(R.chunk(self.rid, model, chat, i, "", None, role=True))
        finals: dict[Job, list[RowResult]] = {}
        first = True
        deadline = self.t0 + server.request_timeout
        try:
            while len(finals) < len(jobs):
                try:
                    kind, job, rows = await asyncio.wait_for(
                        self.queue.get(), max(0.0, deadline - time.perf_counter()))
                except (asyncio.TimeoutError, TimeoutError):
                    raise server.timeout_error() from None
                if kind == "rows":
                    for c in step_chunks(job, rows or []):
                        if first:
                            server.metrics.first_event_after(time.perf_counter() - self.t0)
                            first = False
                        yield self._data(c)
                    continue
                if job.future.cancelled():
                    raise ApiError(503, "the request was cancelled by the server.",
                                   type="server_error", code="cancelled")
                if (err := job.future.exception()) is not None:
                    raise err
                finals[job] = job.future.result()
                for c in step_chunks(job, finals[job]):   # anything not streamed yet
                    yield self._data(c)
                for ch in server.choices(req, [finals[job]]):
                    index = position[job] * n + ch.index
                    ch = R.Choice(index, ch.ids, ch.text, ch.finish_reason, ch.row)
                    yield self._data(R.chunk(self.rid, model, chat, index,
                                             streams[index].final_delta(ch), ch.finish_reason,
                                             {"final": True, **R.dllm_totals(ch)}))
        except ApiError as e:
            for j in jobs:
                j.cancel()
            yield self._data(e.body())
            yield self._data("[DONE]")
            return
        finally:
            for j in jobs:
                if not j.future.done():
                    j.cancel()
        if req.stream_options is not None and req.stream_options.include_usage:
            choices = server.choices(req, [finals[j] for j in jobs])
            use = R.usage([len(p) for p in prompts], choices, n)
            yield self._data({"id": self.rid, "object": "chat.completion.chunk" if chat
                              else "text_completion", "created": int(time.time()),
                              "model": model, "choices": [], "usage": use})
        yield self._data("[DONE]")


__all__ = ["STREAM_GRACE_S", "Stream"]
