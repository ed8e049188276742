"""`dllm-jax serve`: the OpenAI-compatible server on a real loopback port (uvicorn in a thread,
httpx as the client) with the bundled model: answers equal `dllm-jax generate`'s for the same
settings (alone or batched), streams carry the denoising block by block and concatenate to the
answer, errors are OpenAI-shaped, the metrics parse, a full queue gets 429, SIGTERM exits 0.
(Continuous batching: test_serve_blocks.py; the openai client: test_serve_openai.py; the
demo page in a browser: test_serve_demo.py.)"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import httpx

from dllm_jax import session
from dllm_jax.cli_options import DEFAULT_GEN_LENGTH
from dllm_jax.serve.app import create_app, with_chat_template
from dllm_jax.serve.protocol import ServeDefaults
from tests.serve_helpers import (PROMPTS, generate_settings, metric_samples, reference,
                                 serving, sse_payloads)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sess():
    return with_chat_template(session.load())


@pytest.fixture(scope="module")
def url(sess):
    """A real server (uvicorn, loopback, any free port) over the bundled model."""
    with serving(sess, max_batch=4) as (base, _app):
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


# ----------------------------------------------------------------------------- answers
def test_defaults_are_generates() -> None:
    gen, controller, seed = generate_settings()
    d = ServeDefaults()
    assert d.gen_length == DEFAULT_GEN_LENGTH == gen.gen_length
    assert (d.temperature, d.cfg, d.cache, d.refresh_every, d.seed) == (
        gen.temperature, gen.cfg_scale, gen.cache, gen.refresh_every, seed)
    assert d.block_length is None and d.steps is None  # = the answer length, as in generate
    assert gen.block_length == gen.steps == gen.gen_length
    assert type(controller).__name__ == "LowConfidence" and d.controller == "low_confidence"


def test_completions_equal_generate(sess, client) -> None:
    prompts = [PROMPTS[0], "sort: 5 1 6 2"]          # equal lengths: one reference compile
    r = client.post("/v1/completions", json={"prompt": prompts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tasks-llada-4.6m"
    ref = reference(sess, prompts[:1]) + reference(sess, prompts[1:])
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for c, a in zip(body["choices"], ref):
        assert c["text"] == a.text and c["dllm"]["tokens"] == a.tokens and c["dllm"]["nfe"] == a.nfe
        assert c["finish_reason"] == "stop"
    assert ref[0].text == "1 4 7 9"
    assert body["usage"]["completion_tokens"] == sum(len(a.tokens) for a in ref)
    # token-id prompts and the dLLM fields
    ids = sess.encode(PROMPTS[2])
    r = client.post("/v1/completions", json={
        "prompt": ids, "model": "default", "controller": "threshold", "threshold": 0.8,
        "block_length": 8, "cache": "dual", "max_tokens": 32})
    assert r.status_code == 200, r.text
    [a] = reference(sess, [ids], "--controller", "threshold", "--threshold", "0.8",
                    "--block-length", "8", "--cache", "dual")
    c = r.json()["choices"][0]
    assert (c["text"], c["dllm"]["tokens"], c["dllm"]["nfe"]) == (a.text, a.tokens, a.nfe)


def test_chat_equals_generate(sess, client) -> None:
    msgs = [{"role": "user", "content": PROMPTS[1]}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "model": "tasks-llada-4.6m"})
    assert r.status_code == 200, r.text
    body = r.json()
    [a] = reference(sess, [PROMPTS[1]], chat=True)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": a.text}
    assert a.text == "Zoe Bob Eve"


def test_concurrent_requests_are_batched(sess, client, url) -> None:
    before = metric_samples(client.get("/metrics").text)

    def ask(p: str) -> dict:
        with httpx.Client(base_url=url, timeout=120) as c:
            r = c.post("/v1/completions", json={"prompt": p})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(ask, PROMPTS))
    ref = [reference(sess, [p])[0] for p in PROMPTS[:1]] + sess.generate(
        PROMPTS[1:], *generate_settings()[:2], width=32)  # rows never affect each other
    assert [c["text"] for c in got] == [a.text for a in ref]
    assert max(c["dllm"]["batch_rows"] for c in got) > 1
    after = metric_samples(client.get("/metrics").text)
    batches = after["dllm_batches_total"] - before["dllm_batches_total"]
    rows = after["dllm_batch_rows_total"] - before["dllm_batch_rows_total"]
    assert rows == len(PROMPTS) and batches < len(PROMPTS)
    single = after['dllm_batch_occupancy_bucket{le=1}'] - before['dllm_batch_occupancy_bucket{le=1}']
    assert single < batches  # some batch held more than one request


def test_batch_wait_collects_a_batch(sess) -> None:
    """With --batch-wait-ms, requests arriving together start in one batch."""
    from fastapi.testclient import TestClient

    app = create_app(sess, max_batch=4, batch_wait=1.0)
    with TestClient(app) as c:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: c.post("/v1/completions", json={"prompt": p}).json(),
                                PROMPTS[:3]))
    assert [g["choices"][0]["dllm"]["batch_rows"] for g in got] == [3, 3, 3]
    assert got[0]["choices"][0]["text"] == "1 4 7 9"


# ----------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("chat", [False, True])
def test_stream_carries_the_denoising(client, chat) -> None:
    route = "/v1/chat/completions" if chat else "/v1/completions"
    base = ({"messages": [{"role": "user", "content": PROMPTS[4]}]} if chat
            else {"prompt": PROMPTS[4]})
    base["block_length"] = 8
    plain = client.post(route, json=base).json()["choices"][0]
    want = plain["message"]["content"] if chat else plain["text"]
    r = client.post(route, json={**base, "stream": True,
                                 "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(
        plain["dllm"]["tokens"])
    chunks = chunks[:-1]
    kind = "chat.completion.chunk" if chat else "text_completion"
    assert all(c["object"] == kind and len(c["choices"]) == 1 for c in chunks)
    texts = [(c["choices"][0]["delta"].get("content", "") if chat else c["choices"][0]["text"])
             for c in chunks]
    assert "".join(texts) == want
    if chat:
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    steps = [c["dllm"] for c in chunks if "step" in c.get("dllm", {})]
    assert len(steps) > 1 and [s["step"] for s in steps] == sorted(s["step"] for s in steps)
    positions = sorted(t["position"] for s in steps for t in s["committed"])
    assert positions == list(range(32))  # every position committed exactly once
    assert steps[-1]["masked"] == 0 and steps[0]["masked"] > 0
    assert all(0.0 <= t["confidence"] <= 1.0 for s in steps for t in s["committed"])
    assert [s["block"] for s in steps] == sorted(s["block"] for s in steps)
    assert {s["block"] for s in steps} == {0, 1, 2, 3}
    assert all(t["position"] // 8 == s["block"] for s in steps for t in s["committed"])
    assert sum(1 for t in texts if t) > 1 or len(want) <= 1  # the text arrived in pieces
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]
    assert chunks[-1]["dllm"]["final"] and chunks[-1]["dllm"]["nfe"] == plain["dllm"]["nfe"]


# ----------------------------------------------------------------------------- fields
def test_n_seed_and_stop(sess, client) -> None:
    req = {"prompt": PROMPTS[0], "temperature": 1.0, "seed": 7, "n": 3}
    a = client.post("/v1/completions", json=req).json()
    b = client.post("/v1/completions", json=req).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    refs = reference(sess, [PROMPTS[0]] * 3, "--temperature", "1.0", key_seed=7)
    assert [c["text"] for c in a["choices"]] == [r.text for r in refs]
    assert [c["dllm"]["nfe"] for c in a["choices"]] == [r.nfe for r in refs]
    one = client.post("/v1/completions", json={**req, "n": 1}).json()["choices"][0]
    assert one["text"] == refs[0].text
    # greedy n > 1: n equal answers
    g = client.post("/v1/completions", json={"prompt": PROMPTS[0], "n": 2}).json()["choices"]
    assert [c["text"] for c in g] == ["1 4 7 9"] * 2
    # stop strings cut the text (the stop string itself is not returned)
    s = client.post("/v1/completions", json={"prompt": PROMPTS[0], "stop": [" 7", "x"]}).json()
    assert s["choices"][0]["text"] == "1 4" and s["choices"][0]["finish_reason"] == "stop"


def test_draft_model_drafts_for_simsd_requests(sess) -> None:
    """`serve --draft-model`: requests with controller simsd draft with the draft model (a
    random one here, so its drafts are rarely accepted: more forwards than self-drafting,
    the same tokens, since greedy SimSD is lossless)."""
    import dataclasses

    import jax

    from dllm_jax import models

    draft = dataclasses.replace(sess, params=models.decode_layout(
        models.init_params(sess.cfg, jax.random.key(11))))
    with serving(sess, max_batch=4, draft=draft) as (base, _app):
        with httpx.Client(base_url=base, timeout=120) as c:
            r = c.post("/v1/completions", json={"prompt": PROMPTS[0], "controller": "simsd"})
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]
    gen, ctrl, seed = generate_settings("--controller", "simsd")
    key = jax.random.key(seed)
    [want] = sess.generate([PROMPTS[0]], gen, ctrl, key=key, draft=draft)
    [own] = sess.generate([PROMPTS[0]], gen, ctrl, key=key)
    assert (got["dllm"]["tokens"], got["dllm"]["nfe"]) == (want.tokens, want.nfe)
    assert want.tokens == own.tokens and want.nfe != own.nfe


def test_models_health_metrics(client) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [
        "tasks-llada-4.6m"]
    assert client.get("/v1/models/tasks-llada-4.6m").status_code == 200
    assert client.get("/health").json()["status"] == "ok"
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = metric_samples(r.text)
    assert m['dllm_requests_total{route=/v1/completions,status=200}'] >= 1
    for name in ("dllm_queue_depth", "dllm_batch_occupancy_count", "dllm_tokens_per_second",
                 "dllm_answer_nfe_sum", "dllm_answer_nfe_count", "dllm_generated_tokens_total"):
        assert name in m
    assert m["dllm_tokens_per_second"] > 0 and m["dllm_answer_nfe_sum"] > 0


@pytest.mark.parametrize("route,body,status,param", [
    ("/v1/completions", {"prompt": "sort: 1 2", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "sort: 1 2", "max_tokens": 64}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "sort: 1 2", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "sort: 1 2", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "sort: 1 2", "n": "2"}, 400, "n"),
    ("/v1/completions", {"prompt": "sort: 1 2", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "sort: 1 2", "block_length": 5}, 400, "block_length"),
    ("/v1/completions", {"prompt": "sort: 1 2", "block_length": 8, "steps": 6}, 400, "steps"),
    ("/v1/completions", {"prompt": "sort: 1 2", "steps": 64}, 400, "steps"),
    ("/v1/completions", {"prompt": "sort: 1 2", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "sort: 1 2", "cache": "all"}, 400, "cache"),
    ("/v1/completions", {"prompt": "sort: 1 2", "controller": "nope"}, 400, "controller"),
    ("/v1/completions", {"prompt": "sort: 1 2", "threshold": 0.5}, 400, "threshold"),
    ("/v1/completions", {"prompt": "sort: 1 2", "controller": "threshold", "threshold": 2.0},
     400, "threshold"),
    ("/v1/completions", {"prompt": "sort: 1 2", "top_p": 0.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "sort: 1 2", "stop": ""}, 400, "stop"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "sort: " + "1 " * 40}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/completions", {"prompt": "sort: 1 2", "model": "gpt-4"}, 404, "model"),
])
def test_errors_are_openai_shaped(client, route, body, status, param) -> None:
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert err["message"] and err["type"] == "invalid_request_error"


def test_bad_json_and_routes_then_still_serving(client) -> None:
    r = client.post("/v1/completions", content=b'{"prompt": ', headers={
        "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert client.post("/v1/completions", content=b"[1, 2]").status_code == 400
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/models/gpt-4").json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/completions", json={"prompt": PROMPTS[0]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "1 4 7 9"


def test_full_queue_429_and_timeout_504(sess) -> None:
    """With the scheduler held, one queued request fills a 1-row queue: the next gets 429,
    and the queued one times out with 504."""
    from fastapi.testclient import TestClient

    app = create_app(sess, max_batch=1, max_queue=1, request_timeout=1.0)
    app.state.server.engine.start = lambda: None  # nothing decodes
    with TestClient(app) as c:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/v1/completions", json={"prompt": PROMPTS[0]})
            deadline = time.time() + 10
            while c.get("/health").json()["queue_depth"] == 0:
                assert time.time() < deadline
                time.sleep(0.01)
            r = c.post("/v1/completions", json={"prompt": PROMPTS[1]})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            r = first.result(30)
            assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        assert 'route="/v1/completions",status="429"' in c.get("/metrics").text


# ----------------------------------------------------------------------------- command
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_and_sigterm() -> None:
    """`dllm-jax serve` starts and answers; on SIGTERM it stops accepting, lets the running
    requests (a plain one and a stream) finish, and exits 0."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dllm_jax.cli", "serve", "--port", str(port), "--log-level",
         "warning", "--served-model-name", "tiny"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.time() < deadline, "the server did not come up"
            try:
                r = httpx.get(f"{base}/health", timeout=1)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert r.json()["model"] == "tiny"

        def busy() -> bool:
            h = httpx.get(f"{base}/health").json()
            return h["queue_depth"] + h["running_rows"] > 0

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            plain = pool.submit(httpx.post, f"{base}/v1/completions", timeout=60,
                                json={"prompt": PROMPTS[0], "model": "tiny"})
            deadline = time.time() + 30
            while not busy():
                assert time.time() < deadline and not plain.done()
                time.sleep(0.01)
            chat = {"messages": [{"role": "user", "content": PROMPTS[0]}], "stream": True}
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=chat,
                              timeout=60) as streamed:
                lines = streamed.iter_lines()
                first = next(line for line in lines if line.startswith("data:"))
                assert busy()  # both requests are in flight
                proc.send_signal(signal.SIGTERM)
                rest = "\n".join(lines)
            plain = plain.result(60)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == "1 4 7 9"
        payloads = sse_payloads(first + "\n\n" + rest + "\n\n")
        assert payloads[-1] == "[DONE]"
        text = "".join(json.loads(p)["choices"][0]["delta"].get("content", "")
                       for p in payloads[:-1])
        assert text == "1 4 7 9"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_defaults_from_flags() -> None:
    """`dllm-jax serve`'s generation flags become the defaults of fields a request omits."""
    from dllm_jax.serve.cli import add_arguments, serve_defaults
    from dllm_jax.serve.protocol import decode_settings as request_settings
    from dllm_jax.serve.protocol import parse_request

    p = argparse.ArgumentParser()
    add_arguments(p)
    d = serve_defaults(p.parse_args(["--controller", "threshold", "--threshold", "0.8",
                                     "--gen-length", "16", "--block-length", "8"]),
                       str(session.resolve_model_dir(None)))

    def settings(**body):
        return request_settings(parse_request("completion", {"prompt": "x", **body}), d, 63)

    s = settings()
    assert (s.gen.gen_length, s.gen.block_length, s.gen.steps) == (16, 8, 16)
    assert s.controller_key == ("threshold", (("threshold", 0.8),)) and not s.uses_key
    assert settings(threshold=0.5).controller_key == ("threshold", (("threshold", 0.5),))
    assert settings(controller="low_confidence").controller_key == ("low_confidence", ())
    assert settings(controller="threshold").controller_key == ("threshold", (("threshold", 0.9),))
    assert settings(seed=3).uses_key and settings(controller="random").uses_key
    assert settings(temperature=0.5).uses_key
