"""Quality against parallelism: task accuracy vs. forward passes, per task and controller.

    dllm-jax bench quality [--model DIR] [--task-set v1|v2] [--tasks a,b] [--n 500] [--seed S]
        [--settings LABELS|FAMILIES] [--cache none|dual] [--json F.json] [--out F.md]
        [--plot F.png] [--batch-size N] [--time-budget SECONDS] [--quick]
        [--draft-model DIR] [--quantize int8]

For every task (held-out `split='test'` instances) and every controller setting
(`bench.settings`: every family of issue 12 item 6, in priority order), decode all instances
and score them with the task's exact scorer. One record per (task, setting) (`bench.measure`):
accuracy (fraction of valid answers) with its Wilson 95 % interval, mean NFE per answer,
content tokens per forward (total content / total NFE: EOS padding after the first EOS is not
counted) and the content fraction of the answer positions. Tables (`bench.report`): overall,
per dependency level, the issue's target table (NFE saved vs threshold 0.9, accuracy
difference, worst high-dependency drop vs one token per step) and per task; `--plot`: the
accuracy-vs-NFE Pareto plot with interval bars.

Task set: the model folder's `train_config.json` (`train.task_set`, 'v1' when absent) unless
`--task-set` says otherwise. Decode layout: every setting decodes the same shape, one prompt
width for all tasks, so each setting compiles once. v1 (answers <= 32 tokens): one block of
the answer length (as the v1 bench did). v2 (answers of 64-256 tokens): semi-autoregressive
blocks of 32 (as LLaDA decodes long answers), or the model's block size for a block-diffusion
(SDAR-style) model; the answer length is the model's (train_config) when a multiple of the
block, else the longest answer of the chosen tasks + EOS rounded up to the block.

Draft model: the speculative settings (`Setting.speculative`: the simsd ones) self-draft, or
with `--draft-model DIR` draft with that model folder (same tokenizer), noted in the header;
the other settings ignore it, and a run whose settings include no speculative one refuses
it. Records keep their schema (the label says the setting, the header the draft model).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Any, Mapping

from dllm_jax import draft_cli, progress
from dllm_jax.cli_options import add_quantize_option, check_quantize
from dllm_jax.bench.measure import Layout, evaluate, make_instances
from dllm_jax.bench.report import atomic_write_text, markdown, plot, records_json
from dllm_jax.bench.settings import QUICK, all_settings, dedupe, select
from dllm_jax.config import ConfigError

#: Block length of v2 decodes for a bidirectional model (tokens).
V2_BLOCK = 32
DEFAULT_N = 500


def check_outputs(json_path: str | None, out_path: str | None, plot_path: str | None) -> None:
    """Refuse, before any work, output paths that cannot be written (one sentence naming the
    flag): a missing or unwritable parent folder, a path that is a folder, and --plot without
    matplotlib."""
    for flag, path in (("--json", json_path), ("--out", out_path), ("--plot", plot_path)):
        if not path:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ConfigError(f"{flag} {path}: the folder {parent} does not exist; create it or "
                              f"choose another path.")
        if os.path.isdir(path):
            raise ConfigError(f"{flag} {path} is a folder; give a file name.")
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"{flag} {path}: the folder {parent} is not writable.")
    if plot_path and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib, which is not installed; `pip install -e "
                          "\".[plot]\"` (or pip install matplotlib), or drop --plot.")


def task_set_of(flag: str | None, train_config: Mapping[str, Any] | None) -> str:
    """The task set: the flag, else the model's `train.task_set`, else 'v1'."""
    if flag is not None:
        return flag
    train = (train_config or {}).get("train", {})
    return str(train.get("task_set", "v1"))


def choose_tasks(task_set: str, spec: str | None, train_config: Mapping[str, Any] | None
                 ) -> dict[str, Any]:
    """name -> Task: `spec` (comma-separated names), else the tasks the model was trained on
    (`train.tasks`) when they belong to the set, else the whole set."""
    from dllm_jax.tasks import TASK_SETS

    registry = TASK_SETS[task_set]
    if spec is not None:
        names = [t.strip() for t in spec.split(",") if t.strip()]
        unknown = [t for t in names if t not in registry]
        if unknown or not names:
            raise ConfigError(f"unknown tasks {unknown} in --tasks for task set {task_set}; "
                              f"valid: {', '.join(registry)}.")
    else:
        trained = list((train_config or {}).get("train", {}).get("tasks", []) or [])
        names = trained if trained and all(t in registry for t in trained) else list(registry)
    return {n: registry[n] for n in dict.fromkeys(names)}


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def choose_layout(task_set: str, tasks: Mapping[str, Any], width: int, cfg: Any,
                  answer_length: int | None, gen_flag: int | None = None,
                  block_flag: int | None = None) -> tuple[Layout, list[str]]:
    """The decode shape of the run (see the module docstring) and notes on the choice.

    Args:
      width: the longest prompt over the chosen tasks' instances (tokens).
      cfg: the model's ModelConfig (max_position, block_causal, block_size).
      answer_length: the model's training answer length (train_config), or None.
      gen_flag, block_flag: --gen-length / --block-length (None: chosen here).
    Raises ConfigError (naming the flag) when the answers or the prompt + answer do not fit.
    """
    from dllm_jax.scoring import DEFAULT_ANSWER_LENGTH

    notes: list[str] = []
    needed = 1 + max(t.max_answer_tokens() for t in tasks.values())   # + the EOS
    block = block_flag
    if block is None and getattr(cfg, "block_causal", False) and cfg.block_size > 0:
        block = int(cfg.block_size)
    if task_set == "v1":
        gen = gen_flag or answer_length or DEFAULT_ANSWER_LENGTH
        block = block or gen
    else:
        block = block or V2_BLOCK
        gen = gen_flag
        if gen is None:
            if answer_length and answer_length % block == 0 and answer_length >= needed:
                gen = answer_length
            else:
                gen = _round_up(needed, block)
                if answer_length:
                    notes.append(f"answer length {gen} (the model's {answer_length} is not a "
                                 f"multiple of the block length {block}).")
    if gen % block:
        raise ConfigError(f"--gen-length {gen} is not a multiple of the block length {block}; "
                          f"e.g. --gen-length {_round_up(gen, block)}.")
    if gen < needed:
        raise ConfigError(f"--gen-length {gen} is too short: the chosen tasks' answers need up "
                          f"to {needed} tokens (with the EOS); e.g. --gen-length "
                          f"{_round_up(needed, block)}.")
    if width + gen > cfg.max_position:
        raise ConfigError(f"prompts of {width} + answers of {gen} tokens exceed the model's "
                          f"maximum length {cfg.max_position}; choose fewer --tasks or a "
                          f"smaller --gen-length.")
    return Layout(width=width, gen_length=gen, block_length=block), notes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--task-set", choices=("v1", "v2"), default=None,
                   help="task set (default: the model's train_config.json, else v1)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all of "
                                                 "the set the model was trained on)")
    p.add_argument("--settings", default=None,
                   help="comma-separated setting labels or families, run in this order "
                        "(default: all, in priority order)")
    p.add_argument("--cache", choices=("none", "prefix", "dual"), default=None,
                   help="KV cache of every setting without its own (label suffix ' dual')")
    p.add_argument("--n", type=int, default=None,
                   help=f"held-out instances per task (default {DEFAULT_N})")
    p.add_argument("--seed", type=int, default=1234, help="seed of the held-out instances")
    p.add_argument("--gen-length", type=int, default=None,
                   help="answer positions (default: v1 the model's answer length; v2 the "
                        "model's when a multiple of the block, else the longest answer + EOS "
                        "rounded up to the block)")
    p.add_argument("--block-length", type=int, default=None,
                   help="block length (default: v1 one block; v2 32 or the model's block size)")
    p.add_argument("--batch-size", type=int, default=512,
                   help="rows per decode call (all tasks share the calls)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new setting after this many seconds; write what was measured")
    p.add_argument("--quick", action="store_true",
                   help="a few tasks, small n, a few settings and a 420 s time budget (< 10 "
                        "min on a 2-core CPU); explicit flags override")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no progress lines; only the tables")
    p.add_argument("--json", default=None, help="write one record per (task, setting) here")
    p.add_argument("--out", default=None, help="write the markdown tables here")
    p.add_argument("--plot", default=None, help="write the accuracy-vs-NFE PNG here "
                                                "(needs matplotlib)")
    add_quantize_option(p)
    p.add_argument(draft_cli.FLAG, default=None, metavar="DIR",
                   help="a smaller model folder with the same tokenizer that drafts for the "
                        "speculative settings (simsd, simsd confidence; default: they "
                        "self-draft); the other settings ignore it")


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size),
                        ("--gen-length", args.gen_length), ("--block-length", args.block_length)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be a positive integer, got {value}.")
    if args.time_budget is not None and args.time_budget < 0:
        raise ConfigError(f"--time-budget must be >= 0 seconds, got {args.time_budget}.")


def run(args: argparse.Namespace) -> int:
    from dllm_jax import session
    from dllm_jax.scoring import prompt_width

    t_start = time.monotonic()
    check_outputs(args.json, args.out, args.plot)          # fail fast, before any work
    _check_numbers(args)
    model_dir = session.resolve_model_dir(args.model)
    train_config = session.read_train_config(model_dir)
    task_set = task_set_of(args.task_set, train_config)
    quick = QUICK[task_set] if args.quick else None
    tasks = choose_tasks(task_set, args.tasks if args.tasks is not None or quick is None
                         else ",".join(quick.tasks), train_config)
    spec = args.settings if args.settings is not None or quick is None else ",".join(quick.settings)
    settings = dedupe(s.with_run_cache(args.cache) for s in select(all_settings(), spec))
    n = args.n or (quick.n if quick is not None else DEFAULT_N)
    check_quantize(args.quantize)
    draft_dir = None
    if args.draft_model is not None:
        speculative = [s.label for s in settings if s.speculative]
        draft_cli.refuse_unless_speculative(
            bool(speculative), "any of the chosen settings (" + ", ".join(
                s.label for s in settings) + ")", uses="speculative settings (controller "
            "simsd)", fix=f"add one (e.g. --settings simsd) or drop {draft_cli.FLAG}")
        draft_dir = draft_cli.resolve(args.draft_model)

    instances = make_instances(tasks, n, args.seed)
    model = session.load(model_dir, quantize=args.quantize)
    draft = None if draft_dir is None else draft_cli.load(draft_dir)
    tok = model.require_tokenizer()
    width = max(prompt_width(tok, insts) for insts in instances.values())
    layout, notes = choose_layout(task_set, tasks, width, model.cfg, model.answer_length,
                                  args.gen_length, args.block_length)
    if args.quantize is not None:
        notes.append(f"the model's matrices are quantised to {args.quantize} at load time "
                     f"(--quantize).")
    if draft is not None:
        notes.append(f"the speculative settings ({', '.join(speculative)}) draft with the "
                     f"model {draft.model_dir}.")
    trained_set = task_set_of(None, train_config)
    if train_config is not None and trained_set != task_set:
        notes.append(f"the model was trained on task set {trained_set}, not {task_set}.")
    log = None if args.quiet else sys.stderr
    progress.summary(f"bench quality: {model.model_dir}, task set {task_set}, {len(tasks)} tasks x {n}, "
          f"{len(settings)} settings, answer {layout.gen_length} in blocks of "
          f"{layout.block_length}, prompt width {layout.width}", quiet=args.quiet)
    total_budget = args.time_budget
    if total_budget is None and quick is not None:
        total_budget = quick.time_budget
    budget = None
    if total_budget is not None:
        budget = max(0.0, total_budget - (time.monotonic() - t_start))
    res = evaluate(model.params, model.cfg, tok, tasks, instances, settings, layout,
                   batch_size=args.batch_size, model_dir=model.model_dir, time_budget=budget,
                   log=log, draft=None if draft is None else (draft.params, draft.cfg))
    header = [f"Model `{model.model_dir.name}`, task set {task_set}, {n} held-out instances per "
              f"task (seed {args.seed}), answer {layout.gen_length} positions in blocks of "
              f"{layout.block_length}; accuracy = valid answers with Wilson 95 % intervals; "
              f"content tokens = positions up to and including the first EOS; "
              f"wall time {time.monotonic() - t_start:.0f} s."]
    header += [f"- note: {x}" for x in notes]
    header += [f"- skipped: {x}" for x in res.skipped]
    if res.not_run:
        header.append(f"- not run (time budget {total_budget:.0f} s spent): "
                      f"{', '.join(res.not_run)}")
    text = markdown(res.records, header, res.seconds)
    print(text)
    if args.json:
        atomic_write_text(args.json, records_json(res.records))
    if args.out:
        atomic_write_text(args.out, text)
    if args.plot and res.records:
        plot(res.records, args.plot)
    return 0


__all__ = ["DEFAULT_N", "V2_BLOCK", "add_arguments", "check_outputs", "choose_layout",
           "choose_tasks", "run", "task_set_of"]
