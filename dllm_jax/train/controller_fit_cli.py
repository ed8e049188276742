"""`dllm-jax train-controller --model DIR`: fit the TSPD controller of a model.

Records decodes of training-split task prompts (`dllm_jax.tasks`), fits TSPD on them
(`controller_fit.train_controller`) and writes MODEL/tspd.json (or --out FILE); prints a JSON
summary of the fit's metrics.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from controllers.tspd import TSPD_FILE, save_tspd
from dllm_jax import session
from dllm_jax.config import ConfigError, GenerateConfig
from dllm_jax.features import CEFilter
from dllm_jax.scoring import DEFAULT_ANSWER_LENGTH
from dllm_jax.train.controller_fit import train_controller


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, got {text!r}.") from None
    if any(not 0 < v <= 1 for v in vals):
        raise ConfigError(f"{flag} values must lie in (0, 1], got {text!r}.")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder (default: the bundled model)")
    p.add_argument("--out", default=None, help="output file (default: MODEL/tspd.json)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument("--n", type=int, default=64, help="training-split instances per task")
    p.add_argument("--steps", type=int, default=400, help="optimiser steps of the fit")
    p.add_argument("--gen-length", type=int, default=None,
                   help="answer length (default: the model's train_config.json, else 32)")
    p.add_argument("--block-length", type=int, default=None, help="default: gen-length")
    p.add_argument("--thresholds", default="0.9,0.7",
                   help="Fast-dLLM thresholds whose decodes are recorded (besides the "
                        "one-token-per-step reference)")
    p.add_argument("--hidden", type=int, default=16, help="MLP hidden units (0: logistic)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--l2", type=float, default=1e-4)
    p.add_argument("--neg-weight", type=float, default=1.0,
                   help="loss weight of not-yet-converged rows (> 1: wrong commits cost more)")
    p.add_argument("--tau", type=float, default=0.5, help="default commit threshold on p")
    p.add_argument("--no-ce", action="store_true", help="leave the CE forecast features out")
    p.add_argument("--horizon", type=int, default=2, help="CE forecast horizon (steps)")
    p.add_argument("--q", type=float, default=CEFilter.q, help="CE process noise")
    p.add_argument("--r", type=float, default=CEFilter.r, help="CE observation noise")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from dllm_jax.tasks import TASKS

    model_dir = session.resolve_model_dir(args.model)   # fail fast, before any work
    names = list(TASKS) if args.tasks is None else [t.strip() for t in args.tasks.split(",")
                                                     if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ConfigError(f"unknown tasks {unknown}; valid: {', '.join(TASKS)}.")
    if args.n <= 0 or args.steps <= 0 or args.batch_size <= 0 or args.horizon < 0:
        raise ConfigError("--n, --steps and --batch-size must be positive and --horizon >= 0.")
    thresholds = _floats(args.thresholds, "--thresholds")
    try:
        ce_filter = CEFilter(q=args.q, r=args.r)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    s = session.load(model_dir, layout="stacked")    # the fit replays stacked-layout decodes
    s.require_tokenizer()
    gen_length = args.gen_length or s.answer_length or DEFAULT_ANSWER_LENGTH
    gen = GenerateConfig(gen_length=gen_length, block_length=args.block_length or gen_length,
                         steps=gen_length)
    prompts: list[str] = []
    for k, name in enumerate(names):
        prompts += [inst.prompt for inst in TASKS[name].generate(args.seed + k, args.n,
                                                                 split="train")]
    ids, valid = s.pad([s.encode(p) for p in prompts])           # [N, P] left-padded
    print(f"recording {len(prompts)} training prompts x {1 + len(thresholds)} decodes "
          f"(gen_length {gen.gen_length}, block {gen.block_length})", file=sys.stderr, flush=True)
    use_ce = not args.no_ce
    ctrl, metrics = train_controller(
        s.params, s.cfg, ids, valid, gen=gen, thresholds=thresholds, use_ce=use_ce,
        horizon=args.horizon, ce_filter=ce_filter, batch_size=args.batch_size,
        key=jax.random.key(args.seed), hidden=args.hidden, steps=args.steps, lr=args.lr,
        l2=args.l2, neg_weight=args.neg_weight, tau=args.tau, seed=args.seed)
    metrics.update(tasks=names, n_per_task=args.n, split="train", gen_length=gen.gen_length,
                   block_length=gen.block_length, thresholds=list(thresholds))
    out = save_tspd(args.out or s.file(TSPD_FILE), ctrl, metrics)
    print(json.dumps({"out": out, **{k: metrics[k] for k in (
        "n_rows", "loss_init", "loss_fit", "loss_eval", "accuracy_eval", "tspd_at_tau",
        "threshold_0.9")}}))
    return 0


__all__ = ["add_arguments", "run"]
