"""The OpenAI-compatible HTTP API (FastAPI) over the batching `Engine`.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true`: server-sent
events in OpenAI's chunk format, sent as the blocks are decoded, ending with `data:
[DONE]`; see `responses.py`), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET
/metrics` (Prometheus text), `GET /` (the demo page, `static/index.html`: the denoising
drawn live from a stream). Errors are OpenAI's `{"error": {"message", "type", "param",
"code"}}`: 400 for bad JSON and bad fields (named in `param`), 404 for an unknown model or
route, 429 when the queue is full, 503 while shutting down, 504 past the request timeout.

    from dllm_jax import session
    from dllm_jax.serve.app import create_app
    app = create_app(session.load())          # uvicorn.run(app) or `dllm-jax serve`
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from controllers import uses_time_grid
from dllm_jax.serve import responses as R
from dllm_jax.serve.engine import Engine
from dllm_jax.serve.lanes import Job, Listener, RowResult
from dllm_jax.serve.metrics import Metrics
from dllm_jax.serve.protocol import (ApiError, ServeDefaults, bad_field, decode_settings,
                                     parse_request, stop_strings)
from dllm_jax.serve.streaming import Stream

#: The demo page `GET /` serves (package data).
DEMO_PAGE = Path(__file__).with_name("static") / "index.html"

#: The chat template of models whose tokenizer has none (the bundled task model): the
#: messages' contents joined by spaces, so a chat message decodes like the same prompt.
TRIVIAL_CHAT_TEMPLATE = ("{% for m in messages %}{% if not loop.first %} {% endif %}"
                         "{{ m['content'] }}{% endfor %}")


def with_chat_template(sess: Any) -> Any:
    """`sess`, its tokenizer given TRIVIAL_CHAT_TEMPLATE when it has no chat template."""
    tok = sess.tokenizer
    if tok is None or tok.chat_template is not None:
        return sess
    tok = dataclasses.replace(tok, chat_template=TRIVIAL_CHAT_TEMPLATE, _compiled_template=None)
    return dataclasses.replace(sess, tokenizer=tok)


def _check_canvas_options(controller: Any, arch: str) -> None:
    """entropy_bound's canvas-only options are refused on masked models (as `generate`
    refuses them), with a 400 naming the first."""
    from controllers.entropy_bound import EntropyBound

    if arch != "diffusion_gemma" and isinstance(controller, EntropyBound):
        changed = controller.canvas_only_changes()
        if changed:
            raise bad_field(changed[0], f"{', '.join(changed)} apply to DiffusionGemma's canvas "
                                        f"only; this is a {arch} model, leave them out.")


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class Server:
    """The state behind the routes: session, engine, metrics and settings."""

    def __init__(self, sess: Any, *, served_model_name: str | None, defaults: ServeDefaults,
                 max_batch: int, bucket: int, max_queue: int, request_timeout: float,
                 batch_wait: float, on_block: Callable[[], None] | None = None,
                 draft: Any = None) -> None:
        self.session = with_chat_template(sess)
        self.model_name = served_model_name or self.session.model_dir.name
        self.defaults = defaults
        self.request_timeout = float(request_timeout)
        self.metrics = Metrics(max_batch)
        self.engine = Engine(self.session, max_batch=max_batch, bucket=bucket,
                             max_queue=max_queue, batch_wait=batch_wait, metrics=self.metrics,
                             on_block=on_block, draft=draft)
        self.metrics.max_batch = self.engine.max_batch
        self.created = int(time.time())

    # ------------------------------------------------------------------ request -> jobs
    def check_model(self, model: str | None) -> None:
        if model not in (None, "default", self.model_name):
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.model_name!r} (or send 'default').", param="model",
                           code="model_not_found")

    def _encode_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.session.cfg.vocab_size
        if not ids:
            raise bad_field(param, f"{param} is empty; give at least one token.")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_field(param, f"token ids in {param} must lie in [0, {vocab}), got "
                                   f"{bad[:5]}.")
        return ids

    def _encode_text(self, text: str, param: str) -> list[int]:
        if not text.strip():
            raise bad_field(param, f"{param} is empty; give some text.")
        if self.session.tokenizer is None:
            raise bad_field(param, "this model has no tokenizer; send the prompt as token ids.")
        return self.session.tokenizer.encode(text)

    def prompts(self, req: Any, chat: bool) -> list[list[int]]:
        if chat:
            if self.session.tokenizer is None:
                raise bad_field("messages", "this model has no tokenizer, so chat is not "
                                            "available; use /v1/completions with token ids.")
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            try:
                text = self.session.tokenizer.apply_chat_template(msgs)
            except Exception as e:  # noqa: BLE001 - the template's own message (jinja)
                raise bad_field("messages", f"the chat template refused the messages: {e}")
            return [self._encode_text(text, "messages")]
        p = req.prompt
        if isinstance(p, str):
            return [self._encode_text(p, "prompt")]
        if not p:
            raise bad_field("prompt", "prompt is an empty list.")
        if isinstance(p[0], int):
            return [self._encode_ids(list(p), "prompt")]
        if isinstance(p[0], str):
            return [self._encode_text(s, "prompt") for s in p]
        return [self._encode_ids(list(s), "prompt") for s in p]

    def submit(self, req: Any, chat: bool, listener: Listener | None = None
               ) -> tuple[list[list[int]], list[Job]]:
        self.check_model(req.model)
        cfg = self.session.cfg
        settings = decode_settings(req, self.defaults, cfg.max_position - 1)
        prompts = self.prompts(req, chat)
        param = "messages" if chat else "prompt"
        room = cfg.max_position - settings.gen.gen_length
        for p in prompts:
            if len(p) > room:
                raise bad_field(param, f"the prompt has {len(p)} tokens; with "
                                       f"{settings.gen.gen_length} answer tokens the model's "
                                       f"maximum length {cfg.max_position} leaves room for "
                                       f"{room}.")
        max_batch = self.engine.max_batch
        if req.n > max_batch:
            raise bad_field("n", f"n must be at most {max_batch} (--max-batch), got {req.n}.")
        if len(prompts) * req.n > self.engine.max_queue:
            raise bad_field("prompt", f"{len(prompts)} prompts x n={req.n} exceed the queue "
                                      f"({self.engine.max_queue} rows).")
        controller = self.engine.controller(settings.controller_key)
        _check_canvas_options(controller, cfg.arch)
        gen = settings.gen
        if gen.steps > gen.gen_length and not uses_time_grid(controller):
            raise bad_field("steps", f"steps ({gen.steps}) is more than the answer length "
                                     f"({gen.gen_length}): controller "
                                     f"{settings.controller_key[0]} commits at least one token "
                                     f"per step, so at most {gen.gen_length} steps would run.")
        rows = req.n if settings.uses_key else 1
        jobs = [Job(ids=p, rows=rows, settings=settings, controller=controller,
                    listener=listener) for p in prompts]
        submitted: list[Job] = []
        try:
            for job in jobs:
                self.engine.submit(job)
                submitted.append(job)
        except ApiError:
            for job in submitted:
                job.cancel()
            raise
        return prompts, jobs

    async def results(self, req: Any, jobs: list[Job]) -> list[R.Choice]:
        """Wait for the jobs (request timeout: 504) -> the choices, index = prompt * n + j."""
        futs = [asyncio.wrap_future(j.future) for j in jobs]
        try:
            _, late = await asyncio.wait(futs, timeout=self.request_timeout)
        except asyncio.CancelledError:  # the client left or the server is stopping
            for j in jobs:
                j.cancel()
            raise
        if late:
            for j in jobs:
                j.cancel()
            raise self.timeout_error()
        errors = [e for e in (f.exception() for f in futs if not f.cancelled()) if e is not None]
        if errors:
            raise errors[0]
        return self.choices(req, [f.result() for f in futs])

    def timeout_error(self) -> ApiError:
        return ApiError(504, f"the request took longer than the server's timeout "
                             f"({self.request_timeout:g} s).", type="timeout_error",
                        code="timeout")

    def choices(self, req: Any, done: list[list[RowResult]]) -> list[R.Choice]:
        stops = stop_strings(req)
        out = []
        for pi, rows in enumerate(done):
            for j in range(req.n):
                row = rows[j] if len(rows) > 1 else rows[0]
                out.append(R.finish(self.session, row, pi * req.n + j, stops))
        return out

    # ------------------------------------------------------------------ routes
    async def complete(self, request: Request, chat: bool) -> Any:
        route = request.url.path
        t0 = time.perf_counter()
        try:
            try:
                body = json.loads(await request.body())
            except ValueError as e:
                raise ApiError(400, f"the request body is not valid JSON ({e}).",
                               code="invalid_json") from None
            req = parse_request("chat" if chat else "completion", body)
            rid = R.new_id("chatcmpl" if chat else "cmpl")
            if req.stream:
                stream = Stream(self, req, rid, chat, t0)
                prompts, jobs = self.submit(req, chat, stream.listener)
                self.metrics.request(route, 200)
                return stream.response(prompts, jobs)
            prompts, jobs = self.submit(req, chat)
            choices = await self.results(req, jobs)
        except ApiError as e:
            self.metrics.request(route, e.status)
            return _error(e)
        self.metrics.request(route, 200, time.perf_counter() - t0)
        return JSONResponse(R.completion_body(rid, self.model_name, chat, choices,
                                              R.usage([len(p) for p in prompts], choices,
                                                      req.n)))

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "dllm-jax", "max_model_len": self.session.cfg.max_position,
                "root": str(self.session.model_dir)}


def create_app(sess: Any, *, served_model_name: str | None = None,
               defaults: ServeDefaults | None = None, max_batch: int = 8, bucket: int = 16,
               max_queue: int = 256, request_timeout: float = 600.0,
               batch_wait: float = 0.0, on_block: Callable[[], None] | None = None,
               draft: Any = None) -> FastAPI:
    """The FastAPI app serving `sess` (a `session.Session`). `app.state.server` holds the
    Server (engine, metrics). The engine thread starts with the app (or at the first
    request) and stops at shutdown: queued requests then get a 503. `on_block`: called
    by the scheduler thread between two blocks (see `Engine`). `draft`: a draft model's
    Session (same tokenizer, same mesh) for the requests whose controller is speculative
    (`simsd`); None: they self-draft."""
    server = Server(sess, served_model_name=served_model_name,
                    defaults=defaults or ServeDefaults(), max_batch=max_batch, bucket=bucket,
                    max_queue=max_queue, request_timeout=request_timeout,
                    batch_wait=batch_wait, on_block=on_block, draft=draft)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.engine.close)

    app = FastAPI(title="dllm-jax", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error(ApiError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        return _error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                               type="server_error", code="internal_error"))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await server.complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await server.complete(request, chat=True)

    @app.get("/", response_class=HTMLResponse)
    async def demo() -> Any:
        return HTMLResponse(DEMO_PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models() -> Any:
        return server.models()

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> Any:
        try:
            server.check_model(model_id)
        except ApiError as e:
            return _error(e)
        return server.model_card()

    @app.get("/health")
    async def health() -> Any:
        if server.engine.closed:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        waiting, rows, running = server.engine.queue_size()
        return {"status": "ok", "model": server.model_name, "queue_depth": waiting,
                "queue_rows": rows, "running_rows": running}

    @app.get("/metrics")
    async def metrics() -> Any:
        return PlainTextResponse(server.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


__all__ = ["Server", "TRIVIAL_CHAT_TEMPLATE", "create_app", "with_chat_template"]
