"""`dllm-jax train-controller --model DIR`: fit the TSPD controller of a model.

Records decodes of training-split task prompts (`dllm_jax.tasks`), fits TSPD on them
(`controller_fit.train_controller`) and writes MODEL/tspd.json (or --out FILE); prints a JSON
summary of the fit's metrics.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import jax
import numpy as np

from controllers.tspd import TSPD_FILE, tspd_to_json
from dllm_jax import progress, session
from dllm_jax.cli_options import check_number
from dllm_jax.config import ConfigError, GenerateConfig
from dllm_jax.features import CEFilter
from dllm_jax.scoring import DEFAULT_ANSWER_LENGTH
from dllm_jax.train.controller_fit import train_controller


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, got {text!r}; e.g. "
                          f"{flag} 0.9,0.7.") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise ConfigError(f"{flag} values must lie in (0, 1], got {text!r}; e.g. {flag} "
                          f"0.9,0.7.")
    return vals


def _check_flags(args: argparse.Namespace) -> None:
    for flag, value in (("--n", args.n), ("--steps", args.steps),
                        ("--batch-size", args.batch_size), ("--gen-length", args.gen_length),
                        ("--block-length", args.block_length)):
        check_number(value, flag, minimum=1)
    for flag, value in (("--hidden", args.hidden), ("--horizon", args.horizon),
                        ("--seed", args.seed), ("--l2", args.l2)):
        check_number(value, flag, minimum=0)
    check_number(args.lr, "--lr", minimum=0, low_open=True, example=0.02)
    check_number(args.neg_weight, "--neg-weight", minimum=0, low_open=True, example=1.0)
    check_number(args.tau, "--tau", minimum=0, maximum=1, low_open=True, example=0.5)
    for flag, value in (("--q", args.q), ("--r", args.r)):
        check_number(value, flag, minimum=0, low_open=True, example=0.1)


def _out_file(args: argparse.Namespace, model_dir: Path) -> Path:
    """The file to write (a folder given as --out gets tspd.json), checked before the work."""
    from dllm_jax.files import check_output_path

    out = Path(os.path.expanduser(args.out)) if args.out else model_dir / TSPD_FILE
    if out.is_dir():
        out = out / TSPD_FILE
    check_output_path(out, "--out" if args.out else "--model")
    return out


def _all_finite(tree: object) -> bool:
    return all(np.isfinite(np.asarray(x, np.float64)).all() for x in jax.tree.leaves(tree))


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
    p.add_argument("--lr", type=float, default=0.02, help="Adam learning rate of the fit, > 0 "
                   "(default 0.02)")
    p.add_argument("--l2", type=float, default=1e-4, help="L2 penalty on the weights, >= 0 "
                   "(default 1e-4)")
    p.add_argument("--neg-weight", type=float, default=1.0,
                   help="loss weight of not-yet-converged rows (> 1: wrong commits cost more)")
    p.add_argument("--tau", type=float, default=0.5, help="default commit threshold on p")
    p.add_argument("--no-ce", action="store_true", help="leave the CE forecast features out")
    p.add_argument("--horizon", type=int, default=2, help="CE forecast horizon (steps)")
    p.add_argument("--q", type=float, default=CEFilter.q, help="CE process noise")
    p.add_argument("--r", type=float, default=CEFilter.r, help="CE observation noise")
    p.add_argument("--batch-size", type=int, default=64,
                   help="prompts per recorded decode (default 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no progress line")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the task instances, the decodes and the fit (default 0)")


def run(args: argparse.Namespace) -> int:
    from dllm_jax.tasks import TASKS

    # every check before the model is loaded and the (minutes long) fit starts
    model_dir = session.resolve_model_dir(args.model)
    names = list(TASKS) if args.tasks is None else [t.strip() for t in args.tasks.split(",")
                                                     if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ConfigError(f"--tasks: unknown tasks {unknown}; valid: {', '.join(TASKS)}.")
    _check_flags(args)
    thresholds = _floats(args.thresholds, "--thresholds")
    try:
        ce_filter = CEFilter(q=args.q, r=args.r)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not (model_dir / "tokenizer.json").is_file():
        raise ConfigError(
            f"--model {model_dir} has no tokenizer.json: train-controller encodes task prompts "
            f"with the model's tokenizer; copy tokenizer.json and tokenizer_config.json into "
            f"the folder (a model made by `dllm-jax train` has them).")
    out_file = _out_file(args, model_dir)
    train_config = session.read_train_config(model_dir)
    gen_length = args.gen_length or (int(train_config["train"]["answer_length"]) if train_config
                                     else DEFAULT_ANSWER_LENGTH)
    try:
        gen = GenerateConfig(gen_length=gen_length, block_length=args.block_length or gen_length,
                             steps=gen_length)
    except ConfigError as e:
        from dllm_jax.cli_options import flag_message

        raise ConfigError(flag_message(str(e))) from None
    s = session.load(model_dir, layout="stacked")    # the fit replays stacked-layout decodes
    prompts: list[str] = []
    for k, name in enumerate(names):
        prompts += [inst.prompt for inst in TASKS[name].generate(args.seed + k, args.n,
                                                                 split="train")]
    ids, valid = s.pad([s.encode(p) for p in prompts])           # [N, P] left-padded
    progress.summary(f"recording {len(prompts)} training prompts x {1 + len(thresholds)} "
                     f"decodes (gen_length {gen.gen_length}, block {gen.block_length})",
                     quiet=args.quiet)
    use_ce = not args.no_ce
    ctrl, metrics = train_controller(
        s.params, s.cfg, ids, valid, gen=gen, thresholds=thresholds, use_ce=use_ce,
        horizon=args.horizon, ce_filter=ce_filter, batch_size=args.batch_size,
        key=jax.random.key(args.seed), hidden=args.hidden, steps=args.steps, lr=args.lr,
        l2=args.l2, neg_weight=args.neg_weight, tau=args.tau, seed=args.seed, quiet=args.quiet)
    metrics.update(tasks=names, n_per_task=args.n, split="train", gen_length=gen.gen_length,
                   block_length=gen.block_length, thresholds=list(thresholds))
    if not _all_finite(ctrl.params.to_dict()) or not math.isfinite(float(metrics["loss_fit"])):
        raise ConfigError(f"the fit diverged (loss {metrics['loss_fit']}); nothing written to "
                          f"{out_file}: lower --lr or raise --l2.")
    from dllm_jax.files import dumps, write_json

    write_json(out_file, tspd_to_json(ctrl, metrics), flag="--out", indent=1)
    print(dumps({"out": str(out_file), **{k: metrics.get(k) for k in (
        "n_rows", "loss_init", "loss_fit", "loss_eval", "accuracy_eval", "tspd_at_tau",
        "threshold_0.9")}}))
    return 0


__all__ = ["add_arguments", "run"]
