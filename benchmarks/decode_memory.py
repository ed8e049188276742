"""Memory of one compiled decode against its floor (weights + ONE KV cache), from XLA's buffer
assignment: nothing is allocated or run, the decode is only lowered and compiled with abstract
inputs (`jax.ShapeDtypeStruct`), so 8B shapes compile on any machine.

    python benchmarks/decode_memory.py [--model llada-8b|dream-7b|sdar-8b] [--batch 1 32 64 128]
        [--prompt 256] [--gen 256] [--block 32] [--cache dual] [--layout auto|stacked|per-layer]

For each batch: weights, one cache (k + v of every layer, `[L, B, P + G, Hkv, hd]`), XLA's
temporaries and the peak (arguments + outputs + temporaries - aliased), in GiB, and
peak / floor. The figures are the compiling backend's: run it on the GPU for the GPU's
(its fusion and buffer sharing differ from the CPU's).

`--run` also executes each decode on random weights drawn on the device (no host copy): answer
tokens/s (median of `--repeats` timed runs after a warm one), ms per forward, and the device's
own peak (`memory_stats()['peak_bytes_in_use']`, GPU/TPU only; it only grows, so batches are run
in increasing order). A batch that does not fit is reported as `OOM`, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from bench_common import peak_bytes, random_params
from controllers import make_controller
from dllm_jax import decode as D
from dllm_jax import models as M
from dllm_jax.config import GenerateConfig, ModelConfig

GIB = 2**30


def model_config(name: str) -> ModelConfig:
    if name == "llada-8b":
        return ModelConfig.llada_8b()
    if name == "dream-7b":
        return ModelConfig.dream_7b()
    if name == "sdar-8b":       # Qwen3-8B shapes, block-causal
        return ModelConfig.sdar_8b()
    if name in ("tiny-llada", "tiny-sdar"):  # smoke tests
        return ModelConfig.tiny(name.split("-")[1])
    raise SystemExit(f"--model must be llada-8b, dream-7b, sdar-8b, tiny-llada or tiny-sdar, "
                     f"got {name!r}.")


def to_layout(params: object, layout: str, quantize: bool = False) -> object:
    """Stacked params -> (int8 with `quantize`, as `session.load(quantize="int8")`) the
    decode's layout ("stacked", "per-layer" = fused per-layer, "auto" = `decode_layout`)."""
    from dllm_jax import quant

    if quantize:
        params = quant.quantize_params(params)
    if layout == "stacked":
        return params
    if layout == "per-layer":
        return M.unstack_layers(params, fuse=True)
    return M.decode_layout(params)


def stacked_shapes(cfg: ModelConfig, dtype: str) -> object:
    shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), shapes)


def abstract_params(cfg: ModelConfig, layout: str, dtype: str, quantize: bool = False
                    ) -> object:
    return jax.eval_shape(lambda p: to_layout(p, layout, quantize), stacked_shapes(cfg, dtype))


def measure_floors() -> dict[str, float]:
    """This device's bf16 matmul peak (FLOP/s, an 8192^3 matmul) and memory bandwidth (B/s, a
    2 GiB bf16 array read and written), best of 5 each."""
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    x = jnp.ones((2**30,), jnp.bfloat16)
    mm, cp = jax.jit(lambda a: a @ a), jax.jit(lambda x: x + 1)

    def best(f, v):
        jax.block_until_ready(f(v))
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(f(v))
            ts.append(time.perf_counter() - t0)
        return min(ts)

    return {"flops": 2 * 8192**3 / best(mm, a), "bw": 2 * x.nbytes / best(cp, x)}


def fast_dllm_floor_s(cfg: ModelConfig, gen: GenerateConfig, batch: int, prompt: int,
                      floors: dict[str, float], itemsize: int = 2) -> float:
    """Seconds Fast-dLLM's dual-cache algorithm needs at best on this device: per block one
    full forward over prompt + answer (the refresh) and steps_per_block - 1 cached forwards of
    the block's positions, each at max(FLOPs / peak, bytes read / bandwidth).

    FLOPs of a forward of n query positions against k keys:
    2 N n + 4 L H hd n k + 2 D V Lb (N = layer weights, logits for the block only);
    bytes: layer weights + LM head + the keys/values read (2 L k Hkv hd itemsize)."""
    L, D_, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    n_layer = L * (D_ * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * D_
                   + 3 * D_ * cfg.intermediate_size)
    lb, t = gen.block_length, prompt + gen.gen_length

    def fwd(n: int, k: int) -> float:
        flops = batch * (2 * n_layer * n + 4 * L * cfg.num_heads * cfg.head_dim * n * k
                         + 2 * D_ * V * lb)
        byts = (n_layer + D_ * V) * itemsize + batch * 2 * L * k * cfg.kv_size * itemsize
        return max(flops / floors["flops"], byts / floors["bw"])

    blocks = gen.gen_length // lb
    per_block = gen.steps // blocks
    return blocks * (fwd(t, t) + (per_block - 1) * fwd(lb, t))


def measure(cfg: ModelConfig, gen: GenerateConfig, batch: int, prompt: int, layout: str,
            dtype: str, params: object = None, repeats: int = 0, quantize: bool = False
            ) -> dict[str, float]:
    """Buffer-assignment memory (GiB) of one decode; with `params` (real arrays) and
    `repeats` > 0 also its timing and the device's peak."""
    abstract = abstract_params(cfg, layout, dtype, quantize)
    ctrl = make_controller("low_confidence")
    args = (abstract, jax.ShapeDtypeStruct((batch, prompt), jnp.int32),
            jax.ShapeDtypeStruct((batch, prompt), jnp.bool_), jax.random.key(0), ctrl)
    compiled = D._generate_jit.lower(*args, model_cfg=cfg, gen_cfg=gen).compile()
    mem = compiled.memory_analysis()
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    t = prompt + gen.gen_length
    cache = 2 * cfg.num_layers * batch * t * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    rec = {"weights": weights / GIB, "cache": cache / GIB, "temp": mem.temp_size_in_bytes / GIB,
           "peak": peak / GIB, "ratio": peak / (weights + cache)}
    if params is None or repeats <= 0:
        return rec
    tokens = jax.random.randint(jax.random.key(1), (batch, prompt), 2, cfg.vocab_size - 2)
    real = (params, tokens.astype(jnp.int32), jnp.ones((batch, prompt), bool),
            jax.random.key(0), ctrl)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*real))
        if i:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    nfe = int(jnp.max(out.stats.nfe))
    dev_peak = peak_bytes()
    rec.update(tok_s=batch * gen.gen_length / sec, ms_forward=sec / nfe * 1e3, nfe=nfe,
               device_peak=(dev_peak or 0) / GIB)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llada-8b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 64, 128])
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=0, help="default: gen / 4 (4 tokens per step)")
    ap.add_argument("--cache", default="dual", choices=("none", "prefix", "dual"))
    ap.add_argument("--layout", default="auto", choices=("auto", "stacked", "per-layer"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="weights and cache (XLA:CPU computes bf16 matmuls in float32 and "
                         "keeps float32 copies of the weights: use float32 there)")
    ap.add_argument("--run", action="store_true",
                    help="also run each decode on random weights: tok/s and the device's peak")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per batch with --run")
    ap.add_argument("--refresh-scope", default="full", choices=("full", "answer"),
                    help="the cache's block-start refresh (GenerateConfig.refresh_scope)")
    ap.add_argument("--refresh-blocks", type=int, default=1,
                    help="refresh every K-th block start (GenerateConfig.refresh_blocks)")
    ap.add_argument("--quantize", default=None, choices=("int8",),
                    help="int8 weight-only matrices (dllm_jax.quant), activations in --dtype")
    ap.add_argument("--floors", action="store_true",
                    help="with --run: measure peak FLOP/s and bandwidth and print each batch's "
                         "Fast-dLLM dual-cache floor (fast_dllm_floor_s) beside its tok/s")
    args = ap.parse_args()
    if args.run and args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1 with --run, got {args.repeats}.")
    cfg = model_config(args.model)
    if cfg.block_causal:
        cfg = dataclasses.replace(cfg, block_size=args.block)
    gen = GenerateConfig(gen_length=args.gen, block_length=args.block,
                         steps=args.steps or args.gen // 4, cache=args.cache,
                         refresh_scope=args.refresh_scope, refresh_blocks=args.refresh_blocks)
    print(f"# {args.model}, prompt {args.prompt}, answer {args.gen}, block {args.block}, "
          f"cache {args.cache} (refresh {args.refresh_scope}, every {args.refresh_blocks} "
          f"block(s)), layout {args.layout}, {args.dtype}"
          f"{' int8 weights' if args.quantize else ''}, backend {jax.default_backend()}")
    params, floors = None, None
    if args.floors:
        floors = measure_floors()
        print(f"# floors: bf16 matmul {floors['flops'] / 1e12:.0f} TFLOP/s, "
              f"bandwidth {floors['bw'] / 1e12:.2f} TB/s", flush=True)
    if args.run:
        params = to_layout(random_params(stacked_shapes(cfg, args.dtype)), args.layout,
                           args.quantize == "int8")
    cols = "| batch | weights GiB | one cache GiB | XLA temp GiB | peak GiB | peak / floor |"
    if args.run:
        cols += " answer tok/s | ms / forward | NFE | device peak GiB |"
    if floors:
        cols += " Fast-dLLM floor tok/s | tok/s / floor |"
    print(cols)
    print("|" + "---|" * (cols.count("|") - 1))
    for b in sorted(args.batch) if args.run else args.batch:
        try:
            r = measure(cfg, gen, b, args.prompt, args.layout, args.dtype, params,
                        args.repeats if args.run else 0, args.quantize == "int8")
        except Exception as e:  # noqa: BLE001 (an allocation failure ends this batch's row)
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            print(f"| {b} | OOM: {str(e).splitlines()[0][:160]} |", flush=True)
            continue
        row = (f"| {b} | {r['weights']:.2f} | {r['cache']:.2f} | {r['temp']:.2f} | "
               f"{r['peak']:.2f} | {r['ratio']:.2f} |")
        if args.run:
            row += (f" {r['tok_s']:.0f} | {r['ms_forward']:.2f} | {r['nfe']} | "
                    f"{r['device_peak']:.2f} |")
        if floors:
            fl = b * args.gen / fast_dllm_floor_s(cfg, gen, b, args.prompt, floors)
            row += f" {fl:.0f} | {r['tok_s'] / fl:.2f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
