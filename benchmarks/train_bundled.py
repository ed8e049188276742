"""Train a task model (the bundled one, or a v2 benchmark model) and score it on held-out
task instances.

    PYTHONPATH=. python benchmarks/train_bundled.py --out OUT_DIR [--budget 300] [--tiny]
        [--pool-file POOL.npz]     # a pool made beforehand with --save-pool POOL.npz (on a CPU)
        [--task-set v2 --model-size bench [--block-size 4] --save-dtype bfloat16]

1. builds the training pool (all task families, `TRAIN_MIX` difficulties, deterministic);
2. times one compiled chunk of `--log-every` steps and sets `steps` so that training fits in
   `--budget` seconds (warm-up and schedule are then fixed; the run is reproducible with
   `dllm-jax train --steps N ...` and the recorded `train_config.json`);
3. trains (`dllm_jax.train.train`), writes the model folder OUT_DIR/model (float32);
4. reloads it with `load_model` and scores `--eval-n` held-out (split='test') instances per
   task, decoding one token per step (gen_length = steps = the answer length, low_confidence;
   one block, or blocks of the block size for a block-diffusion model);
5. writes OUT_DIR/results.json, OUT_DIR/results.md and OUT_DIR/model.tar.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pool-size", type=int, default=60000)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=100,
                    help="held-out instances per task scored after training (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compute-dtype", default="bfloat16")
    ap.add_argument("--attn-impl", default="xla", choices=("xla", "cudnn", "auto"),
                    help="attention of the training step (cudnn: GPU, bf16)")
    ap.add_argument("--max-steps", type=int, default=1_000_000)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, small pool")
    ap.add_argument("--task-set", choices=("v1", "v2"), default="v1")
    ap.add_argument("--model-size", choices=("bundled", "bench", "tiny"), default="bundled")
    ap.add_argument("--block-size", type=int, default=0,
                    help="> 0: SDAR-style block diffusion (block-causal) with this block size")
    ap.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--pool-file", default=None, help="a pool written by dllm_jax.train.save_pool")
    ap.add_argument("--save-pool", default=None, metavar="PATH",
                    help="only build the pool (for --pool-size / --seed) and write it to PATH")
    ap.add_argument("--ckpt-dir", default="/tmp/bundled-ckpt",
                    help="checkpoints; a run found there is resumed (its recorded configs)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="stop training after this many seconds and save the model as it is")
    args = ap.parse_args()

    import jax
    import numpy as np

    from dllm_jax.checkpoint import load_model
    from dllm_jax.config import ModelConfig
    from dllm_jax.models import param_shapes
    from dllm_jax.train import (TRAIN_CONFIG_FILE, StepSpec, TrainConfig, build_pool, evaluate,
                                format_results, init_state, load_pool, save_pool,
                                save_trained_model, train, train_chunk)
    from dllm_jax.train.cli import v2_lengths
    from dllm_jax.train.config import MODEL_SIZES

    print(f"jax {jax.__version__} on {jax.devices()}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    lengths = dict(zip(("prompt_length", "answer_length"), v2_lengths())) if (
        args.task_set == "v2") else {}
    cfg = TrainConfig(steps=10 * args.log_every, batch_size=args.batch_size, lr=args.lr,
                      warmup=args.log_every, seed=args.seed, pool_size=args.pool_size,
                      log_every=args.log_every, ckpt_every=10 * args.log_every,
                      compute_dtype=args.compute_dtype, task_set=args.task_set,
                      attn_impl=args.attn_impl,
                      block_diffusion=args.block_size > 0, **lengths)
    make = MODEL_SIZES["tiny" if args.tiny else args.model_size]
    model_cfg = make(prompt_length=cfg.prompt_length, answer_length=cfg.answer_length,
                     block_size=args.block_size)
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(param_shapes(model_cfg)))
    print(f"model {n_params} params: {model_cfg}", flush=True)

    if args.save_pool:  # build the pool here (CPU) so that the device does not spend time on it
        save_pool(args.save_pool, build_pool(cfg), cfg)
        print(f"wrote {args.save_pool}", flush=True)
        return 0

    record_path = os.path.join(args.ckpt_dir, TRAIN_CONFIG_FILE)
    resume = os.path.isfile(record_path)
    if resume:  # continue the run found in --ckpt-dir with its own configs
        with open(record_path) as f:
            record = json.load(f)
        cfg, model_cfg = TrainConfig.from_dict(record["train"]), ModelConfig.from_dict(record["model"])
        print(f"resuming the run in {args.ckpt_dir}: {cfg}", flush=True)

    t = time.perf_counter()
    pool = load_pool(args.pool_file, cfg) if args.pool_file else build_pool(cfg)
    print(f"pool {np.asarray(pool[0].counts).tolist()} ready in {time.perf_counter() - t:.1f} s",
          flush=True)

    compile_s = step_s = float("nan")
    if not resume:
        # calibrate: one compile, then time a chunk (the lr is an input, so the run reuses it)
        spec = StepSpec.of(cfg, model_cfg)
        state = init_state(cfg, model_cfg)
        lrs = np.full((args.log_every,), 1e-4, np.float32)
        t = time.perf_counter()
        state, m = train_chunk(state, pool[0], lrs, spec)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        state, m = train_chunk(state, pool[0], lrs, spec)
        jax.block_until_ready(m)
        step_s = (time.perf_counter() - t) / args.log_every
        del state
        steps = int(args.budget / step_s) // args.log_every * args.log_every
        steps = max(2 * args.log_every, min(steps, args.max_steps))
        cfg = cfg.replace(steps=steps, warmup=max(args.log_every, steps // 20),
                          ckpt_every=max(args.log_every,
                                         steps // 4 // args.log_every * args.log_every))
        print(f"compile+chunk {compile_s:.1f} s, {1e3 * step_s:.2f} ms/step -> {steps} steps; "
              f"{cfg}", flush=True)

    model_dir = os.path.join(args.out, "model")
    res = train(cfg, model_cfg, model_dir, ckpt_dir=args.ckpt_dir, resume=resume, pool=pool,
                save_dtype=args.save_dtype, overwrite=True, stream=sys.stdout,
                time_limit=args.time_limit)
    if res.out_dir is None:  # stopped by --time-limit: keep what we have
        print(f"stopped early at step {res.step}/{cfg.steps}", flush=True)
        save_trained_model(model_dir, cfg, model_cfg, res.params, overwrite=True,
                           save_dtype=args.save_dtype,
                           extra={"steps_done": res.step, "stopped_early": True})
    from dllm_jax.train.step import _train_chunk
    print(f"compiled chunk variants: {_train_chunk._cache_size()}", flush=True)
    print(f"trained {res.step} steps in {res.seconds:.1f} s; loss first/last 100: "
          f"{res.losses[:100].mean():.4f} / {res.losses[-100:].mean():.4f}", flush=True)

    with tarfile.open(os.path.join(args.out, "model.tar"), "w") as tar:
        tar.add(model_dir, arcname="model")
    print("model.tar written", flush=True)
    results: dict = {}
    t = time.perf_counter()
    if args.eval_n > 0:  # the saved folder, read back before it goes
        cfg2, params = load_model(model_dir, dtype="float32")
    import shutil
    shutil.rmtree(model_dir)  # only the tar travels back (the folder is too deep for $OUT)
    if args.eval_n > 0:
        results = evaluate(params, cfg2, n=args.eval_n, prompt_length=cfg.prompt_length,
                           gen_length=cfg.answer_length, task_set=cfg.task_set,
                           block_length=args.block_size or None, batch_size=args.eval_n)
    eval_s = time.perf_counter() - t
    table = format_results(results) if results else "(no evaluation: --eval-n 0)"
    print(table, flush=True)
    summary = {"params": n_params, "steps": res.step, "resumed_from": res.first_step, "train_seconds": res.seconds,
               "ms_per_step": 1e3 * step_s, "compile_seconds": compile_s, "eval_seconds": eval_s,
               "loss_first100": float(res.losses[:100].mean()),
               "loss_last100": float(res.losses[-100:].mean()),
               "loss_curve": [float(x) for x in res.losses[:: max(1, len(res.losses) // 200)]],
               "train_config": cfg.to_dict(), "device": str(jax.devices()[0]),
               "jax": jax.__version__, "results": results}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if results:
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(table + "\n")
    print(f"done; eval {eval_s:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
