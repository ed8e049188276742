"""`dllm-jax train --out DIR`: the command line of masked-diffusion training (flags -> a
`TrainConfig` and a model config -> `loop.train`, then optionally `evaluation.evaluate`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import jax
import numpy as np

from dllm_jax import progress
from dllm_jax.cli_options import check_number, flag_message
from dllm_jax.models import param_shapes
from dllm_jax.train.checkpoints import check_outputs, check_resumable
from dllm_jax.train.config import MODEL_SIZES, TrainConfig, TrainError

# TrainConfig field -> its flag (messages of TrainConfig name the flags).
TRAIN_FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr",
               "warmup": "--warmup", "weight_decay": "--weight-decay",
               "grad_clip": "--grad-clip", "seed": "--seed", "eps": "--eps",
               "ckpt_every": "--ckpt-every", "log_every": "--log-every",
               "pool_size": "--pool-size", "prompt_length": "--prompt-length",
               "answer_length": "--answer-length", "block_diffusion": "--block-diffusion",
               "compute_dtype": "--compute-dtype", "task_set": "--task-set",
               "attn_impl": "--attn-impl"}
from dllm_jax.train.evaluation import evaluate, format_results
from dllm_jax.train.loop import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--out", required=True, help="model folder written at the end")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default: OUT-ckpt)")
    p.add_argument("--resume", action="store_true", help="continue the run in --ckpt-dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model at --out")
    p.add_argument("--model-size", choices=tuple(MODEL_SIZES), default="bundled",
                   help="bundled: hidden 256 x 6 layers, SwiGLU 640 (~4.6M params); bench: "
                        "SwiGLU 768 (~5M, the v2 benchmark models); tiny: hidden 64 x 2")
    p.add_argument("--task-set", choices=("v1", "v2"), default="v1",
                   help="v1: the 14 short-answer tasks; v2: long answers (64-256 tokens)")
    p.add_argument("--steps", type=int, default=d.steps, metavar="N",
                   help=f"optimiser steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                   help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, metavar="X",
                   help=f"peak learning rate of the warm-up + cosine schedule (default {d.lr:g})")
    p.add_argument("--warmup", type=int, default=None, metavar="N",
                   help="warm-up steps, < --steps (default: steps/20)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, metavar="X",
                   help=f"AdamW weight decay, >= 0 (default {d.weight_decay:g})")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, metavar="X",
                   help=f"global-norm gradient clip, >= 0 (0: none; default {d.grad_clip:g})")
    p.add_argument("--seed", type=int, default=d.seed, metavar="N",
                   help=f"seed of init, data and noise (default {d.seed})")
    p.add_argument("--eps", type=float, default=d.eps, metavar="X",
                   help=f"smallest mask rate t, in (0, 1) (default {d.eps:g})")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, metavar="N",
                   help=f"checkpoint every N steps (default {d.ckpt_every})")
    p.add_argument("--log-every", type=int, default=d.log_every, metavar="N",
                   help=f"progress line every N steps (default {d.log_every})")
    p.add_argument("--pool-size", type=int, default=d.pool_size,
                   help="distinct train instances per task family")
    p.add_argument("--tasks", default="", help="comma-separated task families (default: all)")
    p.add_argument("--prompt-length", type=int, default=None,
                   help=f"prompt tokens (default: {d.prompt_length} for v1; for v2 the longest "
                        f"prompt of the chosen tasks)")
    p.add_argument("--answer-length", type=int, default=None,
                   help=f"answer tokens incl. EOS (default: {d.answer_length} for v1; for v2 "
                        f"the longest answer of the chosen tasks + 1, rounded up to 32s)")
    p.add_argument("--block-diffusion", action="store_true",
                   help="SDAR-style block diffusion (block-causal attention, per-block masks)")
    p.add_argument("--block-size", type=int, default=8, help="block size of --block-diffusion")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=d.compute_dtype,
                   help=f"dtype of the forward / backward matmuls (params and optimiser state "
                        f"stay float32; default {d.compute_dtype})")
    p.add_argument("--attn-impl", choices=("xla", "cudnn", "auto"), default=d.attn_impl,
                   help="attention of the training forward / backward: xla (portable, "
                        "materialises the [B, H, T, T] scores in query chunks), cudnn (the "
                        "fused flash kernel: GPU, bf16), auto (cudnn where it applies); "
                        f"default {d.attn_impl}")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the params in the model folder written at the end "
                        "(default float32)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop with a checkpoint after this many seconds (resume later)")
    p.add_argument("--eval", type=int, default=0, metavar="N",
                   help="after training, score N held-out instances per task (one token per step)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no progress lines (errors still print)")


def _lengths(args: argparse.Namespace, tasks: tuple[str, ...]) -> tuple[int, int]:
    """(prompt_length, answer_length): the flags, else the task set's defaults."""
    d = TrainConfig()
    if args.task_set == "v1":
        return (args.prompt_length or d.prompt_length), (args.answer_length or d.answer_length)
    from dllm_jax.tasks import TASKS_V2

    unknown = [t for t in tasks if t not in TASKS_V2]
    if unknown:
        raise TrainError(f"unknown v2 tasks {unknown}; valid: {', '.join(TASKS_V2)}.")
    return v2_lengths(tasks, args.prompt_length, args.answer_length)


def v2_lengths(tasks: tuple[str, ...] = (), prompt_length: int | None = None,
               answer_length: int | None = None) -> tuple[int, int]:
    """Default (prompt_length, answer_length) of v2 training: the longest prompt of the tasks,
    and the longest answer + EOS rounded up to a multiple of 32 (so that blocks of 4, 8, 16 or
    32 divide it)."""
    from dllm_jax.tasks import TASKS_V2

    chosen = [TASKS_V2[t] for t in (tasks or tuple(TASKS_V2))]
    prompt = prompt_length or max(t.max_prompt_tokens() for t in chosen)
    answer = answer_length or -(-(1 + max(t.max_answer_tokens() for t in chosen)) // 32) * 32
    return prompt, answer


def _check_flags(args: argparse.Namespace) -> None:
    """Range checks of the numeric flags, each error naming its flag."""
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--ckpt-every", args.ckpt_every), ("--log-every", args.log_every),
                        ("--pool-size", args.pool_size), ("--prompt-length", args.prompt_length),
                        ("--answer-length", args.answer_length),
                        ("--block-size", args.block_size)):
        check_number(value, flag, minimum=1)
    check_number(args.lr, "--lr", minimum=0, low_open=True, example=3e-3)
    check_number(args.warmup, "--warmup", minimum=0, example=max(0, args.steps // 20))
    check_number(args.weight_decay, "--weight-decay", minimum=0, example=0.01)
    check_number(args.grad_clip, "--grad-clip", minimum=0, example=1.0)
    check_number(args.seed, "--seed", minimum=0)
    check_number(args.time_limit, "--time-limit", minimum=0, low_open=True, example=600)
    check_number(args.eval, "--eval", minimum=0, example=32)
    if args.attn_impl == "cudnn":
        import jax

        if jax.default_backend() != "gpu" or args.compute_dtype != "bfloat16":
            raise TrainError("--attn-impl cudnn is cuDNN's flash kernel: it needs a GPU and "
                             "--compute-dtype bfloat16; use --attn-impl xla (or auto) here.")


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    tasks = tuple(t for t in args.tasks.replace(" ", "").split(",") if t)
    prompt_length, answer_length = _lengths(args, tasks)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    try:
        cfg = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=warmup,
            weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
            eps=args.eps, ckpt_every=args.ckpt_every, log_every=args.log_every,
            pool_size=args.pool_size, tasks=tasks, prompt_length=prompt_length,
            answer_length=answer_length, block_diffusion=args.block_diffusion,
            compute_dtype=args.compute_dtype, task_set=args.task_set, attn_impl=args.attn_impl)
    except TrainError as e:
        raise TrainError(flag_message(str(e), TRAIN_FLAGS)) from None
    try:
        cfg.task_names  # noqa: B018 - unknown --tasks fail here, before any work
    except TrainError as e:
        raise TrainError(f"--tasks: {e}") from None
    ckpt_dir = args.ckpt_dir or f"{args.out.rstrip('/')}-ckpt"
    if args.resume:
        check_resumable(Path(os.path.expanduser(ckpt_dir)).absolute())
    check_outputs(args.out, ckpt_dir, args.overwrite)
    make = MODEL_SIZES[args.model_size]
    model_cfg = make(prompt_length=cfg.prompt_length, answer_length=cfg.answer_length,
                     block_size=args.block_size if args.block_diffusion else 0)
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(param_shapes(model_cfg)))
    say = progress.summary
    say(f"model: {model_cfg.arch} {n_params / 1e6:.2f}M params; {cfg.steps} steps of "
        f"{cfg.batch_size} x {cfg.seq_length} tokens; tasks: {', '.join(cfg.task_names)}",
        quiet=args.quiet)
    try:
        res = train(cfg, model_cfg, args.out, ckpt_dir=args.ckpt_dir, resume=args.resume,
                    time_limit=args.time_limit, save_dtype=args.save_dtype,
                    overwrite=args.overwrite, quiet=args.quiet)
    except TrainError as e:
        raise TrainError(flag_message(str(e), {"block_diffusion": "--block-diffusion"})) from None
    if res.out_dir is None:
        say(f"stopped at step {res.step}/{cfg.steps}; continue with the same command and "
            f"--resume.", quiet=args.quiet)
        return 0
    say(f"saved {res.out_dir} ({res.step} steps, {res.seconds:.0f} s)", quiet=args.quiet)
    if args.eval > 0:
        results = evaluate(res.params, model_cfg, tasks=cfg.task_names, n=args.eval,
                           prompt_length=cfg.prompt_length, gen_length=cfg.answer_length,
                           task_set=cfg.task_set)
        print(format_results(results))
    return 0



__all__ = ["add_arguments", "run", "v2_lengths"]
