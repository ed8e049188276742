"""Peak memory of `python -m checkpoints_convert` on a synthetic ~2 GB LLaDA checkpoint.

Writes a sharded safetensors checkpoint with LLaDA's tensor names (random bf16 weights, the
real 126464-token vocabulary, width and depth chosen to reach --size-gb of output params) into a
temporary folder, converts it in a child process, and reads the child's peak resident memory
from `os.wait4` (ru_maxrss). A second child that only imports the libraries and starts the JAX
CPU backend gives the baseline that every conversion pays regardless of model size.

    python benchmarks/convert_memory.py [--size-gb 2] [--shards 4] [--source-dtype bfloat16]

Target: peak RSS / output params size <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def llada_config(size_gb: float, itemsize: int = 2) -> dict:
    """A LLaDA config.json (d_model 2048, 16 heads, vocab 126464) with as many layers as fit."""
    d, f, v = 2048, 5632, 126464
    per_layer = 4 * d * d + 3 * d * f + 2 * d
    fixed = 2 * v * d + d
    layers = max(1, round((size_gb * 2**30 / itemsize - fixed) / per_layer))
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": d, "n_heads": 16,
        "n_kv_heads": 16, "n_layers": layers, "mlp_hidden_size": f, "vocab_size": v,
        "embedding_size": v, "max_sequence_length": 4096, "rope": True, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "block_type": "llama", "layer_norm_type": "rms",
        "activation_type": "silu", "include_bias": False, "include_qkv_bias": False,
        "weight_tying": False, "mask_token_id": 126336, "eos_token_id": 126081,
        "pad_token_id": 126081,
    }


def llada_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, f, v = cfg["d_model"], cfg["mlp_hidden_size"], cfg["vocab_size"]
    out = [("model.transformer.wte.weight", (v, d))]
    for i in range(cfg["n_layers"]):
        b = f"model.transformer.blocks.{i}."
        out += [(b + "attn_norm.weight", (d,)), (b + "q_proj.weight", (d, d)),
                (b + "k_proj.weight", (d, d)), (b + "v_proj.weight", (d, d)),
                (b + "attn_out.weight", (d, d)), (b + "ff_norm.weight", (d,)),
                (b + "ff_proj.weight", (f, d)), (b + "up_proj.weight", (f, d)),
                (b + "ff_out.weight", (d, f))]
    out += [("model.transformer.ln_f.weight", (d,)), ("model.transformer.ff_out.weight", (v, d))]
    return out


def write_checkpoint(folder: Path, cfg: dict, shards: int, dtype: np.dtype, seed: int = 0) -> int:
    """Write the sharded safetensors checkpoint one shard at a time; returns its size in bytes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = llada_tensors(cfg)
    sizes = [int(np.prod(s)) * dtype.itemsize for _, s in tensors]
    budget = sum(sizes) / shards
    groups, cur, acc = [], [], 0
    for (name, shape), size in zip(tensors, sizes):
        cur.append((name, shape))
        acc += size
        if acc >= budget and len(groups) < shards - 1:
            groups.append(cur)
            cur, acc = [], 0
    groups.append(cur)
    weight_map, total = {}, 0
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        part = {}
        for name, shape in group:
            x = np.empty(shape, dtype)
            flat = x.reshape(-1)
            for s in range(0, flat.size, 1 << 24):
                n = min(1 << 24, flat.size - s)
                flat[s:s + n] = (0.02 * rng.standard_normal(n, dtype=np.float32)).astype(dtype)
            part[name] = x
            weight_map[name] = fname
            total += x.nbytes
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        del part
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def _vm_hwm(pid: int) -> int:
    """High-water mark of the resident memory of the process's current image (bytes), or 0."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(cmd: list[str]) -> tuple[float, int, int]:
    """Run `cmd`; return (seconds, ru_maxrss bytes of that child from wait4, polled VmHWM bytes).

    ru_maxrss also counts the parent's pages at fork time (Linux keeps the pre-exec high-water
    mark), so this script keeps its own memory small and synthesises data in a separate child;
    VmHWM, polled from /proc every 20 ms, covers only the child's own image.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO)
    hwm = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        hwm = max(hwm, _vm_hwm(proc.pid))
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return seconds, usage.ru_maxrss * 1024, hwm  # Linux reports ru_maxrss in KiB


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def params_bytes(model: dict, itemsize: int = 2) -> int:
    """Bytes of the converted LLaDA params (layout of dllm_jax.models) from our config dict."""
    L, D, V, F = model["num_layers"], model["hidden_size"], model["vocab_size"], model["intermediate_size"]
    q, kv = model["num_heads"] * model["head_dim"], model["num_kv_heads"] * model["head_dim"]
    per_layer = 2 * D + D * q + 2 * D * kv + q * D + 3 * D * F
    head = 0 if model["tie_embeddings"] else D * V
    return itemsize * (V * D + L * per_layer + D + head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="output params size (GiB)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--source-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--workdir", default=None, help="where to put the temporary checkpoints")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--synthesise", metavar="DIR", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()

    src_dtype = np.dtype(ml_dtypes.bfloat16) if args.source_dtype == "bfloat16" else np.dtype(np.float32)
    if args.synthesise:
        write_checkpoint(Path(args.synthesise), llada_config(args.size_gb), args.shards, src_dtype)
        return

    work = Path(tempfile.mkdtemp(prefix="convert_memory_", dir=args.workdir))
    try:
        src, dst = work / "hf", work / "out"
        src.mkdir()
        synth_s, _, _ = run_child([sys.executable, __file__, "--synthesise", str(src),
                                   "--size-gb", str(args.size_gb), "--shards", str(args.shards),
                                   "--source-dtype", args.source_dtype])
        cfg = json.loads((src / "config.json").read_text())
        src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        print(f"synthesised {src_bytes / 2**30:.2f} GiB {args.source_dtype} LLaDA checkpoint "
              f"({cfg['n_layers']} layers, {args.shards} shards) in {synth_s:.0f} s", flush=True)

        _, base_rss, base_hwm = run_child(
            [sys.executable, "-c", "import jax, orbax.checkpoint, checkpoints_convert.convert, "
                                   "dllm_jax.checkpoint; jax.devices()"])
        conv_s, conv_rss, conv_hwm = run_child(
            [sys.executable, "-m", "checkpoints_convert", str(src), str(dst), "--dtype", "bfloat16"])
        out_bytes = params_bytes(json.loads((dst / "dllm_config.json").read_text())["model"])
        disk = du(dst / "params")
        gib = 2**30
        rows = [
            ("source checkpoint", f"{src_bytes / gib:.2f} GiB {args.source_dtype}, {args.shards} shards"),
            ("output params (bf16)", f"{out_bytes / gib:.2f} GiB ({disk / gib:.2f} GiB on disk, compressed)"),
            ("import baseline peak RSS", f"{base_rss / gib:.3f} GiB (VmHWM {base_hwm / gib:.3f} GiB)"),
            ("convert peak RSS", f"{conv_rss / gib:.3f} GiB (VmHWM {conv_hwm / gib:.3f} GiB) in {conv_s:.0f} s"),
            ("peak RSS / output", f"{conv_rss / out_bytes:.3f}"),
            ("(peak - baseline) / output", f"{(conv_rss - base_rss) / out_bytes:.3f}"),
        ]
        print()
        print("| measure | value |")
        print("|---|---|")
        for k, v in rows:
            print(f"| {k} | {v} |")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
