"""Decode speed of an LLaDA-8B-shaped model (random bf16 weights made on the device), beside
the floors measured in the same run and a PyTorch reference on the same weights.

    PYTHONPATH=. python benchmarks/speed.py --out $OUT        # on the GPU (the full run)
    PYTHONPATH=. python benchmarks/speed.py --tiny --out /tmp/speed   # CPU smoke test

Sections (each printed as it finishes, all written as JSON lines to OUT/speed.jsonl):
  floors    HBM bandwidth (a 2 GiB bf16 copy and sum through JAX, a copy through PyTorch) and
            bf16 matmul rate (8192^3 through JAX and PyTorch), measured now; the best of each
            is the floor.
  parity    the PyTorch reference's logits vs ours on the same weights and tokens; cached
            steps on a fresh cache vs the full forward.
  layout    the cached (dual) and full forward at B1 P256 G256 with per-layer weights
            (`models.unstack_layers`, unrolled layer loop) and with fused q/k/v and gate/up
            weights; the faster is used below. `--scan` adds the stacked `lax.scan` layout
            (the path before this benchmark). Profile of each: top GPU ops by time, and the
            big non-matmul buffers of the optimized HLO.
  forward   ms per single jitted forward of each kind (none = full forward, refresh = full
            forward that also returns the KV cache, prefix / dual = cached step), median of
            bursts of 4 queued calls (and of single blocking calls), compile time, memory;
            beside each, the bandwidth floor (weights + KV bytes / HBM rate) and the compute
            floor (FLOPs / matmul rate).
  torch     the PyTorch reference (benchmarks/torch_llada_ref.py) on the same weights (dlpack):
            LLaDA's loop (no cache) and Fast-dLLM-style prefix / dual cache loops, best of 2.
  generate  answer tokens per second through decode.generate's compiled program (the
            low_confidence controller at a fixed tokens-per-step: steps = gen_length / tps),
            NFE from its stats, compile time, memory; ratio to the torch loop at equal NFE.
`--mini` stops after the layout section (e.g. to compare XLA_FLAGS in a second process).
A short table comes last. Throughput counts answer tokens only.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import gzip
import json
import os
import re
import statistics
import sys
import time
from functools import partial
from typing import Any, Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_common import peak_bytes, random_params  # noqa: E402
from controllers import make_controller  # noqa: E402
from dllm_jax import decode as D  # noqa: E402
from dllm_jax import models as M  # noqa: E402
from dllm_jax.cache import KVCache, usable_cache_keys  # noqa: E402
from dllm_jax.config import GenerateConfig, ModelConfig  # noqa: E402

T0 = time.perf_counter()
LOG: list[dict] = []
OUT = "."
EXE: dict[tuple, tuple] = {}   # (layout, shape, kind, impl) -> (compiled, args), batch-1 dual


def elapsed() -> float:
    return time.perf_counter() - T0


def log(section_: str, **rec: Any) -> dict:
    rec = {"section": section_, **rec}
    LOG.append(rec)
    with open(os.path.join(OUT, "speed.jsonl"), "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
    return rec


def say(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def median_ms(fn: Callable[[], Any], reps: int, warm: int = 1, burst: int = 1
              ) -> tuple[float, list[float]]:
    """Median ms per call. burst > 1: `burst` calls queued back to back, then one wait, so the
    host's dispatch of a call overlaps the device's work on the previous one (as in a loop)."""
    for _ in range(warm):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        outs = [fn() for _ in range(burst)]
        jax.block_until_ready(outs)
        ts.append((time.perf_counter() - t) * 1e3 / burst)
        del outs
    return statistics.median(ts), ts


def mem_analysis(compiled: Any) -> dict:
    try:
        m = compiled.memory_analysis()
        return {"temp_GB": m.temp_size_in_bytes / 1e9, "args_GB": m.argument_size_in_bytes / 1e9,
                "out_GB": m.output_size_in_bytes / 1e9}
    except Exception:  # noqa: BLE001
        return {}


# ----------------------------------------------------------------------------- params
@partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(k: jax.Array, shape: tuple, dtype: Any, std: float) -> jax.Array:
    """normal(0, std) made on the device directly in `dtype` (no float32 or host copy)."""
    return jax.random.normal(k, shape, dtype) * jnp.asarray(std, dtype)


def make_params(cfg: ModelConfig, dtype: Any) -> dict:
    """Per-layer params (see `models.unstack_layers`) made on the default device."""
    return random_params(jax.eval_shape(M.unstack_layers, M.param_shapes(cfg, dtype)))


def random_cache(cfg: ModelConfig, b: int, t: int, dtype: Any, seed: int) -> KVCache:
    shape = (cfg.num_layers, b, t, cfg.num_kv_heads, cfg.head_dim)
    k1, k2 = jax.random.split(jax.random.key(seed))
    return KVCache(k=_normal(k1, shape, dtype, 1.0), v=_normal(k2, shape, dtype, 1.0))


def weight_bytes(cfg: ModelConfig, itemsize: int) -> int:
    """Bytes a forward must read: every layer weight and the LM head (embedding rows: ~0)."""
    per_layer = (cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size
                 + 3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size)
    return itemsize * (cfg.num_layers * per_layer + cfg.hidden_size * cfg.vocab_size)


def forward_flops(cfg: ModelConfig, b: int, tq: int, tk: int, n_logits: int) -> float:
    """Matmul FLOPs of one forward: tq tokens through the layers attending to tk keys, LM head
    over n_logits rows per batch row."""
    dense = 2 * (cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size
                 + 3 * cfg.hidden_size * cfg.intermediate_size)
    attn = 4 * cfg.num_heads * cfg.head_dim * tk
    return float(b * (cfg.num_layers * tq * (dense + attn)
                      + 2 * n_logits * cfg.hidden_size * cfg.vocab_size))


def kv_bytes(cfg: ModelConfig, b: int, t: int, itemsize: int) -> int:
    return 2 * cfg.num_layers * b * t * cfg.kv_size * itemsize


# ----------------------------------------------------------------------------- floors
def measure_floors(tiny: bool) -> dict:
    """HBM bandwidth and bf16 matmul rate, measured now through JAX and through PyTorch; the
    best of each is the floor (the rate this GPU has shown it can reach)."""
    n = (1 << 20) if tiny else (1 << 30)          # bf16 elements: 2 GiB on the GPU
    x = _normal(jax.random.key(1), (n,), jnp.bfloat16, 1.0)
    copy = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    red = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    ms_copy, _ = median_ms(lambda: copy(x), 10, 2, burst=4)
    ms_red, _ = median_ms(lambda: red(x), 10, 2, burst=4)
    bw = {"jax_copy": 2 * 2 * n / (ms_copy * 1e-3), "jax_sum": 2 * n / (ms_red * 1e-3)}
    m = 1024 if tiny else 8192
    a = _normal(jax.random.key(2), (m, m), jnp.bfloat16, 1.0)
    bm = _normal(jax.random.key(3), (m, m), jnp.bfloat16, 1.0)
    mm = jax.jit(lambda p, q: p @ q)
    ms_mm, _ = median_ms(lambda: mm(a, bm), 10, 3, burst=4)
    peak = {"jax_matmul": 2 * m ** 3 / (ms_mm * 1e-3)}
    try:
        import torch
        if torch.cuda.is_available() and jax.default_backend() == "gpu":
            tx = torch.from_dlpack(x)
            ty = torch.empty_like(tx)
            ta, tb = torch.from_dlpack(a), torch.from_dlpack(bm)

            def tbench(f, reps=10, burst=4):
                for _ in range(3):
                    f()
                torch.cuda.synchronize()
                ts = []
                for _ in range(reps):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    for _ in range(burst):
                        f()
                    e1.record()
                    torch.cuda.synchronize()
                    ts.append(e0.elapsed_time(e1) / burst)
                return statistics.median(ts)

            bw["torch_copy"] = 2 * 2 * n / (tbench(lambda: ty.copy_(tx)) * 1e-3)
            peak["torch_matmul"] = 2 * m ** 3 / (tbench(lambda: ta @ tb) * 1e-3)
            del tx, ty, ta, tb
            torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        say(f"torch floors skipped: {e!r}")
    del x, a, bm
    rec = log("floors", hbm_TBps=max(bw.values()) / 1e12,
              bf16_matmul_TFLOPs=max(peak.values()) / 1e12,
              **{f"hbm_{k}_TBps": v / 1e12 for k, v in bw.items()},
              **{f"{k}_TFLOPs": v / 1e12 for k, v in peak.items()}, copy_bytes=4 * n, matmul_n=m)
    say("floors: HBM " + ", ".join(f"{k} {v/1e12:.2f}" for k, v in bw.items())
        + f" TB/s (copies count read+write) -> {rec['hbm_TBps']:.2f}; bf16 matmul {m}^3 "
        + ", ".join(f"{k} {v/1e12:.0f}" for k, v in peak.items())
        + f" TFLOP/s -> {rec['bf16_matmul_TFLOPs']:.0f}")
    return rec


# ----------------------------------------------------------------------------- forwards
@dataclasses.dataclass
class Shape:
    b: int
    p: int
    g: int

    @property
    def t(self) -> int:
        return self.p + self.g

    def __str__(self) -> str:
        return f"B{self.b} P{self.p} G{self.g}"


def forward_inputs(cfg: ModelConfig, s: Shape, lb: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, cfg.vocab_size - 2, size=(s.b, s.t)).astype(np.int32)
    tokens[:, s.p + lb:] = cfg.mask_token_id               # block 0 partly open, rest masked
    tokens[:, s.p + lb // 2: s.p + lb] = cfg.mask_token_id
    valid = np.ones((s.b, s.t), bool)
    pos = np.broadcast_to(np.arange(s.t, dtype=np.int32), (s.b, s.t)).copy()
    start = s.p
    qidx = np.broadcast_to(start + np.arange(lb, dtype=np.int32), (s.b, lb)).copy()
    return dict(tokens=jnp.asarray(tokens), valid=jnp.asarray(valid), pos=jnp.asarray(pos),
                qidx=jnp.asarray(qidx), start=start)


def forward_fns(cfg: ModelConfig, s: Shape, lb: int, impl: str) -> dict[str, Callable]:
    """Jitted single forwards of each kind: fn(params, cache, inp) -> logits."""
    start = s.p

    def none(params, cache, tokens, valid, pos, qidx):
        return M.apply(params, cfg, tokens, pos, valid, qidx, attn_impl=impl)

    def refresh(params, cache, tokens, valid, pos, qidx):
        return M.apply_refresh(params, cfg, tokens, pos, valid, qidx, attn_impl=impl)

    def cached(mode, r):
        def f(params, cache, tokens, valid, pos, qidx):
            cut = lambda a: jax.lax.dynamic_slice_in_dim(a, start, r, axis=1)  # noqa: E731
            usable = usable_cache_keys(mode, valid, start, r)
            qloc = jnp.broadcast_to(jnp.arange(lb, dtype=jnp.int32), (s.b, lb))
            return M.apply_cached(params, cfg, cache, cut(tokens), cut(pos), cut(valid), pos,
                                  usable, qloc, attn_impl=impl)
        return f

    return {"none": jax.jit(none), "refresh": jax.jit(refresh),
            "prefix": jax.jit(cached("prefix", s.g)), "dual": jax.jit(cached("dual", lb))}


def fwd_cost(cfg: ModelConfig, kind: str, s: Shape, lb: int, isz: int) -> tuple[int, float]:
    wb = weight_bytes(cfg, isz)
    if kind == "none":
        return wb, forward_flops(cfg, s.b, s.t, s.t, lb)
    if kind == "refresh":
        return wb + kv_bytes(cfg, s.b, s.t, isz), forward_flops(cfg, s.b, s.t, s.t, lb)
    r = s.g if kind == "prefix" else lb
    # reads the cached keys/values (all T entries are streamed; masked ones included)
    return wb + kv_bytes(cfg, s.b, s.t, isz), forward_flops(cfg, s.b, r, s.t, lb)


def compile_all(jobs: list[tuple[str, Callable[[], Any]]], workers: int) -> dict[str, tuple]:
    """Lower serially (tracing holds the GIL), compile in threads. Returns name -> (compiled,
    lower_s, compile_s)."""
    lowered = []
    for name, lower in jobs:
        t = time.perf_counter()
        lowered.append((name, lower(), time.perf_counter() - t))

    def comp(item):
        name, low, lt = item
        t = time.perf_counter()
        c = low.compile()
        return name, c, lt, time.perf_counter() - t

    out = {}
    # the first alone: its compile time is the one to quote (the others share the CPUs)
    for name, c, lt, ct in map(comp, lowered[:1]):
        out[name] = (c, lt, ct)
    if workers <= 1:
        results = map(comp, lowered[1:])
    else:
        ex = cf.ThreadPoolExecutor(workers)
        results = ex.map(comp, lowered[1:])
    for name, c, lt, ct in results:
        out[name] = (c, lt, ct)
    return out


def run_forwards(cfg, params, shapes, kinds_for, lb, floors, impls, reps, isz, workers,
                 label="list") -> list[dict]:
    recs = []
    jobs, inputs, caches = [], {}, {}
    for s in shapes:
        inp = forward_inputs(cfg, s, lb)
        inputs[str(s)] = inp
        for impl in impls(s):
            fns = forward_fns(cfg, s, lb, impl)
            for kind in kinds_for(s, impl):
                args = (params, None, inp["tokens"], inp["valid"], inp["pos"], inp["qidx"])
                if kind in ("prefix", "dual"):
                    if str(s) not in caches:       # random entries: timing only
                        caches[str(s)] = random_cache(cfg, s.b, s.t, params["embed"].dtype, 5)
                    args = (params, caches[str(s)]) + args[2:]
                jobs.append(((str(s), kind, impl),
                             (lambda f=fns[kind], a=args: f.lower(*a)), args))
    comp = compile_all([(n, low) for n, low, _ in jobs], workers)
    for name, _, args in jobs:
        sname, kind, impl = name
        s = next(x for x in shapes if str(x) == sname)
        c, lt, ct = comp[name]
        ms_single, _ = median_ms(lambda: c(*args), max(3, reps // 2), 2)
        ms, ts = median_ms(lambda: c(*args), reps, 0, burst=4)
        bts, fl = fwd_cost(cfg, kind, s, lb, isz)
        bw_floor = bts / (floors["hbm_TBps"] * 1e12) * 1e3
        fl_floor = fl / (floors["bf16_matmul_TFLOPs"] * 1e12) * 1e3
        floor = max(bw_floor, fl_floor)
        rec = log("forward", layout=label, shape=sname, b=s.b, p=s.p, g=s.g, kind=kind,
                  attn=impl, ms=ms, ms_all=ts, ms_single_call=ms_single, bytes_GB=bts / 1e9, TFLOP=fl / 1e12,
                  bw_floor_ms=bw_floor, flop_floor_ms=fl_floor, floor_ms=floor,
                  x_floor=ms / floor, tokens=s.b * (s.t if kind in ("none", "refresh") else
                                                     (s.g if kind == "prefix" else lb)),
                  lower_s=lt, compile_s=ct, peak_GB=(peak_bytes() or 0) / 1e9,
                  **mem_analysis(c))
        recs.append(rec)
        if kind == "dual" and impl == "auto":
            EXE[(label, sname, kind, impl)] = (c, args)
        say(f"fwd {label:5s} {sname:14s} {kind:8s} {impl:5s} {ms:8.2f} ms (one call alone "
            f"{ms_single:.2f}) | floors: bw "
            f"{bw_floor:6.2f} ms, flop {fl_floor:6.2f} ms -> x{ms/floor:.2f} | compile {ct:.1f}s")
    return recs


# ----------------------------------------------------------------------------- profile
def top_ops_from_trace(logdir: str, n: int = 15) -> list[tuple[str, float, int]]:
    paths = []
    for root, _, files in os.walk(logdir):
        paths += [os.path.join(root, f) for f in files if f.endswith(".trace.json.gz")
                  or f == "perfetto_trace.json.gz"]
    if not paths:
        return []
    with gzip.open(sorted(paths)[-1], "rt") as f:
        tr = json.load(f)
    events = tr["traceEvents"] if isinstance(tr, dict) else tr
    pname = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pname[e.get("pid")] = str(e.get("args", {}).get("name", ""))
    gpu = {p for p, nm in pname.items() if "GPU" in nm or "gpu" in nm or "device" in nm.lower()}
    agg: dict[str, list] = {}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if gpu and e.get("pid") not in gpu:
            continue
        if str(e.get("name", "")).startswith("$"):     # Python frames of the host trace
            continue
        a = agg.setdefault(str(e.get("name"))[:90], [0.0, 0])
        a[0] += float(e["dur"])
        a[1] += 1
    return sorted(((k, v[0], v[1]) for k, v in agg.items()), key=lambda x: -x[1])[:n]


_SHAPE = re.compile(r"=\s*(bf16|f32|s32|pred|u32|f16|s8|u8)\[([0-9,]*)\]")
_SIZES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def hlo_big_buffers(text: str, min_mb: float = 16.0, n: int = 12) -> list[tuple[str, float]]:
    """Instructions of the optimized HLO that produce a large buffer and are not matmuls or
    attention custom calls: the copies (weight slices, concatenations, casts)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        m = _SHAPE.search(line)
        if not m or "custom-call" in line or " parameter(" in line or "ROOT" in line[:5]:
            continue
        dims = [int(d) for d in m.group(2).split(",") if d]
        size = _SIZES[m.group(1)] * int(np.prod(dims)) / 2 ** 20 if dims else 0
        if size >= min_mb:
            op = line.split("=")[1].split("(")[0].strip() if "=" in line else line[:40]
            calls = re.search(r"calls=%?([\w.\-]+)", line)
            out.append((f"{line.split('=')[0].strip()[:40]} {op[:60]} "
                        f"{calls.group(1)[:40] if calls else ''}", size))
    return sorted(out, key=lambda x: -x[1])[:n]


def profile(name: str, fn: Callable[[], Any], reps: int = 3) -> list:
    logdir = os.path.join("/tmp", f"prof_{name}_{os.getpid()}")
    try:
        jax.block_until_ready(fn())
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(reps):
                jax.block_until_ready(fn())
        top = top_ops_from_trace(logdir)
    except Exception as e:  # noqa: BLE001
        say(f"profile {name} failed: {e!r}")
        return []
    total = sum(t for _, t, _ in top_ops_from_trace(logdir, 10 ** 6))
    say(f"profile {name}: top ops over {reps} calls (device time {total/1e3/reps:.2f} ms/call)")
    for op, us, cnt in top:
        print(f"    {us/1e3/reps:8.3f} ms/call  {cnt//reps:5d}x  {op}")
    log("profile", name=name, per_call_ms=total / 1e3 / reps,
        top=[(op, us / 1e3 / reps, cnt // reps) for op, us, cnt in top])
    return top


# ----------------------------------------------------------------------------- generate
def run_generates(cfg, params, configs, lb, workers, key_seed=0) -> list[dict]:
    ctrl = make_controller("low_confidence")
    jobs, argsd = [], {}
    for (s, cache, tps, warm) in configs:
        rng = np.random.default_rng(1)
        prompt = jnp.asarray(rng.integers(2, cfg.vocab_size - 2, size=(s.b, s.p)).astype(np.int32))
        valid = jnp.ones((s.b, s.p), bool)
        gen = GenerateConfig(gen_length=s.g, block_length=lb, steps=s.g // tps, cache=cache)
        args = (params, prompt, valid, jax.random.key(key_seed), ctrl)
        name = (str(s), cache, tps)
        argsd[name] = (s, gen, args, warm)
        jobs.append((name, (lambda a=args, g=gen: D._generate_jit.lower(
            *a, model_cfg=cfg, gen_cfg=g))))
    comp = compile_all(jobs, workers)
    recs = []
    for name, (s, gen, args, warm) in argsd.items():
        c, lt, ct = comp[name]
        if warm:
            jax.block_until_ready(c(*args))
        t = time.perf_counter()
        out = jax.block_until_ready(c(*args))
        dt = time.perf_counter() - t
        nfe = int(np.asarray(out.stats.nfe).max())
        still_masked = int((np.asarray(out.tokens) == cfg.mask_token_id).sum())
        tok_s = s.b * s.g / dt
        rec = log("generate", shape=str(s), b=s.b, p=s.p, g=s.g, cache=name[1], tps=name[2],
                  steps=gen.steps, nfe=nfe, seconds=dt, tok_s=tok_s, ms_per_step=dt / nfe * 1e3,
                  still_masked=still_masked, warm=warm, lower_s=lt, compile_s=ct,
                  peak_GB=(peak_bytes() or 0) / 1e9, **mem_analysis(c))
        recs.append(rec)
        if s.b == 1 and name[1] == "dual" and name[2] == 4 and warm:
            EXE[("gen", str(s), "dual", 4)] = (c, args)
        say(f"gen {str(s):14s} {name[1]:6s} tps {name[2]}: {tok_s:9.1f} tok/s  "
            f"({dt:.2f} s, NFE {nfe}, {dt/nfe*1e3:.2f} ms/step, compile {ct:.1f}s, "
            f"masked left {still_masked})")
    return recs


# ----------------------------------------------------------------------------- torch
def run_torch(cfg, params, configs, lb, repeats: int = 1) -> list[dict]:
    import torch

    from torch_llada_ref import TorchLLaDA, generate_fastdllm, generate_llada

    dev = "cuda" if jax.default_backend() == "gpu" else "cpu"
    model = TorchLLaDA(params, cfg)
    recs = []
    # warm up (cuBLAS / SDPA handles, allocator): one block of each loop
    s0 = configs[0][0]
    pr = torch.ones((s0.b, s0.p), device=dev, dtype=torch.long)
    generate_llada(model, pr, 2, lb, lb, cfg.mask_token_id)
    for c in ("prefix", "dual"):
        generate_fastdllm(model, pr, 2, lb, lb, cfg.mask_token_id, c)
    for (s, cache, tps) in configs:
        rng = np.random.default_rng(1)
        prompt = torch.as_tensor(rng.integers(2, cfg.vocab_size - 2, size=(s.b, s.p)),
                                 device=dev, dtype=torch.long)
        steps = s.g // tps

        def go():
            if cache == "none":
                return generate_llada(model, prompt, steps, s.g, lb, cfg.mask_token_id)
            return generate_fastdllm(model, prompt, steps, s.g, lb, cfg.mask_token_id, cache)

        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            x, nfe = go()
            if dev == "cuda":
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - t)
        dt = min(runs)
        tpk = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else 0.0
        rec = log("torch", shape=str(s), b=s.b, p=s.p, g=s.g, cache=cache, tps=tps, steps=steps,
                  nfe=nfe, seconds=dt, seconds_all=runs, tok_s=s.b * s.g / dt,
                  ms_per_step=dt / nfe * 1e3, torch_peak_GB=tpk)
        recs.append(rec)
        say(f"torch {str(s):14s} {cache:6s} tps {tps}: {s.b*s.g/dt:9.1f} tok/s (best of "
            f"{', '.join(f'{r:.2f}' for r in runs)} s, NFE {nfe}, {dt/nfe*1e3:.2f} ms/step)")
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return recs


def check_torch_parity(cfg, params, lb) -> None:
    """Same weights, same tokens: torch reference logits vs ours (block rows), and the cached
    steps on a fresh cache vs the full forward (ours)."""
    import torch

    from torch_llada_ref import TorchLLaDA

    s = Shape(1, 64, 64)
    inp = forward_inputs(cfg, s, lb, seed=3)
    f = forward_fns(cfg, s, lb, "auto")
    args = (params, None, inp["tokens"], inp["valid"], inp["pos"], inp["qidx"])
    ours = np.asarray(f["none"](*args), np.float32)
    _, cache = f["refresh"](*args)
    dual = np.asarray(f["dual"](params, cache, *args[2:]), np.float32)
    prefix = np.asarray(f["prefix"](params, cache, *args[2:]), np.float32)
    model = TorchLLaDA(params, cfg)
    ids = torch.from_dlpack(inp["tokens"]).long()
    tl, _ = model.forward(ids)
    theirs = tl[:, s.p:s.p + lb].float().cpu().numpy()
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    rec = log("parity", torch_vs_ours_rel=rel(ours, theirs), argmax_agree=agree,
              dual_fresh_vs_full_rel=rel(dual, ours), prefix_fresh_vs_full_rel=rel(prefix, ours))
    say(f"parity: torch ref vs ours rel {rec['torch_vs_ours_rel']:.2e} (argmax agree {agree:.2f}); "
        f"fresh-cache dual vs full {rec['dual_fresh_vs_full_rel']:.2e}, prefix "
        f"{rec['prefix_fresh_vs_full_rel']:.2e}")


# ----------------------------------------------------------------------------- main
def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model and shapes (CPU smoke test)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/speed"))
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds; optional sections are skipped past this")
    ap.add_argument("--workers", type=int, default=8, help="parallel XLA compiles")
    ap.add_argument("--skip", default="", help="comma list of sections to skip "
                    "(parity, forward, torch, generate)")
    ap.add_argument("--mini", action="store_true",
                    help="only the layout comparison at the small shape (e.g. under other "
                    "XLA_FLAGS)")
    ap.add_argument("--mini-list-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scan", action="store_true",
                    help="also time the stacked lax.scan layout (needs 14 GB more)")
    args = ap.parse_args()
    OUT = args.out
    os.makedirs(OUT, exist_ok=True)
    open(os.path.join(OUT, "speed.jsonl"), "w").close()
    skip = set(filter(None, args.skip.split(",")))
    lb = 32
    dtype = jnp.bfloat16
    isz = 2
    if args.tiny:
        cfg = ModelConfig.tiny("llada", vocab_size=512, hidden_size=128, num_layers=4,
                               num_heads=4, num_kv_heads=4, head_dim=32, intermediate_size=384,
                               mask_token_id=511, max_position=4096)
        S_small, S_long, S_batch = Shape(1, 32, 64), Shape(1, 64, 128), Shape(4, 32, 64)
        reps = 3
    else:
        cfg = ModelConfig.llada_8b()
        S_small, S_long, S_batch = Shape(1, 256, 256), Shape(1, 512, 1024), Shape(16, 256, 256)
        reps = 10
    dev = jax.devices()[0]
    say(f"jax {jax.__version__} on {dev.device_kind} ({jax.default_backend()}); "
        f"model {'tiny' if args.tiny else 'LLaDA-8B shapes'}; out {OUT}")
    log("env", jax=jax.__version__, device=str(dev.device_kind), backend=jax.default_backend(),
        argv=sys.argv, cfg=cfg.to_dict())

    floors = measure_floors(args.tiny)
    t = time.perf_counter()
    params = make_params(cfg, dtype)
    jax.block_until_ready(params)
    say(f"params made on {dev.device_kind}: {weight_bytes(cfg, isz)/1e9:.2f} GB read per "
        f"forward ({time.perf_counter()-t:.1f}s)")
    results: dict[str, list] = {"forward": [], "layout": [], "generate": [], "torch": []}
    log("xla_flags", XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))

    if "parity" not in skip:
        check_torch_parity(cfg, params, lb)

    # 1. layout: per-layer weights (unrolled layers) as made, and the fused variant (one
    #    q/k/v matmul, one gate/up matmul); the faster cached step picks the layout used below.
    #    (The stacked lax.scan layout, the path before this benchmark: `--scan`.)
    layouts = {"list": params}
    if not args.mini_list_only:
        layouts["fused"] = M.unstack_layers(params, fuse=True)
        jax.block_until_ready(layouts["fused"])
    if args.scan:
        layouts["scan"] = M.stack_layers(params)
    for label, prm in layouts.items():
        results["layout"] += run_forwards(
            cfg, prm, [S_small], lambda s, i: ["none", "dual"], lb, floors,
            lambda s: ["auto"], reps, isz, args.workers, label=label)
    dual_ms = {r["layout"]: r["ms"] for r in results["layout"] if r["kind"] == "dual"}
    best = min((k for k in dual_ms if k != "scan"), key=dual_ms.get)
    say(f"layout: cached (dual) step " + ", ".join(f"{k} {v:.2f} ms" for k, v in dual_ms.items())
        + f" -> using '{best}'")
    log("layout_choice", best=best, dual_ms=dual_ms)
    for label in layouts:
        c, a = EXE[(label, str(S_small), "dual", "auto")]
        big = hlo_big_buffers(c.as_text(), 0.01 if args.tiny else 16.0)
        say(f"HLO {label} dual step: big non-matmul buffers (MiB):")
        for nm, mb in big[:6]:
            print(f"    {mb:9.2f}  {nm}")
        log("hlo", layout=label, big=big)
        profile(f"dual_{label}_{S_small}", lambda c=c, a=a: c(*a))
    fast = layouts[best]
    layouts.pop("scan", None)
    EXE.clear()
    if args.mini:
        summary(results, floors)
        return

    # 2. forwards with the chosen layout: every kind at three shapes
    if "forward" not in skip:
        def kinds_for(s, impl):
            return ["refresh", "prefix"] if s == S_small else ["none", "refresh", "prefix", "dual"]

        results["forward"] = run_forwards(cfg, fast, [S_small, S_long, S_batch], kinds_for,
                                          lb, floors, lambda s: ["auto"], reps, isz,
                                          args.workers, label=best)
        key = (best, str(S_batch), "dual", "auto")
        if key in EXE:
            c, a = EXE[key]
            profile(f"dual_{best}_{S_batch}", lambda c=c, a=a: c(*a))
        EXE.clear()

    # 3. torch reference, same weights (per-layer q/k/v/gate/up views)
    if "torch" not in skip and elapsed() < args.budget:
        tconfs = [(S_small, c, tps) for tps in (4, 2) for c in ("none", "prefix", "dual")]
        try:
            results["torch"] = run_torch(cfg, params, tconfs, lb, repeats=2)
        except Exception as e:  # noqa: BLE001
            say(f"torch reference failed: {e!r}")
    if best != "list":
        del params, layouts["list"]

    # 4. generate (the first config is compiled alone: its compile time is quoted)
    if "generate" not in skip and elapsed() < args.budget:
        confs = [(S_small, "dual", 4, True)]
        for cache in ("none", "prefix", "dual"):
            for tps in (1, 2, 4):
                if (cache, tps) != ("dual", 4):
                    confs.append((S_small, cache, tps, True))
        confs += [(S_long, "dual", 1, True), (S_long, "dual", 4, True),
                  (S_long, "none", 4, False)]
        confs += [(S_batch, "dual", 4, True), (S_batch, "prefix", 4, False),
                  (S_batch, "none", 4, False)]
        results["generate"] = run_generates(cfg, fast, confs, lb, args.workers)
        key = ("gen", str(S_small), "dual", 4)
        if key in EXE:
            c, a = EXE[key]
            profile("generate_dual_tps4", lambda c=c, a=a: c(*a), reps=1)

    summary(results, floors)
    say(f"done; peak device memory {((peak_bytes() or 0) / 1e9):.1f} GB")


def summary(results: dict, floors: dict) -> None:
    print("\n==== summary (answer tokens only; floors measured in this run: "
          f"HBM {floors['hbm_TBps']:.2f} TB/s, bf16 {floors['bf16_matmul_TFLOPs']:.0f} TFLOP/s)")
    print(f"{'forward':34s} {'ms':>8s} {'bw-floor':>9s} {'flop-floor':>10s} {'x floor':>8s}")
    for r in results["forward"] + results["layout"]:
        print(f"{r['layout']+' '+r['shape']+' '+r['kind']+' '+r['attn']:34s} {r['ms']:8.2f} "
              f"{r['bw_floor_ms']:9.2f} {r['flop_floor_ms']:10.2f} {r['x_floor']:8.2f}")
    theirs = {(r["shape"], r["cache"], r["tps"]): r for r in results["torch"]}
    refresh = {r["shape"]: r["ms"] for r in results["forward"] + results["layout"]
               if r["kind"] == "refresh"}
    bw_floor = {r["shape"]: r["bw_floor_ms"] for r in results["forward"] + results["layout"]
                if r["kind"] == "dual"}
    print(f"{'generate':28s} {'tok/s':>8s} {'ms/step':>8s} {'NFE':>5s} {'cached step':>11s} "
          f"{'x bw-floor':>10s} {'torch tok/s':>11s} {'ratio':>6s}")
    for r in results["generate"]:
        t = theirs.get((r["shape"], r["cache"], r["tps"]))
        tt = f"{t['tok_s']:11.1f}" if t else f"{'-':>11s}"
        ra = f"{r['tok_s']/t['tok_s']:6.2f}" if t else f"{'-':>6s}"
        cs, xf = f"{'-':>11s}", f"{'-':>10s}"
        if r["cache"] != "none" and r["shape"] in refresh:
            nb = r["g"] // 32
            c_ms = (r["seconds"] * 1e3 - nb * refresh[r["shape"]]) / max(1, r["nfe"] - nb)
            r["cached_step_ms"] = c_ms
            cs = f"{c_ms:11.2f}"
            if r["cache"] == "dual" and r["shape"] in bw_floor:
                xf = f"{c_ms / bw_floor[r['shape']]:10.2f}"
        print(f"{r['shape']+' '+r['cache']+' tps'+str(r['tps']):28s} {r['tok_s']:8.1f} "
              f"{r['ms_per_step']:8.2f} {r['nfe']:5d} {cs} {xf} {tt} {ra}")
    print("(cached step = (decode time - one refresh forward per block) / cached steps; "
          "ratio = ours / torch reference tok/s at the same NFE)")


if __name__ == "__main__":
    main()
