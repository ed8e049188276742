"""The server through the official `openai` client package (a real HTTP client, the one
users run) on a loopback port: completions, chat, streaming (chunks parse; their text is the
non-streamed answer; the `dllm` extension carries the commits), 32 concurrent requests all
answered as `generate` answers them, bad requests answered 400 while the server keeps
serving, and a full queue answered 429."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import openai
import pytest

from dllm_jax import session
from dllm_jax.serve.app import create_app, with_chat_template
from tests.serve_helpers import PROMPTS, reference, serving

MODEL = "tasks-llada-4.6m"
BLOCKS = {"block_length": 8}          # 4 blocks per answer: rows join between them
THRESHOLD = {"controller": "threshold", "threshold": 0.8, **BLOCKS}
THRESHOLD_FLAGS = ("--controller", "threshold", "--threshold", "0.8", "--block-length", "8")


@pytest.fixture(scope="module")
def sess():
    return with_chat_template(session.load())


@pytest.fixture(scope="module")
def base(sess):
    with serving(sess, max_batch=8) as (url, _app):
        yield url


@pytest.fixture(scope="module")
def client(base):
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    yield c
    c.close()


def test_completion_and_chat(sess, client) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], extra_body=BLOCKS)
    [ref] = reference(sess, [PROMPTS[0]], "--block-length", "8")
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(ref.tokens)
    assert r.choices[0].model_extra["dllm"]["nfe"] == ref.nfe
    chat = PROMPTS[7]                    # as long as PROMPTS[0]: one reference compile
    c = client.chat.completions.create(model="default", max_tokens=32, extra_body=BLOCKS,
                                       messages=[{"role": "user", "content": chat}])
    [ref] = reference(sess, [chat], "--block-length", "8", chat=True)
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == ref.text and ref.text
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_dllm_fields_through_extra_body(sess, client) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPTS[2], extra_body=THRESHOLD)
    [ref] = reference(sess, [PROMPTS[2]], *THRESHOLD_FLAGS)
    assert r.choices[0].text == ref.text
    assert r.choices[0].model_extra["dllm"]["nfe"] == ref.nfe < 32     # fewer steps


@pytest.mark.parametrize("chat", [False, True])
def test_streaming(client, chat) -> None:
    if chat:
        kw = dict(model=MODEL, messages=[{"role": "user", "content": PROMPTS[3]}],
                  extra_body=BLOCKS)
        whole = client.chat.completions.create(**kw).choices[0].message.content
        chunks = list(client.chat.completions.create(**kw, stream=True))
        texts = [ch.choices[0].delta.content or "" for ch in chunks]
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        kw = dict(model=MODEL, prompt=PROMPTS[3], extra_body=BLOCKS)
        whole = client.completions.create(**kw).choices[0].text
        chunks = list(client.completions.create(**kw, stream=True))
        texts = [ch.choices[0].text for ch in chunks]
    assert "".join(texts) == whole and whole
    steps = [ch.model_extra["dllm"] for ch in chunks
             if "committed" in (ch.model_extra or {}).get("dllm", {})]
    assert sorted(t["position"] for s in steps for t in s["committed"]) == list(range(32))
    assert {s["block"] for s in steps} == {0, 1, 2, 3}
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_32_concurrent_requests(sess, base) -> None:
    """32 requests at once (async client) with 8 slots: all answered, each as `generate`
    answers its prompt (a batch reference at the server's prompt width: rows never affect
    each other), and rows joined running batches between blocks."""
    words = ["Eve", "Bob", "Zoe", "Alice", "Carol", "Quinn", "Uma"]
    prompts = [f"sort: {' '.join(str((i * 7 + k * 3) % 10) for k in range(2 + i % 4))}"
               if i % 2 else f"reverse: {' '.join(words[(i + k) % 7] for k in range(2 + i % 3))}"
               for i in range(32)]
    assert len(set(prompts)) > 20

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                                      timeout=120) as c:
            rs = await asyncio.wait_for(asyncio.gather(*[
                c.completions.create(model=MODEL, prompt=p, extra_body=THRESHOLD)
                for p in prompts]), 120)
        return [r.choices[0].text for r in rs]

    before = httpx.get(f"{base}/metrics").text
    t0 = time.perf_counter()
    got = asyncio.run(ask_all())
    assert time.perf_counter() - t0 < 120
    refs = reference(sess, prompts, *THRESHOLD_FLAGS, width=16)
    assert got == [a.text for a in refs]
    joined = [float(line.split()[1]) for text in (before, httpx.get(f"{base}/metrics").text)
              for line in text.splitlines() if line.startswith("dllm_joined_rows_total ")]
    assert joined[1] > joined[0], "no request joined a running batch"


@pytest.mark.parametrize("kwargs,param", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=1000), "n"),
    (dict(extra_body={"n": "2"}), "n"),
    (dict(extra_body={"temperature": "hot"}), "temperature"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
    (dict(extra_body={"controller": "threshold", "threshold": 7}), "threshold"),
    (dict(extra_body={"block_length": 5}), "block_length"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(client, kwargs, param) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPTS[0], **kwargs)
    assert e.value.status_code == 400 and e.value.param == param and e.value.message
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], extra_body=BLOCKS)
    assert r.choices[0].text == "1 4 7 9"


def test_bad_json_and_unknown_model(base, client) -> None:
    r = httpx.post(f"{base}/v1/completions", content=b'{"prompt": "sort: 1 2",',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPTS[0])
    assert e.value.param == "model"
    assert client.completions.create(model=MODEL, prompt=PROMPTS[0],
                                     extra_body=BLOCKS).choices[0].text == "1 4 7 9"


def test_full_queue_gets_429(sess) -> None:
    """With the scheduler not running, one queued request fills a 1-row queue; the next
    gets 429 (`openai.RateLimitError`), and the first a 504 at its timeout."""
    app = create_app(sess, max_batch=1, max_queue=1, request_timeout=2.0)
    app.state.server.engine.start = lambda: None          # nothing decodes
    with serving(sess, app) as (url, _app):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.completions.create, model=MODEL, prompt=PROMPTS[0])
            deadline = time.time() + 10
            while httpx.get(f"{url}/health").json()["queue_depth"] == 0:
                assert time.time() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model=MODEL, prompt=PROMPTS[1])
            assert e.value.status_code == 429 and e.value.code == "queue_full"
            with pytest.raises(openai.APIStatusError) as e:
                first.result(30)
            assert e.value.status_code == 504
        c.close()
