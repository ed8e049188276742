"""Load test of `dllm-jax serve`: offline batch throughput against the server's under N
concurrent clients, latency, time to the first streamed event, and what the block-by-block
split of continuous batching costs against the single compiled `generate` loop.

    python benchmarks/serve_load.py                      # CPU: the bundled model, small numbers
    python benchmarks/serve_load.py --random-8b --max-batch 64 --clients 64 --requests 512 \\
        --prompt-len 256 --gen-length 256 --block-length 32 --controller threshold  # the H200
    python benchmarks/serve_load.py --model ~/models/llada-8b --max-batch 32 --clients 64

Rows of the table (throughput counts answer positions decoded, gen_length per request):
  offline generate     `decode.generate` on full batches of `--max-batch` rows (one compiled
                       while_loop per batch), what `dllm-jax batch` runs.
  offline blocks       the same batches through `serve/blocks.py` (one compiled call per
                       block, a host sync between blocks): the cost of the split.
  server               N clients (asyncio + httpx), each sending its next request when the
                       last is answered, against a real uvicorn server on 127.0.0.1 in this
                       process; p50 / p99 latency per request.
  server streaming     the same with `stream: true`; time to the first chunk that carries
                       decoded tokens (TTFE), p50 / p99.
`--json PATH` also writes the rows as JSON. Every setting is printed with the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    src.add_argument("--random-8b", action="store_true",
                     help="an LLaDA-8B-shaped model with random bf16 weights (for the GPU)")
    ap.add_argument("--max-batch", type=int, default=4, help="slots / offline batch (4)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    ap.add_argument("--requests", type=int, default=24, help="requests per server run (24)")
    ap.add_argument("--batches", type=int, default=3, help="offline batches timed (3)")
    ap.add_argument("--prompt-len", type=int, default=0,
                    help="prompt tokens (random ids; 0: task prompts of the bundled model)")
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--steps", type=int, default=0, help="steps (0: gen_length)")
    ap.add_argument("--controller", default="low_confidence")
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--cache", default="none", choices=["none", "prefix", "dual"])
    ap.add_argument("--bucket", type=int, default=16)
    ap.add_argument("--dtype", default=None, help="params dtype of --model (default: stored)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    return ap.parse_args(argv)


def load_session(args: argparse.Namespace) -> Any:
    import jax
    import jax.numpy as jnp

    from dllm_jax import models as M
    from dllm_jax import session
    from dllm_jax.config import ModelConfig

    if not args.random_8b:
        from dllm_jax.serve.app import with_chat_template

        return with_chat_template(session.load(args.model, dtype=args.dtype))
    cfg = ModelConfig.llada_8b()
    params = M.decode_layout(M.init_params(cfg, jax.random.key(0), jnp.bfloat16))
    return session.Session(model_dir=Path("random-llada-8b"), cfg=cfg, params=params,
                           tokenizer=None, train_config=None)


def make_prompts(sess: Any, args: argparse.Namespace, n: int) -> list[Any]:
    """Token-id prompts of --prompt-len random ids, or task prompts as text."""
    rng = np.random.default_rng(0)
    if args.prompt_len > 0 or sess.tokenizer is None:
        length = args.prompt_len or 64
        hi = min(sess.cfg.vocab_size, sess.cfg.mask_token_id)
        return [[int(t) for t in rng.integers(2, hi, length)] for _ in range(n)]
    words = ["Eve", "Bob", "Zoe", "Alice", "Carol", "Quinn", "Uma"]
    out = []
    for i in range(n):
        k = 2 + i % 4
        out.append("sort: " + " ".join(str(d) for d in rng.integers(0, 10, k)) if i % 2 else
                   "reverse: " + " ".join(rng.choice(words, k)))
    return out


def decode_settings(sess: Any, args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    from controllers import make_controller
    from dllm_jax.config import GenerateConfig

    gen = GenerateConfig(gen_length=args.gen_length, block_length=args.block_length,
                         steps=args.steps or args.gen_length, cache=args.cache)
    opts = {} if args.threshold is None else {"threshold": args.threshold}
    body = {"max_tokens": gen.gen_length, "block_length": gen.block_length,
            "steps": gen.steps, "cache": gen.cache, "controller": args.controller, **opts}
    return gen, make_controller(args.controller, **opts), body


# ----------------------------------------------------------------------------- offline
def offline(sess: Any, args: argparse.Namespace, prompts: list[Any]) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    from dllm_jax.serve import blocks as BL
    from dllm_jax.serve.lanes import width_ladder

    gen, ctl, _ = decode_settings(sess, args)
    b = args.max_batch
    seqs = [sess.encode(p) for p in prompts]
    width = width_ladder(max(map(len, seqs)), args.bucket, sess.cfg.max_position - gen.gen_length)
    batches = [sess.pad(seqs[i * b:(i + 1) * b], width=width, rows=b)
               for i in range(args.batches)]

    def whole(ids: np.ndarray, valid: np.ndarray) -> None:
        jax.block_until_ready(sess.generate_ids(ids, valid, gen, ctl).tokens)

    def blocks(ids: np.ndarray, valid: np.ndarray) -> None:
        slots = BL.empty_slots(sess.cfg, gen, ctl, batch=b, width=width,
                               dtype=sess.params["embed"].dtype)
        slots = BL.admit(slots, jnp.ones((b,), bool), jnp.asarray(ids), jnp.asarray(valid), ctl,
                         cfg=sess.cfg, gen=gen)
        while True:
            slots = BL.run_block(sess.params, slots, ctl, cfg=sess.cfg, gen=gen)
            tok, steps = jax.device_get((slots.tokens[:, width:], slots.steps))
            if BL.finished(tok, steps, gen, sess.cfg.mask_token_id).all():
                return

    rows = []
    for name, fn in (("offline generate", whole), ("offline blocks", blocks)):
        t0 = time.perf_counter()
        fn(*batches[0])                                         # compile
        compile_s = time.perf_counter() - t0
        times = []
        for ids, valid in batches:
            t0 = time.perf_counter()
            fn(ids, valid)
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        rows.append({"mode": name, "clients": "-", "requests": b * len(batches),
                     "tokens_per_s": b * gen.gen_length / sec, "batch_s": sec,
                     "compile_s": compile_s})
    return rows


# ----------------------------------------------------------------------------- server
def start_server(sess: Any, args: argparse.Namespace) -> tuple[Any, threading.Thread, str]:
    import uvicorn

    from dllm_jax.serve.app import create_app

    app = create_app(sess, max_batch=args.max_batch, bucket=args.bucket,
                     max_queue=max(256, 4 * args.requests), request_timeout=3600)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="on", timeout_keep_alive=600))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("error: the server did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


async def _one(client: Any, body: dict[str, Any], stream: bool) -> tuple[float, float | None]:
    t0 = time.perf_counter()
    if not stream:
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t0, None
    first = None
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data:") and '"committed"' in line:
                first = time.perf_counter() - t0
            if line.strip() == "data: [DONE]":
                break
    return time.perf_counter() - t0, first


async def _load(base: str, bodies: list[dict[str, Any]], clients: int, stream: bool
                ) -> tuple[float, list[float], list[float]]:
    import httpx

    todo = list(bodies)
    lat: list[float] = []
    ttfe: list[float] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=3600, limits=limits) as client:
        async def worker() -> None:
            while todo:
                seconds, first = await _one(client, todo.pop(), stream)
                lat.append(seconds)
                if first is not None:
                    ttfe.append(first)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        return time.perf_counter() - t0, lat, ttfe


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def served(sess: Any, args: argparse.Namespace, prompts: list[Any]) -> list[dict[str, Any]]:
    import httpx

    gen, _, settings = decode_settings(sess, args)
    server, thread, base = start_server(sess, args)
    bodies = [{"prompt": p, **settings} for p in prompts]
    rows = []
    try:
        warm = [{"prompt": p, **settings} for p in prompts[:args.max_batch]]
        asyncio.run(_load(base, warm, args.max_batch, False))      # compile
        for stream in (False, True):
            before = httpx.get(base + "/metrics").text
            wall, lat, ttfe = asyncio.run(_load(base, bodies[:args.requests], args.clients,
                                                stream))
            occ = _occupancy(before, httpx.get(base + "/metrics").text)
            rows.append({"mode": "server streaming" if stream else "server",
                         "clients": args.clients, "requests": args.requests,
                         "tokens_per_s": args.requests * gen.gen_length / wall,
                         "p50_s": _pct(lat, 50), "p99_s": _pct(lat, 99),
                         "ttfe_p50_s": _pct(ttfe, 50) if stream else None,
                         "ttfe_p99_s": _pct(ttfe, 99) if stream else None,
                         "mean_rows_per_block": occ})
    finally:
        server.should_exit = True
        thread.join(60)
    return rows


def _occupancy(before: str, after: str) -> float:
    def get(text: str, name: str) -> float:
        return next(float(line.split()[1]) for line in text.splitlines()
                    if line.startswith(name + " "))
    calls = get(after, "dllm_batches_total") - get(before, "dllm_batches_total")
    rows = get(after, "dllm_batch_rows_total") - get(before, "dllm_batch_rows_total")
    return rows / calls if calls else float("nan")


# ----------------------------------------------------------------------------- report
def table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["tokens_per_s"]

    def ms(v: Any) -> str:
        return "-" if v is None or np.isnan(v) else f"{1000 * v:.0f}"

    out = [("| mode | clients | requests | tokens/s | vs offline generate | p50 ms | p99 ms "
            "| TTFE p50 ms | TTFE p99 ms | rows per block call |"),
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        occ = r.get("mean_rows_per_block")
        out.append(f"| {r['mode']} | {r['clients']} | {r['requests']} | "
                   f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | "
                   f"{ms(r.get('p50_s', r.get('batch_s')))} | {ms(r.get('p99_s'))} | "
                   f"{ms(r.get('ttfe_p50_s'))} | {ms(r.get('ttfe_p99_s'))} | "
                   f"{'-' if occ is None else f'{occ:.2f}'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    sess = load_session(args)
    prompts = make_prompts(sess, args, max(args.requests, args.max_batch * args.batches))
    rows = offline(sess, args, prompts) + served(sess, args, prompts)
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    print(f"serve_load: {jax.devices()[0].device_kind} ({jax.default_backend()}), model "
          f"{sess.model_dir.name}, {json.dumps(settings)}")
    print("(offline rows: p50 ms = one batch of --max-batch rows; the block split costs "
          f"{rows[0]['tokens_per_s'] / rows[1]['tokens_per_s'] - 1:+.1%} time per batch)")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
