"""Per-step cost of the decode loop itself (features + trajectory + controller + writes)
relative to the model forward, on a tiny model.

    python benchmarks/decode_overhead.py [--batch 8] [--prompt 64] [--gen 128] [--block 32]

For each controller: median wall time of one whole `generate` call divided by its steps,
against the median time of the forward alone (same shapes, block logits only), measured
side by side in one run. Overhead = step / forward - 1.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from controllers import make_controller
from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.decode import generate
from dllm_jax.models import apply, init_params


def _median_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    cfg = ModelConfig.tiny("llada", vocab_size=512, hidden_size=128, num_layers=4,
                           num_heads=4, num_kv_heads=4, head_dim=32, intermediate_size=384,
                           mask_token_id=511)
    params = init_params(cfg, jax.random.key(0), std=0.3)
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, 500, size=(args.batch, args.prompt)).astype(np.int32)
    t = args.prompt + args.gen
    tokens = jnp.asarray(np.concatenate(
        [prompt, np.full((args.batch, args.gen), cfg.mask_token_id, np.int32)], 1))
    qidx = jnp.broadcast_to(args.prompt + jnp.arange(args.block), (args.batch, args.block))
    fwd = jax.jit(functools.partial(apply, cfg=cfg, attn_impl="xla"))
    fwd_once = lambda: fwd(params, tokens=tokens, query_idx=qidx).block_until_ready()  # noqa: E731

    print(f"device={jax.devices()[0].platform} batch={args.batch} prompt={args.prompt} "
          f"gen={args.gen} block={args.block} seq={t} "
          f"params={sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1e6:.2f}M")
    print("Each round times the forward alone and one whole generate back to back; the "
          "overhead is the median over rounds of (generate / steps) / forward - 1.")
    print("| controller | steps | ms/step | forward ms | loop overhead |")
    print("|---|---|---|---|---|")
    for name, kw in [("low_confidence", {}), ("threshold", {"threshold": 0.9}),
                     ("factor", {"factor": 1.0}), ("entropy", {})]:
        gen = GenerateConfig(gen_length=args.gen, block_length=args.block, steps=args.gen,
                             attn_impl="xla")
        ctrl = make_controller(name, **kw)
        run = lambda: generate(params, cfg, prompt, gen, ctrl).tokens.block_until_ready()  # noqa: E731
        steps = int(generate(params, cfg, prompt, gen, ctrl).stats.steps)
        fwd_once()
        ratios, steps_ms, fwd_ms = [], [], []
        for _ in range(args.repeats):
            f = _median_time(fwd_once, 3)
            t0 = time.perf_counter()
            run()
            per_step = (time.perf_counter() - t0) / steps
            ratios.append(per_step / f)
            steps_ms.append(per_step * 1e3)
            fwd_ms.append(f * 1e3)
        print(f"| {name} | {steps} | {statistics.median(steps_ms):.2f} | "
              f"{statistics.median(fwd_ms):.2f} | {(statistics.median(ratios) - 1) * 100:+.1f}% |")


if __name__ == "__main__":
    main()
