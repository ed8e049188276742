"""`dllm-jax train-controller --model DIR [--fit tspd|ce]`: fit a model's controller.

Records decodes of training-split task prompts (`dllm_jax.tasks`), then
- `--fit tspd` (default): fits TSPD on them (`controller_fit.train_controller`) and writes
  MODEL/tspd.json;
- `--fit ce`: fits the CE filter on the one-token-per-step reference's trajectories and
  chooses the look-ahead (z, horizon) on a validation split (`ce_fit_run`), writing
  MODEL/ce.json (read by the `ce_fitted` controller);
(or --out FILE) and prints a JSON summary of the fit's metrics. A flag of the other fit is
refused, naming it.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import jax
import numpy as np

from controllers.ce_fitted import CE_FILE
from controllers.tspd import TSPD_FILE, tspd_to_json
from dllm_jax import progress, session
from dllm_jax.cli_options import check_number
from dllm_jax.config import ConfigError, GenerateConfig
from dllm_jax.features import CEFilter
from dllm_jax.scoring import DEFAULT_ANSWER_LENGTH
from dllm_jax.train.controller_fit import FEATURE_GROUPS, train_controller

#: Flags (argparse dest -> flag) that only one fit takes; each is None unless given.
TSPD_ONLY = {"hidden": "--hidden", "l2": "--l2", "neg_weight": "--neg-weight", "tau": "--tau",
             "no_ce": "--no-ce", "horizon": "--horizon", "q": "--q", "r": "--r",
             "drop": "--drop"}
CE_ONLY = {"horizons": "--horizons", "zs": "--zs", "val_fraction": "--val-fraction",
           "choose_threshold": "--choose-threshold"}
#: Defaults of the flags whose default depends on --fit (tspd, ce).
PER_FIT = {"thresholds": ("0.9,0.7", None), "lr": (0.02, 0.05)}
TSPD_DEFAULTS = {"hidden": 16, "l2": 1e-4, "neg_weight": 1.0, "tau": 0.5, "no_ce": False,
                 "horizon": 2, "q": CEFilter.q, "r": CEFilter.r, "drop": ""}
CE_DEFAULTS = {"horizons": "1,2,3,4", "zs": "0.5,1,1.5,2,3", "val_fraction": 0.25,
               "choose_threshold": 0.9}


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


def _number_list(text: str, flag: str, kind: type, minimum: float, example: str) -> tuple:
    try:
        vals = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals or any(not (math.isfinite(v) and v >= minimum) for v in vals):
        what = "integers" if kind is int else "numbers"
        raise ConfigError(f"{flag} must be comma-separated {what} >= {minimum:g}, got "
                          f"{text!r}; e.g. {flag} {example}.")
    return tuple(sorted(set(vals)))


def _resolve_fit_flags(args: argparse.Namespace) -> None:
    """Refuse the other fit's flags (naming them), then fill in this fit's defaults."""
    ce = args.fit == "ce"
    foreign = TSPD_ONLY if ce else CE_ONLY
    given = [flag for dest, flag in foreign.items() if getattr(args, dest) is not None]
    if given:
        other = "tspd" if ce else "ce"
        raise ConfigError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for "
                          f"--fit {other}, not --fit {args.fit}; leave "
                          f"{'it' if len(given) == 1 else 'them'} out.")
    for dest, value in (CE_DEFAULTS if ce else TSPD_DEFAULTS).items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    for dest, both in PER_FIT.items():
        if getattr(args, dest) is None:
            setattr(args, dest, both[int(ce)])


def _check_flags(args: argparse.Namespace) -> None:
    for flag, value in (("--n", args.n), ("--steps", args.steps),
                        ("--batch-size", args.batch_size), ("--gen-length", args.gen_length),
                        ("--block-length", args.block_length)):
        check_number(value, flag, minimum=1)
    check_number(args.seed, "--seed", minimum=0)
    check_number(args.lr, "--lr", minimum=0, low_open=True, example=0.02)
    if args.fit == "ce":
        check_number(args.val_fraction, "--val-fraction", minimum=0, maximum=0.9,
                     low_open=True, example=0.25)
        check_number(args.choose_threshold, "--choose-threshold", minimum=0, maximum=1,
                     low_open=True, example=0.9)
        return
    for flag, value in (("--hidden", args.hidden), ("--horizon", args.horizon),
                        ("--l2", args.l2)):
        check_number(value, flag, minimum=0)
    check_number(args.neg_weight, "--neg-weight", minimum=0, low_open=True, example=1.0)
    check_number(args.tau, "--tau", minimum=0, maximum=1, low_open=True, example=0.5)
    for flag, value in (("--q", args.q), ("--r", args.r)):
        check_number(value, flag, minimum=0, low_open=True, example=0.1)


def _out_file(args: argparse.Namespace, model_dir: Path) -> Path:
    """The file to write (a folder given as --out gets tspd.json / ce.json), checked before
    the work."""
    from dllm_jax.files import check_output_path

    name = CE_FILE if args.fit == "ce" else TSPD_FILE
    out = Path(os.path.expanduser(args.out)) if args.out else model_dir / name
    if out.is_dir():
        out = out / name
    check_output_path(out, "--out" if args.out else "--model")
    return out


def _all_finite(tree: object) -> bool:
    return all(np.isfinite(np.asarray(x, np.float64)).all() for x in jax.tree.leaves(tree))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder (default: the bundled model)")
    p.add_argument("--fit", choices=("tspd", "ce"), default="tspd",
                   help="what to fit: tspd (default; writes MODEL/tspd.json) or ce (the CE "
                        "filter and look-ahead of `--controller ce_fitted`; MODEL/ce.json)")
    p.add_argument("--out", default=None,
                   help="output file (default: MODEL/tspd.json, or MODEL/ce.json for --fit ce)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument("--n", type=int, default=64, help="training-split instances per task")
    p.add_argument("--steps", type=int, default=400, help="optimiser steps of the fit")
    p.add_argument("--gen-length", type=int, default=None,
                   help="answer length (default: the model's train_config.json, else 32)")
    p.add_argument("--block-length", type=int, default=None, help="default: gen-length")
    p.add_argument("--thresholds", default=None,
                   help="Fast-dLLM thresholds whose decodes are recorded besides the "
                        "one-token-per-step reference (default: tspd 0.9,0.7; ce none: the "
                        "reference is the least censored)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate of the fit, > 0 "
                   "(default: tspd 0.02; ce 0.05, in log units of q, r, slope_var0)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="prompts per recorded decode (default 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no progress line")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the task instances, the decodes and the fit (default 0)")
    p.add_argument("--all-positions", action="store_true",
                   help="fit on every answer position, EOS padding included (default: content "
                        "positions, up to and including the reference answer's first EOS)")
    t = p.add_argument_group("--fit tspd only")
    t.add_argument("--drop", default=None, metavar="GROUPS",
                   help="ablation: feature groups left out of the fit, comma-separated, of "
                        "ce, position, momentum (default: none)")
    t.add_argument("--hidden", type=int, default=None, help="MLP hidden units (0: logistic; "
                   "default 16)")
    t.add_argument("--l2", type=float, default=None, help="L2 penalty on the weights, >= 0 "
                   "(default 1e-4)")
    t.add_argument("--neg-weight", type=float, default=None,
                   help="loss weight of not-yet-converged rows (> 1: wrong commits cost more; "
                        "default 1)")
    t.add_argument("--tau", type=float, default=None, help="default commit threshold on p "
                   "(default 0.5)")
    t.add_argument("--no-ce", action="store_true", default=None,
                   help="leave the CE forecast features out")
    t.add_argument("--horizon", type=int, default=None, help="CE forecast horizon of the "
                   "features (steps, default 2)")
    t.add_argument("--q", type=float, default=None,
                   help=f"CE process noise of the features (default {CEFilter.q})")
    t.add_argument("--r", type=float, default=None,
                   help=f"CE observation noise of the features (default {CEFilter.r})")
    c = p.add_argument_group("--fit ce only")
    c.add_argument("--horizons", default=None,
                   help="forecast horizons (steps) the likelihood is fitted on and the "
                        "look-ahead is chosen from (default 1,2,3,4)")
    c.add_argument("--zs", default=None, help="candidate widths z of the look-ahead's lower "
                   "bound, in forecast sds (default 0.5,1,1.5,2,3)")
    c.add_argument("--val-fraction", type=float, default=None,
                   help="fraction of the prompts held out to choose (z, horizon) (default 0.25)")
    c.add_argument("--choose-threshold", type=float, default=None,
                   help="commit threshold the look-ahead's firing is counted against when "
                        "choosing (default 0.9)")


def _prompts(names: list[str], n: int, seed: int) -> list[str]:
    from dllm_jax.tasks import TASKS

    out: list[str] = []
    for k, name in enumerate(names):
        out += [inst.prompt for inst in TASKS[name].generate(seed + k, n, split="train")]
    return out


def run(args: argparse.Namespace) -> int:
    from dllm_jax.tasks import TASKS

    # every check before the model is loaded and the (minutes long) fit starts
    model_dir = session.resolve_model_dir(args.model)
    names = list(TASKS) if args.tasks is None else [t.strip() for t in args.tasks.split(",")
                                                     if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ConfigError(f"--tasks: unknown tasks {unknown}; valid: {', '.join(TASKS)}.")
    _resolve_fit_flags(args)
    _check_flags(args)
    thresholds = (_floats(args.thresholds, "--thresholds") if args.thresholds is not None
                  else ())
    if args.fit == "ce":
        horizons = _number_list(args.horizons, "--horizons", int, 1, "1,2,3,4")
        zs = _number_list(args.zs, "--zs", float, 0, "0.5,1,2")
    else:
        try:
            ce_filter = CEFilter(q=args.q, r=args.r)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        drop = tuple(g.strip() for g in args.drop.split(",") if g.strip())
        bad = [g for g in drop if g not in FEATURE_GROUPS]
        if bad:
            raise ConfigError(f"--drop: unknown feature groups {bad}; choose from "
                              f"{', '.join(FEATURE_GROUPS)}, e.g. --drop position.")
        if "ce" in drop and args.no_ce:
            raise ConfigError("--no-ce already leaves the CE features out; drop 'ce' from "
                              "--drop or leave out --no-ce.")
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
    prompts = _prompts(names, args.n, args.seed)
    ids, valid = s.pad([s.encode(p) for p in prompts])           # [N, P] left-padded
    progress.summary(f"recording {len(prompts)} training prompts x {1 + len(thresholds)} "
                     f"decodes (gen_length {gen.gen_length}, block {gen.block_length})",
                     quiet=args.quiet)
    from dllm_jax.files import dumps, write_json

    if args.fit == "ce":
        return _run_ce(args, s, ids, valid, gen, names, thresholds, horizons, zs, out_file)
    use_ce = not args.no_ce
    ctrl, metrics = train_controller(
        s.params, s.cfg, ids, valid, gen=gen, thresholds=thresholds, use_ce=use_ce,
        horizon=args.horizon, ce_filter=ce_filter, batch_size=args.batch_size,
        key=jax.random.key(args.seed), content_only=not args.all_positions,
        hidden=args.hidden, steps=args.steps, lr=args.lr, l2=args.l2,
        neg_weight=args.neg_weight, tau=args.tau, seed=args.seed, quiet=args.quiet, drop=drop)
    metrics.update(tasks=names, n_per_task=args.n, split="train", gen_length=gen.gen_length,
                   block_length=gen.block_length, thresholds=list(thresholds),
                   positions="all" if args.all_positions else "content")
    if not _all_finite(ctrl.params.to_dict()) or not math.isfinite(float(metrics["loss_fit"])):
        raise ConfigError(f"the fit diverged (loss {metrics['loss_fit']}); nothing written to "
                          f"{out_file}: lower --lr or raise --l2.")
    write_json(out_file, tspd_to_json(ctrl, metrics), flag="--out", indent=1)
    print(dumps({"out": str(out_file), **{k: metrics.get(k) for k in (
        "n_rows", "loss_init", "loss_fit", "loss_eval", "accuracy_eval", "tspd_at_tau",
        "threshold_0.9")}}))
    return 0


def _run_ce(args: argparse.Namespace, s: session.Session, ids: np.ndarray, valid: np.ndarray,
            gen: GenerateConfig, names: list[str], thresholds: tuple[float, ...],
            horizons: tuple[int, ...], zs: tuple[float, ...], out_file: Path) -> int:
    """`--fit ce`: record, fit the filter, choose (z, horizon), write ce.json."""
    import dataclasses

    from controllers.ce_fitted import ce_fit_to_json
    from dllm_jax.files import dumps, write_json
    from dllm_jax.train.ce_fit_run import fit_ce, record_sequences

    seqs, sources = record_sequences(
        s.params, s.cfg, ids, valid, gen=gen, thresholds=thresholds,
        batch_size=args.batch_size, key=jax.random.key(args.seed),
        content_only=not args.all_positions, quiet=args.quiet)
    fit = fit_ce(seqs, horizons=horizons, steps=args.steps, lr=args.lr, zs=zs,
                 choose_horizons=horizons, threshold=args.choose_threshold,
                 val_fraction=args.val_fraction, seed=args.seed)
    f = fit.ce_filter
    if not all(math.isfinite(v) for v in (f.q, f.r, f.slope_var0, fit.metrics["loglik_fit"])):
        raise ConfigError(f"the CE fit diverged (log-likelihood {fit.metrics['loglik_fit']}); "
                          f"nothing written to {out_file}: lower --lr.")
    metrics = {**fit.metrics, "tasks": names, "n_per_task": args.n, "n_prompts": len(ids),
               "split": "train", "seed": args.seed, "sources": sources,
               "positions": "all" if args.all_positions else "content",
               "gen_length": gen.gen_length, "block_length": gen.block_length}
    fit = dataclasses.replace(fit, metrics=metrics)
    write_json(out_file, ce_fit_to_json(fit), flag="--out", indent=1)
    summary = {"out": str(out_file), "q": f.q, "r": f.r, "slope_var0": f.slope_var0,
               "z": fit.z, "horizon": fit.horizon, "calibrated": fit.calibrated,
               **{k: metrics[k] for k in ("n_sequences_total", "loglik_init", "loglik_fit",
                                          "loglik_val_init", "loglik_val_fit")}}
    print(dumps(summary))
    progress.summary(f"ce fit: q {f.q:.4g}, r {f.r:.4g}, slope_var0 {f.slope_var0:.4g}; "
                     f"look-ahead z {fit.z:g}, horizon {fit.horizon}; predictive log-lik "
                     f"{metrics['loglik_val_init']:.3f} -> {metrics['loglik_val_fit']:.3f} "
                     f"nats (validation) on {metrics['n_sequences_total']} sequences; wrote "
                     f"{out_file}", quiet=args.quiet)
    return 0


__all__ = ["add_arguments", "run"]
