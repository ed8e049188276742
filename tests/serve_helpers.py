"""Shared by the server tests: a real uvicorn server on a loopback port (in a thread), the
decode settings `dllm-jax generate` builds from flags, reference answers, SSE parsing."""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from typing import Any, Iterator

import jax
import uvicorn

from dllm_jax import session
from dllm_jax.cli_options import decode_settings
from dllm_jax.generate_cli import add_arguments as add_generate_arguments
from dllm_jax.serve.app import create_app

PROMPTS = ["sort: 9 4 7 1", "reverse: Eve Bob Zoe", "sort: 3 8 2", "reverse: Quinn Uma Carol",
           "sort: 5 1 6 2 9", "reverse: Bob Eve", "sort: 7 3", "reverse: Zoe Alice Bob Eve"]


@contextlib.contextmanager
def serving(sess: Any, app: Any = None, **app_kwargs: Any) -> Iterator[tuple[str, Any]]:
    """(base url, app) of a real server (uvicorn, 127.0.0.1, a free port) over `sess` (or
    serving `app`, made by `create_app`)."""
    app = create_app(sess, **app_kwargs) if app is None else app
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


def generate_settings(*flags: str) -> tuple[Any, Any, int]:
    """(GenerateConfig, controller, seed) exactly as `dllm-jax generate PROMPT *flags` builds
    them."""
    p = argparse.ArgumentParser()
    add_generate_arguments(p)
    args = p.parse_args(["prompt", *flags])
    gen, controller = decode_settings(args, str(session.resolve_model_dir(None)))
    return gen, controller, args.seed


def reference(sess: Any, prompts: list, *flags: str, chat: bool = False,
              key_seed: int | None = None, width: int | None = None) -> list:
    """`Session.generate` answers with `dllm-jax generate`'s settings for `flags`."""
    gen, controller, seed = generate_settings(*flags)
    key = jax.random.key(seed if key_seed is None else key_seed)
    return sess.generate(prompts, gen, controller, key=key, chat=chat, width=width)


def sse_payloads(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking that events are separated by blank
    lines and that every line is a field or a comment."""
    events, current = [], []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line:
            if current:
                events.append("\n".join(current))
                current = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        assert field in ("data", "event", "id", "retry"), line
        if field == "data":
            current.append(value[1:] if value.startswith(" ") else value)
    assert not current, "the stream ended inside an event"
    return events


def metric_samples(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                            + "}" if s.labels else "")
            out[key] = s.value
    return out
