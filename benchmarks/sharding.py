"""Sharding benchmark for a multi-GPU host: batch throughput on 1 vs N devices, and a long
(>= 32k tokens of prompt + answer) decode on 1 device vs sequence-parallel over N.

    python benchmarks/sharding.py                    # every visible GPU, LLaDA-8B shapes, bf16
    python benchmarks/sharding.py --model sdar_8b    # SDAR-8B / Qwen3-8B shapes, block 4
    python benchmarks/sharding.py --tiny             # CPU smoke test: 8 simulated devices
    python benchmarks/sharding.py --devices 2 --cases long_1dev,long_seq --long-tokens 65536

Each case runs in a fresh subprocess (so its peak memory is its own and an out-of-memory
failure is a result, not a crash of the benchmark) and prints one JSON line; the parent prints
a table and, with --json FILE, writes all rows. Weights are random (drawn on the devices,
already sharded, in the params dtype): timing does not depend on their values. The decode uses
LLaDA's low-confidence rule with a fixed schedule, so every case does the same number of
forwards. Throughput counts answer tokens only (batch x gen_length / wall time of the
compiled decode, compile excluded).

Cases (N = --devices; "vs 1 device" in the table = tok/s / (N x the 1-device tok/s) for the
batch cases, tok/s / the 1-device tok/s for the long ones):
  batch_1dev        one device, the plain single-device path (no mesh)
  batch_data        mesh data=N: the batch split over the devices
  batch_model       mesh model=N: tensor parallel (heads / MLP / vocab split)
  batch_data_model  mesh data=N/2,model=2
  long_1dev         one device, prompt + answer = --long-tokens
  long_seq          mesh seq=N: tokens and KV cache split, ring attention
  long_model        mesh model=N: weights and KV heads split, sequence whole
(the 2-GPU names of earlier runs, batch_2dev_data etc., are accepted: they are --devices 2.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

CASES = ("batch_1dev", "batch_data", "batch_model", "batch_data_model", "long_1dev",
         "long_seq", "long_model")
#: The names of the 2-GPU runs in RESULTS.md.
OLD_NAMES = {"batch_2dev_data": "batch_data", "batch_2dev_model": "batch_model",
             "long_2dev_seq": "long_seq", "long_2dev_model": "long_model"}


def mesh_spec(case: str, n: int) -> str | None:
    """The mesh of a case on n devices (None: one device, no mesh)."""
    return {"batch_1dev": None, "long_1dev": None, "batch_data": f"data={n}",
            "batch_model": f"model={n}", "batch_data_model": f"data={n // 2},model=2",
            "long_seq": f"seq={n}", "long_model": f"model={n}"}[case]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke test: tiny model, 8 simulated host devices, short sequences")
    p.add_argument("--devices", type=int, default=None,
                   help="N devices of the sharded cases (default: all visible; --tiny: 8)")
    p.add_argument("--model", default="llada_8b", choices=("llada_8b", "dream_7b", "sdar_8b"),
                   help="model shapes (random weights; sdar_8b: block-causal, exact cache)")
    p.add_argument("--layers", type=int, default=None,
                   help="override the number of layers (e.g. to fit a long case)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=16, help="rows of the batch-throughput cases")
    p.add_argument("--prompt-length", type=int, default=256, help="batch cases' prompt length")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="default: gen-length")
    p.add_argument("--cache", default="dual", help="none | prefix | dual")
    p.add_argument("--long-tokens", type=int, default=32768,
                   help="prompt + answer tokens of the long cases (>= 32k on the GPUs)")
    p.add_argument("--long-gen-length", type=int, default=32)
    p.add_argument("--attn-impl", default="auto", help="attention of the unsharded paths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--json", default=None, help="write all rows to this file")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case
    p.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.prompt_length, args.gen_length = 8, 16, 16
        args.block_length, args.long_tokens, args.long_gen_length = 8, 256, 16
        args.repeats = min(args.repeats, 2)
        args.timeout = min(args.timeout, 600)
    return args


# ----------------------------------------------------------------------------- one case
def _model_cfg(args: argparse.Namespace) -> Any:
    import dataclasses

    from dllm_jax.config import ModelConfig

    if args.tiny:
        arch = "sdar" if args.model == "sdar_8b" else "llada"
        cfg = ModelConfig.tiny(arch, vocab_size=128, mask_token_id=127, hidden_size=64,
                               num_heads=8, num_kv_heads=8, head_dim=8,
                               max_position=args.long_tokens + 64)
    else:
        cfg = {"llada_8b": ModelConfig.llada_8b, "dream_7b": ModelConfig.dream_7b,
               "sdar_8b": ModelConfig.sdar_8b}[args.model]()
        cfg = dataclasses.replace(cfg, max_position=max(cfg.max_position, args.long_tokens))
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    return cfg


def _random_params(cfg: Any, dtype: Any, mesh: Any) -> Any:
    """Random weights drawn leaf by leaf on the devices, in `dtype`, already sharded."""
    import jax

    from bench_common import random_params
    from dllm_jax import sharding as S
    from dllm_jax.models import param_shapes

    shapes = param_shapes(cfg, dtype)
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return random_params(shapes, shardings=jax.tree.map(lambda _: dev, shapes))
    return random_params(shapes, shardings=S.param_shardings(shapes, mesh))


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench_common import memory_by_device
    from controllers import make_controller
    from dllm_jax import sharding as S
    from dllm_jax.config import GenerateConfig
    from dllm_jax.decode import generate

    case = args.case
    cfg = _model_cfg(args)
    dtype = jnp.dtype(args.dtype)
    spec = mesh_spec(case, args.devices)
    mesh = None if spec is None else S.make_mesh(spec, devices=jax.devices()[:args.devices])
    long = case.startswith("long")
    if long:
        g = args.long_gen_length
        b, p = 1, args.long_tokens - g
        gen = GenerateConfig(gen_length=g, block_length=min(args.block_length, g), steps=g,
                             cache=args.cache, attn_impl=args.attn_impl)
    else:
        g, b, p = args.gen_length, args.batch, args.prompt_length
        gen = GenerateConfig(gen_length=g, block_length=args.block_length,
                             steps=args.steps or g, cache=args.cache, attn_impl=args.attn_impl)
    row: dict[str, Any] = {"case": case, "mesh": spec or "single device",
                           "devices": 1 if mesh is None else mesh.devices.size,
                           "device_kind": jax.devices()[0].device_kind, "model": args.model
                           if not args.tiny else "tiny", "layers": cfg.num_layers,
                           "dtype": str(dtype), "batch": b, "prompt": p, "gen_length": g,
                           "tokens": p + g, "cache": gen.cache}
    try:
        params = _random_params(cfg, dtype, mesh)
        rng = np.random.default_rng(0)
        prompt = rng.integers(3, min(cfg.vocab_size, 30000), size=(b, p)).astype(np.int32)
        ctrl = make_controller("low_confidence")
        t0 = time.perf_counter()
        out = generate(params, cfg, prompt, gen, ctrl, mesh=mesh)
        out.tokens.block_until_ready()
        row["first_call_s"] = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = generate(params, cfg, prompt, gen, ctrl, mesh=mesh)
            out.tokens.block_until_ready()
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        row.update(status="ok", decode_s=t, nfe=int(np.asarray(out.stats.nfe).max()),
                   answer_tokens_per_s=b * g / t, ms_per_forward=1e3 * t / max(
                       int(np.asarray(out.stats.nfe).max()), 1))
    except Exception as e:  # noqa: BLE001 - an OOM is a result of this benchmark
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        row.update(status="OOM" if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in
                   str(e).lower() else "error", error=msg)
    row["memory"] = memory_by_device()
    return row


# ----------------------------------------------------------------------------- driver
def _without_flag(argv: list[str], flag: str) -> list[str]:
    """argv without `flag VALUE` / `flag=VALUE` (the child gets its own --case)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _fmt(row: dict[str, Any]) -> str:
    used = row.get("memory", [])[:max(int(row.get("devices", 1)), 1)]
    peaks = [m["peak_gib"] for m in used if m.get("peak_gib") is not None]
    mem = "/".join(f"{x:.1f}" for x in peaks) if peaks else "n/a"
    if row.get("status") != "ok":
        return (f"{row['case']:<18} {row['mesh']:<14} {row['tokens']:>7} {row['batch']:>5} "
                f"{row.get('status', '?'):>10}  peak GiB/dev {mem}  {row.get('error', '')}")
    return (f"{row['case']:<18} {row['mesh']:<14} {row['tokens']:>7} {row['batch']:>5} "
            f"{row['answer_tokens_per_s']:>10.1f}  {row['ms_per_forward']:>8.2f} ms/fwd  "
            f"nfe {row['nfe']:>4}  peak GiB/dev {mem}")


def _efficiency(rows: list[dict[str, Any]]) -> None:
    """Adds `vs_1dev` to every ok row: its tok/s against the same kind's 1-device row
    (batch cases: per device, tok/s / (N x 1-device tok/s); long cases: tok/s / 1-device)."""
    one = {r["case"].split("_")[0]: r for r in rows
           if r["case"].endswith("_1dev") and r.get("status") == "ok"}
    for r in rows:
        base = one.get(r["case"].split("_")[0])
        if r.get("status") != "ok" or base is None or r["case"].endswith("_1dev"):
            continue
        n = r["devices"] if r["case"].startswith("batch") else 1
        r["vs_1dev"] = r["answer_tokens_per_s"] / (n * base["answer_tokens_per_s"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.devices is None and not args.case:   # counted in a child: the parent holds no GPU
        args.devices = int(subprocess.run(
            [sys.executable, "-c", "import jax; print(len(jax.devices()))"], capture_output=True,
            text=True, env=dict(os.environ), check=True).stdout.split()[-1])
    if args.devices < 2 or args.devices % 2:
        print(f"error: --devices must be an even number >= 2, got {args.devices} (the "
              f"sharded cases split over N devices and data=N/2,model=2).", file=sys.stderr)
        return 2
    if args.case:
        print(json.dumps(run_case(args)), flush=True)
        return 0
    cases = [OLD_NAMES.get(c, c) for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"error: unknown case(s) {unknown} in --cases; choose from {', '.join(CASES)}.",
              file=sys.stderr)
        return 2
    rows = []
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    base = _without_flag(base, "--devices") + ["--devices", str(args.devices)]
    base = _without_flag(base, "--cases")
    print(f"{'case':<18} {'mesh':<14} {'tokens':>7} {'batch':>5} {'ans tok/s':>10}", flush=True)
    for case in cases:
        cmd = [sys.executable, os.path.abspath(__file__), *base, "--case", case]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  env=dict(os.environ))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if lines else {
                "case": case, "mesh": mesh_spec(case, args.devices) or "single device",
                "tokens": 0, "batch": 0,
                "status": f"crashed rc={proc.returncode}",
                "error": (proc.stderr.strip().splitlines() or [""])[-1][:300]}
        except subprocess.TimeoutExpired:
            row = {"case": case, "mesh": mesh_spec(case, args.devices) or "single device",
                   "tokens": 0,
                   "batch": 0, "status": "timeout", "error": f"> {args.timeout} s"}
        rows.append(row)
        print(_fmt(row), flush=True)
    _efficiency(rows)
    print(f"\n{'case':<18} {'mesh':<16} vs 1 device")
    for r in rows:
        if "vs_1dev" in r:
            print(f"{r['case']:<18} {r['mesh']:<16} {r['vs_1dev']:.2f}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.json)
    return 0 if all(r.get("status") in ("ok", "OOM") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
