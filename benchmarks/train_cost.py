"""XLA's cost analysis of one compiled training step (FLOPs, bytes accessed, temporaries),
from abstract inputs: nothing is allocated or run, so it works on any machine.

    python benchmarks/train_cost.py [--model-size bench] [--batch 512] [--prompt 96]
        [--answer 192] [--block-size 0] [--attn-impl xla] [--compute-dtype bfloat16]

The figures are the compiling backend's (its fusion differs between CPU and GPU); comparing
two sequence lengths shows how much of a step scales with T^2 (attention).
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-size", default="bench", choices=("bundled", "bench", "tiny"))
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=96)
    ap.add_argument("--answer", type=int, default=192)
    ap.add_argument("--block-size", type=int, default=0, help="> 0: block diffusion (SDAR)")
    ap.add_argument("--attn-impl", default="xla", choices=("xla", "cudnn", "auto"))
    ap.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from dllm_jax.train import StepSpec, TrainConfig, init_state
    from dllm_jax.train.config import MODEL_SIZES
    from dllm_jax.train.data import DataPool
    from dllm_jax.train.step import train_chunk

    cfg = TrainConfig(steps=10, batch_size=args.batch, warmup=1, task_set="v2",
                      prompt_length=args.prompt, answer_length=args.answer,
                      block_diffusion=args.block_size > 0, compute_dtype=args.compute_dtype,
                      attn_impl=args.attn_impl)
    model_cfg = MODEL_SIZES[args.model_size](prompt_length=args.prompt,
                                             answer_length=args.answer,
                                             block_size=args.block_size)
    state = jax.eval_shape(lambda: init_state(cfg, model_cfg))
    pool = DataPool(prompts=jax.ShapeDtypeStruct((11, 1000, args.prompt), jnp.int32),
                    answers=jax.ShapeDtypeStruct((11, 1000, args.answer), jnp.int32),
                    counts=jax.ShapeDtypeStruct((11,), jnp.int32))
    lrs = jax.ShapeDtypeStruct((1,), jnp.float32)
    compiled = jax.jit(train_chunk, static_argnames=("spec",)).lower(
        state, pool, lrs, spec=StepSpec.of(cfg, model_cfg)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    tokens = args.batch * (args.prompt + args.answer) * (2 if args.block_size else 1)
    print(f"# {args.model_size} model (hidden {model_cfg.hidden_size}, {model_cfg.num_layers} "
          f"layers), batch {args.batch}, {args.prompt} + {args.answer} tokens"
          f"{f', block diffusion {args.block_size}' if args.block_size else ''}, attention "
          f"{args.attn_impl}, {args.compute_dtype}, backend {jax.default_backend()}")
    print("| tokens per step (forward) | TFLOP | GB accessed | temporaries GiB |")
    print("|---|---|---|---|")
    print(f"| {tokens} | {cost.get('flops', 0) / 1e12:.2f} | "
          f"{cost.get('bytes accessed', 0) / 1e9:.0f} | {mem.temp_size_in_bytes / 2**30:.1f} |")


if __name__ == "__main__":
    main()
