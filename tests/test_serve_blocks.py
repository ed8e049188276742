"""Continuous batching: the block-by-block decoder (`serve/blocks.py`) and the scheduler that
admits queued requests between two blocks of a running batch. In float32 an answer (tokens,
NFE, and the step that committed each token) equals `generate`'s for that prompt alone,
whether the row started the batch or joined it mid-flight; streams leave block by block."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import httpx

from controllers import make_controller
from dllm_jax import session
from dllm_jax.config import GenerateConfig
from dllm_jax.serve import blocks as BL
from dllm_jax.serve.app import create_app, with_chat_template
from tests.serve_helpers import PROMPTS, metric_samples, reference, serving, sse_payloads


STREAMED = "sort: 8 1 6"


@pytest.fixture(scope="module")
def sess():
    return with_chat_template(session.load())


def _alone(sess, prompt, gen, controller, width):
    ids, valid = sess.pad([sess.encode(prompt)], width=width)
    out = sess.generate_ids(ids, valid, gen, controller)
    return (np.asarray(out.tokens[0]), int(out.stats.nfe[0]),
            np.asarray(out.stats.fix_step[0]))


@pytest.mark.parametrize("name,options,gen", [   # (the server tests cover low_confidence)
    ("threshold", {"threshold": 0.8},
     GenerateConfig(gen_length=32, block_length=2, steps=32, cache="dual", stop_at_eos=True)),
    ("r2", {}, GenerateConfig(gen_length=32, block_length=8, steps=32, cache="prefix",
                              cfg_scale=0.5)),
])
def test_rows_joining_between_blocks_equal_generate_alone(sess, name, options, gen) -> None:
    """4 slots, 6 prompts; one prompt joins at every block boundary (two at the start), so
    rows sit at different blocks; every row equals its decode alone (at the slots' prompt
    width, so that the references share one compile; the server tests compare with
    `generate` at the prompt's own width)."""
    ctl = make_controller(name, **options)
    cfg, width, b = sess.cfg, 16, 4
    assert BL.supports(ctl, gen.block_length)
    slots = BL.empty_slots(cfg, gen, ctl, batch=b, width=width, dtype=sess.params["embed"].dtype)
    queue, owner, got, blocks_seen = list(range(6)), [None] * b, {}, set()
    for boundary in range(40):
        take = np.zeros(b, bool)
        ids = np.zeros((b, width), np.int32)
        valid = np.ones((b, width), bool)
        for i in [i for i in range(b) if owner[i] is None][:2 if boundary == 0 else 1]:
            if queue:
                j = queue.pop(0)
                row_ids, row_valid = sess.pad([sess.encode(PROMPTS[j])], width=width)
                ids[i], valid[i], take[i], owner[i] = row_ids[0], row_valid[0], True, j
        if take.any():
            slots = BL.admit(slots, jnp.asarray(take), jnp.asarray(ids), jnp.asarray(valid),
                             ctl, cfg=cfg, gen=gen)
        blocks_seen.add(len({int(slots.block[i]) for i in range(b) if owner[i] is not None}))
        slots = BL.run_block(sess.params, slots, ctl, cfg=cfg, gen=gen)
        tok, fix, nfe, steps = jax.device_get((slots.tokens[:, width:], slots.fix_step,
                                               slots.nfe, slots.steps))
        for i in np.flatnonzero(BL.finished(tok, steps, gen, cfg.mask_token_id)):
            if owner[i] is not None:
                got[owner[i]] = (tok[i], int(nfe[i]), fix[i])
                owner[i] = None
        if not queue and all(o is None for o in owner):
            break
    assert sorted(got) == list(range(6))
    assert max(blocks_seen) > 1, "rows never sat at different blocks"
    for j in range(6):
        tokens, nfe, fix = _alone(sess, PROMPTS[j], gen, ctl, width)
        np.testing.assert_array_equal(got[j][0], tokens, err_msg=PROMPTS[j])
        assert got[j][1] == nfe
        np.testing.assert_array_equal(got[j][2], fix)


def test_speculative_controllers_are_decoded_whole(sess) -> None:
    """SimSD is decoded by one `generate` call; its stream comes at the end, complete."""
    assert not BL.supports(make_controller("simsd"), 8)
    assert BL.supports(make_controller("ce"), 8) and BL.supports(make_controller("tspd"), 8)
    from fastapi.testclient import TestClient

    with TestClient(create_app(sess, max_batch=2)) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPTS[0], "controller": "simsd",
                                            "block_length": 8, "stream": True})
    chunks = [json.loads(p) for p in sse_payloads(r.text) if p != "[DONE]"]
    [ref] = reference(sess, [PROMPTS[0]], "--controller", "simsd", "--block-length", "8")
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == ref.text
    assert chunks[-1]["dllm"]["nfe"] == ref.nfe
    committed = [t for ch in chunks for t in ch["dllm"].get("committed", [])]
    assert sorted(t["position"] for t in committed) == list(range(32))
    assert all(0 <= t["confidence"] <= 1 for t in committed)


def test_requests_join_a_running_batch_and_streams_leave_per_block(sess) -> None:
    """A long request starts; while its decode is held after its first block, three
    compatible requests (one streamed) and one with other settings are queued. The three
    join the running batch at that boundary, the other waits for the batch to drain; the
    stream's first chunk arrives while the decode is held after the stream's first block;
    all answers equal `generate` alone."""
    held, release, got_first_chunk = threading.Event(), threading.Event(), threading.Event()
    calls, seen_while_held = [], []

    def on_block() -> None:   # the scheduler thread, between two blocks
        calls.append(1)
        if len(calls) == 1:
            held.set()
            release.wait(60)
        elif len(calls) == 2:
            seen_while_held.append(got_first_chunk.wait(30))

    long = {"prompt": PROMPTS[3], "block_length": 4}            # 8 blocks
    assert len({len(sess.encode(p)) for p in (*PROMPTS[1:4], STREAMED)}) == 1  # one compile
    other = {"prompt": PROMPTS[4], "block_length": 8, "controller": "threshold"}
    with serving(sess, max_batch=4, on_block=on_block) as (base, _app), \
            httpx.Client(base_url=base, timeout=120) as c, \
            concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = pool.submit(c.post, "/v1/completions", json=long)
        assert held.wait(60)
        joiners = [pool.submit(c.post, "/v1/completions", json={**long, "prompt": p})
                   for p in PROMPTS[1:3]]
        def stream() -> str:
            with httpx.stream("POST", f"{base}/v1/completions", timeout=120,
                              json={**long, "prompt": STREAMED, "stream": True}) as r:
                body = ""
                for line in r.iter_lines():
                    body += line + "\n"
                    if line.startswith("data:") and '"committed"' in line:
                        got_first_chunk.set()
                return body

        streamed = pool.submit(stream)
        deadline = time.time() + 30
        while c.get("/health").json()["queue_depth"] < 3:
            assert time.time() < deadline
            time.sleep(0.01)
        late = pool.submit(c.post, "/v1/completions", json=other)
        while c.get("/health").json()["queue_depth"] < 4:
            assert time.time() < deadline
            time.sleep(0.01)
        release.set()
        answers = [f.result(120).json()["choices"][0] for f in [first, *joiners]]
        late_answer = late.result(120).json()["choices"][0]
        payloads = sse_payloads(streamed.result(120) + "\n")
        metrics = metric_samples(c.get("/metrics").text)
    flags = ("--block-length", "4")
    refs = [reference(sess, [p], *flags)[0] for p in (PROMPTS[3], PROMPTS[1], PROMPTS[2])]
    for a, ref in zip(answers, refs):
        assert (a["text"], a["dllm"]["tokens"], a["dllm"]["nfe"]) == (ref.text, ref.tokens,
                                                                      ref.nfe)
    assert answers[0]["dllm"]["joined_after_blocks"] == 0
    assert [a["dllm"]["joined_after_blocks"] for a in answers[1:]] == [1, 1]
    assert max(a["dllm"]["batch_rows"] for a in answers) == 4
    [ref] = reference(sess, [PROMPTS[4]], "--block-length", "8", "--controller", "threshold")
    assert (late_answer["text"], late_answer["dllm"]["nfe"]) == (ref.text, ref.nfe)
    assert late_answer["dllm"]["joined_after_blocks"] == 0       # it opened the next batch
    chunks = [json.loads(p) for p in payloads if p != "[DONE]"]
    [sref] = reference(sess, [STREAMED], *flags)
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == sref.text
    assert chunks[-1]["dllm"]["joined_after_blocks"] == 1
    assert metrics["dllm_joined_rows_total"] == 3
    assert seen_while_held == [True], "the first chunk came only after the decode went on"


def test_cancelled_rows_free_their_slots(sess) -> None:
    """A request that times out is answered 504 and its row leaves the batch at the next
    block boundary (it is never finished); the server goes on answering."""
    with serving(sess, max_batch=2) as (base, app), \
            httpx.Client(base_url=base, timeout=120) as c:
        server = app.state.server
        body = {"prompt": PROMPTS[0], "block_length": 1}       # 32 blocks
        r = c.post("/v1/completions", json=body)                 # compiled
        assert r.status_code == 200
        want = r.json()["choices"][0]["text"]
        answered = metric_samples(c.get("/metrics").text)["dllm_answers_total"]
        server.request_timeout = 0.05
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        deadline = time.time() + 30
        while c.get("/health").json()["running_rows"]:
            assert time.time() < deadline, "the timed-out row kept its slot"
            time.sleep(0.01)
        assert metric_samples(c.get("/metrics").text)["dllm_answers_total"] == answered
        server.request_timeout = 60.0
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
