"""Where a compiled program's device time goes: JAX's profiler around warm runs, its trace
summed by kernel and by kind (matmul, attention, fusion, copy, ...), and how busy the device
was (busy << wall means launch or host overhead, not kernels, is the cost).

    python benchmarks/profile_top.py train --model-size bench --batch 512 [--block-size 4]
        [--attn-impl cudnn] [--steps 10]        # one compiled chunk of training steps
    python benchmarks/profile_top.py decode --model llada-8b --batch 1 [--cache dual]
        [--quantize int8]                       # one whole generate (random bf16 weights)
    ... [--top 25] [--trace-out DIR]            # keep the perfetto trace (.json.gz) there

The trace comes from `jax.profiler.trace(create_perfetto_trace=True)`; device kernels are the
complete events of the `/device:...` processes (on a CPU backend, the XLA worker threads of
the host process: only a smoke test, CPU kernels are not GPU kernels). Written here rather
than through TensorBoard's profile plugin, which is not on the GPU machine and needs a UI.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

#: kernel-name fragments -> kind (first match wins; names are lower-cased).
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("cudnn", "fmha", "flash", "attention", "sdpa")),
    ("matmul", ("gemm", "cublas", "cutlass", "xmma", "nvjet", "matmul", "dot", "wgmma")),
    ("copy", ("memcpy", "memset", "copy", "transpose", "dynamic_update_slice", "dynamic-update")),
    ("reduce", ("reduce", "reduction", "scatter", "sort", "argmax", "top_k", "topk")),
    ("fusion", ("fusion", "loop_", "input_", "triton", "ynn")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, frags in KINDS:
        if any(f in low for f in frags):
            return kind
    return "other"


def leaf_events(events: list[dict]) -> list[dict]:
    """The events that contain no other event of their thread (drops wrappers such as a
    module's or a while loop's span around its kernels)."""
    by_thread: dict[tuple, list[dict]] = collections.defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e.get("tid"))].append(e)
    out = []
    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
        for i, e in enumerate(evs):
            end = float(e["ts"]) + float(e.get("dur", 0.0))
            if i + 1 < len(evs) and float(evs[i + 1]["ts"]) < end:
                continue                                   # it contains the next one
            out.append(e)
    return out


def device_events(trace: dict) -> tuple[list[dict], str]:
    """The leaf complete ('X') events that ran on a device (its stream lanes where the trace
    has them, else its op lanes), and where they were found."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    complete = [e for e in events if e.get("ph") == "X"]
    dev = {p for p, n in procs.items() if "/device:" in n}
    if dev:
        on_dev = [e for e in complete if e["pid"] in dev]
        for lane in ("Stream", "XLA Ops"):
            picked = [e for e in on_dev if lane in threads.get((e["pid"], e.get("tid")), "")]
            if picked:
                return leaf_events(picked), f"device lanes '{lane}'"
        return leaf_events(on_dev), "device"
    xla = {k for k, n in threads.items() if "XLAEigen" in n or "XLACpu" in n}
    return leaf_events([e for e in complete if (e["pid"], e.get("tid")) in xla
                        and not e["name"].startswith("end:")]), "host XLA threads (CPU backend)"


def summarize(events: list[dict], runs: int, wall_s: float, top: int) -> str:
    """Markdown: per-kind and per-kernel device time (ms per run), busy fraction."""
    if not events:
        return "no device events in the trace"
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        n = e["name"]
        by_name[n][0] += 1
        by_name[n][1] += float(e.get("dur", 0.0))            # microseconds
    total_us = sum(v[1] for v in by_name.values())
    # busy = the union of the kernels' intervals (streams may overlap)
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events)
    busy, cur_s, cur_e = 0.0, spans[0][0], spans[0][1]
    for s, t in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, t
        else:
            cur_e = max(cur_e, t)
    busy += cur_e - cur_s
    per_run = 1e-3 / runs                                    # us -> ms per run
    kinds: dict[str, float] = collections.Counter()
    for n, (_, us) in by_name.items():
        kinds[kind_of(n)] += us
    lines = [f"wall {1e3 * wall_s / runs:.2f} ms per run; device busy {busy * per_run:.2f} ms "
             f"({100 * busy * 1e-6 / wall_s:.0f} % of wall); kernel time {total_us * per_run:.2f} "
             f"ms in {sum(v[0] for v in by_name.values()) // runs} kernels per run", "",
             "| kind | ms / run | % of kernel time |", "|---|---|---|"]
    for k, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {us * per_run:.3f} | {100 * us / total_us:.1f} |")
    lines += ["", "| kernel | kind | calls / run | ms / run | us / call | % |", "|---|---|---|---|---|---|"]
    for n, (c, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        short = n if len(n) <= 70 else n[:67] + "..."
        lines.append(f"| `{short}` | {kind_of(n)} | {c / runs:.1f} | {us * per_run:.3f} | "
                     f"{us / c:.1f} | {100 * us / total_us:.1f} |")
    return "\n".join(lines)


def profile(fn: Callable[[], Any], runs: int, trace_out: str | None) -> tuple[dict, float]:
    """Trace `runs` calls of `fn` (already warm); the parsed perfetto trace and wall seconds."""
    import jax

    tmp = tempfile.mkdtemp(prefix="profile_top_")
    try:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(runs):
                jax.block_until_ready(fn())
            wall = time.perf_counter() - t0
        path = sorted(glob.glob(os.path.join(tmp, "plugins", "profile", "*",
                                             "perfetto_trace.json.gz")))[-1]
        if trace_out:
            os.makedirs(trace_out, exist_ok=True)
            shutil.copy(path, os.path.join(trace_out, "perfetto_trace.json.gz"))
        with gzip.open(path, "rt") as f:
            return json.load(f), wall
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_program(args: argparse.Namespace) -> tuple[Callable[[], Any], str]:
    """One compiled chunk of `--steps` training steps of the v2 benchmark model."""
    import numpy as np

    from dllm_jax.train import StepSpec, TrainConfig, build_pool, init_state, train_chunk
    from dllm_jax.train.cli import v2_lengths
    from dllm_jax.train.config import MODEL_SIZES

    p, a = v2_lengths()
    cfg = TrainConfig(steps=10 * args.steps, batch_size=args.batch, warmup=1, task_set="v2",
                      prompt_length=p, answer_length=a, pool_size=args.pool_size,
                      block_diffusion=args.block_size > 0, compute_dtype="bfloat16",
                      attn_impl=args.attn_impl)
    model_cfg = MODEL_SIZES[args.model_size](prompt_length=p, answer_length=a,
                                             block_size=args.block_size)
    spec, pool = StepSpec.of(cfg, model_cfg), build_pool(cfg)[0]
    box = {"state": init_state(cfg, model_cfg)}
    lrs = np.full((args.steps,), 1e-4, np.float32)

    def step() -> Any:
        box["state"], m = train_chunk(box["state"], pool, lrs, spec)   # the state is donated
        return m

    label = (f"train: {args.model_size} model, batch {args.batch} x {p + a} tokens"
             f"{f', block diffusion {args.block_size}' if args.block_size else ''}, "
             f"attention {args.attn_impl}, {args.steps} steps per run")
    return step, label


def decode_program(args: argparse.Namespace) -> tuple[Callable[[], Any], str]:
    """One whole `generate` at 8B shapes (random weights), as decode_memory.py runs it."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from bench_common import random_params
    from controllers import make_controller
    from decode_memory import model_config, stacked_shapes, to_layout
    from dllm_jax import decode as D
    from dllm_jax.config import GenerateConfig

    cfg = model_config(args.model)
    if cfg.block_causal:
        cfg = dataclasses.replace(cfg, block_size=args.block)
    gen = GenerateConfig(gen_length=args.gen, block_length=args.block,
                         steps=args.steps or args.gen // 4, cache=args.cache)
    params = to_layout(random_params(stacked_shapes(cfg, "bfloat16")), "auto",
                       args.quantize == "int8")
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.prompt), 2,
                                cfg.vocab_size - 2).astype(jnp.int32)
    valid = jnp.ones((args.batch, args.prompt), bool)
    ctrl = make_controller("low_confidence")

    def run() -> Any:
        return D._generate_jit(params, tokens, valid, jax.random.key(0), ctrl,
                               model_cfg=cfg, gen_cfg=gen).tokens

    label = (f"decode: {args.model}, batch {args.batch}, prompt {args.prompt}, answer "
             f"{args.gen}, block {args.block}, {gen.steps} steps, cache {args.cache}"
             f"{', int8 weights' if args.quantize == 'int8' else ''}")
    return run, label


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=25, help="kernels listed (default 25)")
    ap.add_argument("--runs", type=int, default=3, help="profiled runs after a warm-up (3)")
    ap.add_argument("--trace-out", default=None, help="copy the perfetto trace here")
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="one compiled chunk of training steps")
    t.add_argument("--model-size", default="bench", choices=("bundled", "bench", "tiny"))
    t.add_argument("--batch", type=int, default=512)
    t.add_argument("--block-size", type=int, default=0, help="> 0: block diffusion (SDAR)")
    t.add_argument("--attn-impl", default="xla", choices=("xla", "cudnn", "auto"))
    t.add_argument("--steps", type=int, default=10, help="steps per compiled chunk (10)")
    t.add_argument("--pool-size", type=int, default=512, help="instances per task (512)")
    d = sub.add_parser("decode", help="one whole generate at 8B shapes")
    d.add_argument("--model", default="llada-8b",
                   help="llada-8b, dream-7b, sdar-8b, tiny-llada or tiny-sdar")
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--prompt", type=int, default=256)
    d.add_argument("--gen", type=int, default=256)
    d.add_argument("--block", type=int, default=32)
    d.add_argument("--steps", type=int, default=0, help="0: gen / 4 (4 tokens per step)")
    d.add_argument("--cache", default="dual", choices=("none", "prefix", "dual"))
    d.add_argument("--quantize", default=None, choices=("int8",))
    args = ap.parse_args(argv)
    for flag in ("top", "runs") + (("batch", "steps", "pool_size") if args.what == "train"
                                   else ("batch", "prompt", "gen", "block")):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    fn, label = (train_program if args.what == "train" else decode_program)(args)
    t0 = time.perf_counter()
    jax.block_until_ready(fn())                           # compile + warm-up
    first = time.perf_counter() - t0
    trace, wall = profile(fn, args.runs, args.trace_out)
    events, where = device_events(trace)
    print(f"# {label}; jax {jax.__version__} on {jax.devices()[0].device_kind}; first call "
          f"(compile) {first:.1f} s; {args.runs} profiled runs; kernels from {where}")
    print(summarize(events, args.runs, wall, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
