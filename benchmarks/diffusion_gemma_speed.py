"""DiffusionGemma (text) decoding speed: ours against transformers' `generate` on the same
random weights, side by side in one process (issue 20's GPU row).

    python benchmarks/diffusion_gemma_speed.py --out /tmp/dg            # GPU: transformers'
        [--layers 12] [--experts 32 --top-k 4 --moe-intermediate 1024]  # default text shapes
        [--batch 8] [--prompt 128] [--new-tokens 256] [--steps 48] [--repeats 2]
    python benchmarks/diffusion_gemma_speed.py --tiny --out /tmp/dg    # CPU smoke test

1. builds `DiffusionGemmaForBlockDiffusion` with transformers' default text config (vocab
   262,144, hidden 2304, 30 layers, sliding / full 5:1, head dim 256) with MoE layers of
   `--experts` (transformers leaves them unset; the real checkpoints' counts are not known
   here), `--layers` to shrink it; random weights in `--dtype` on the device, saved with
   `save_pretrained`;
2. converts it with `python -m checkpoints_convert` and loads it with `session.load`;
3. decodes the same prompts with transformers' `generate` (its EntropyBoundSampler) and with
   ours (`diffusion_gemma_sampler.generate`, one compiled program), the same sampler settings;
   each timed after a warm-up call, median of `--repeats`;
4. prints answer tokens/s, tokens per forward (non-pad answer tokens / forwards, as
   transformers reports it) and forwards per row for both, and the ratio.

The two draw different random canvases (each its own PRNG), so their forwards differ: the
speed figure is tokens/s, with tokens per forward beside it. Random weights give
near-uniform predictions, so the adaptive stop rarely fires and most canvases run
`--steps` forwards; the figure is the loop's cost, not a quality figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=5,
            global_head_dim=16, num_global_key_value_heads=1, max_position_embeddings=256,
            eos_token_id=1, pad_token_id=0)
VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, head_dim=8, intermediate_size=16, patch_size=4,
              position_embedding_size=64)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="work folder (checkpoints are written here)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: a tiny config")
    ap.add_argument("--layers", type=int, default=None, help="num_hidden_layers (5 sliding : 1 full)")
    ap.add_argument("--experts", type=int, default=32,
                    help="MoE experts per layer (transformers' config leaves them unset; "
                         "default 32)")
    ap.add_argument("--top-k", type=int, default=4, help="experts per token (default 4)")
    ap.add_argument("--moe-intermediate", type=int, default=1024,
                    help="MoE expert width (default 1024)")
    ap.add_argument("--canvas", type=int, default=None, help="canvas length (default 256)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=48, help="max denoising steps per canvas")
    ap.add_argument("--entropy-bound", type=float, default=0.1)
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                    help="weights and activations (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.tiny:
        args.canvas = args.canvas or 8
        args.experts, args.top_k, args.moe_intermediate = 4, 2, 12
        args.batch, args.prompt, args.new_tokens, args.steps = 2, 6, 16, 4
    for flag, v in (("--batch", args.batch), ("--prompt", args.prompt),
                    ("--new-tokens", args.new_tokens), ("--steps", args.steps),
                    ("--repeats", args.repeats)):
        if v < 1:
            raise SystemExit(f"{flag} must be >= 1, got {v}.")
    return args


def text_config(args: argparse.Namespace) -> dict:
    text = dict(TINY) if args.tiny else {}
    n = args.layers or (TINY["num_hidden_layers"] if args.tiny else None)
    if n is not None:
        text["num_hidden_layers"] = n
        text["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                               for i in range(n)]
    text.update(num_experts=args.experts, top_k_experts=args.top_k,
                moe_intermediate_size=args.moe_intermediate)
    return text


def main() -> None:
    args = parse_args()
    import torch
    from transformers import (DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion,
                              DiffusionGemmaGenerationConfig, EntropyBoundSamplerConfig)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dllm_jax import session
    from dllm_jax.diffusion_gemma_sampler import CanvasConfig, generate

    gpu = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = {} if args.canvas is None else {"canvas_length": args.canvas}
    cfg = DiffusionGemmaConfig(text_config=text_config(args), vision_config=dict(VISION), **kw)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    # Built on its device in its dtype (a 12-layer model built on the CPU in float32 and then
    # cast spent most of a 2-minute budget in the weight init alone).
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device("cuda" if gpu else "cpu"):
            model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    hf_dir, ours_dir = out / "hf", out / "ours"
    model.save_pretrained(hf_dir)
    made = time.perf_counter() - t0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "checkpoints_convert", str(hf_dir), str(ours_dir),
                    "--dtype", dtype, "--overwrite", "--quiet"], env=env, check=True)
    converted = time.perf_counter() - t0
    s = session.load(ours_dir)
    t = s.cfg
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# DiffusionGemma text, {t.num_layers} layers, hidden {t.hidden_size}, vocab "
          f"{t.vocab_size}, canvas {t.canvas_length}, "
          f"MoE {args.experts} experts top-{args.top_k} x {args.moe_intermediate}, "
          f"{n_params / 1e9:.2f}B params (with the vision tower), {dtype}; jax "
          f"{jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__}; "
          f"built + saved {made:.0f} s, converted {converted:.0f} s", flush=True)

    rng = np.random.default_rng(0)
    ids = rng.integers(3, t.vocab_size, size=(args.batch, args.prompt)).astype(np.int64)
    valid = np.ones(ids.shape, bool)
    eos, pad = int(cfg.text_config.eos_token_id), int(cfg.text_config.pad_token_id)
    canvas = CanvasConfig(max_new_tokens=args.new_tokens, max_denoising_steps=args.steps,
                          entropy_bound=args.entropy_bound)
    hf_gen = DiffusionGemmaGenerationConfig(
        max_new_tokens=args.new_tokens, max_denoising_steps=args.steps,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=args.entropy_bound),
        t_min=canvas.t_min, t_max=canvas.t_max, stability_threshold=canvas.stability_threshold,
        confidence_threshold=canvas.confidence_threshold, eos_token_id=eos, pad_token_id=pad)
    dev = "cuda" if gpu else "cpu"
    tid, tmask = torch.as_tensor(ids, device=dev), torch.as_tensor(valid, device=dev)

    def run_hf():
        with torch.no_grad():
            r = model.generate(tid, attention_mask=tmask, generation_config=hf_gen)
        if gpu:
            torch.cuda.synchronize()
        return r

    jids, jvalid = jnp.asarray(ids, jnp.int32), jnp.asarray(valid)

    def run_ours():
        r = generate(s.params, t, jids, jvalid, canvas, key=jax.random.key(0))
        jax.block_until_ready(r.tokens)
        return r

    rows = {}
    for name, fn in (("transformers generate", run_hf), ("dllm-jax", run_ours)):
        t0 = time.perf_counter()
        res = fn()                                       # warm-up (ours: the compile)
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        if name == "dllm-jax":
            toks = np.asarray(res.tokens)[:, :args.new_tokens]
            nfe = np.asarray(res.nfe).astype(float)
        else:
            toks = res.sequences[:, args.prompt:].cpu().numpy()
            tpf_hf = res.tokens_per_forward.float().cpu().numpy()
            nfe = (toks != pad).sum(-1) / np.maximum(tpf_hf, 1e-9)
        real = (toks != pad).sum(-1)
        rows[name] = dict(seconds=sec, first_call_s=first, tok_s=real.sum() / sec,
                          tpf=float(real.sum() / max(nfe.sum(), 1e-9)),
                          nfe=float(nfe.mean()), tokens=int(real.sum()))
    (out / "diffusion_gemma_speed.json").write_text(json.dumps(rows, indent=1))
    base = rows["transformers generate"]["tok_s"]
    print(f"batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"<= {args.steps} steps per canvas, entropy bound {args.entropy_bound}; median of "
          f"{args.repeats} after a warm-up")
    print("| decoder | answer tok/s (non-pad) | tokens / forward | forwards per row | first call s | vs transformers |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['tok_s']:.1f} | {r['tpf']:.2f} | {r['nfe']:.1f} | "
              f"{r['first_call_s']:.1f} | {r['tok_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
