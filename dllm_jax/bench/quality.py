"""Quality against parallelism: task accuracy vs. forward passes, per task and controller.

    dllm-jax bench quality [--model DIR] [--tasks a,b] [--n 100] [--out FILE.md] [--plot FILE.png]

For every task (held-out `split='test'` instances) and every controller setting, decode all
instances and score them with the task's exact scorer. Reported per (task, setting):
accuracy (valid answers, %), exact match with the reference (%), mean partial credit, mean NFE
per instance and tokens per forward (answer tokens / NFE, counting the EOS padding as the
decode does). ParallelBench's finding is the "dependency cliff": tasks whose answer tokens
depend on each other lose accuracy as more tokens are committed per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from typing import Any, Iterable, Sequence

from dllm_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Setting:
    """One controller setting: a label, a controller name + kwargs, and the step budget as a
    fraction of the answer length (1 = one token per step for fixed schedules)."""

    label: str
    family: str
    controller: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    steps_divisor: int = 1
    cache: str = "none"


def default_settings() -> list[Setting]:
    """LLaDA fixed k = 1, 2, 4, 8 tokens per step; Fast-dLLM threshold 0.5..0.95 and factor;
    Dream's orders at two tokens per step."""
    out = [Setting(f"llada k={k}", "llada fixed k", "low_confidence", (), k) for k in (1, 2, 4, 8)]
    out += [Setting(f"threshold {t}", "fast-dllm threshold", "threshold", (("threshold", t),))
            for t in (0.5, 0.7, 0.8, 0.9, 0.95)]
    out += [Setting(f"factor {f}", "fast-dllm factor", "factor", (("factor", f),))
            for f in (0.5, 1.0, 2.0)]
    out += [Setting(f"dream {a} k=2", "dream orders", a, (), 2)
            for a in ("maskgit_plus", "topk_margin", "entropy")]
    return out


def trajectory_settings() -> list[Setting]:
    """Issue 6's controllers: R2, CE on top of the threshold rule, TSPD alone (fitted without
    the CE forecast, `tspd_noce.json`) and TSPD + CE (`tspd.json`), each at several settings.
    TSPD files are read from the model folder."""
    out = [Setting(f"r2 t={t}", "r2", "r2", (("threshold", t),)) for t in (0.7, 0.9)]
    out += [Setting(f"ce t={t}", "ce (threshold + forecast)", "ce", (("threshold", t),))
            for t in (0.5, 0.7, 0.9)]
    out += [Setting(f"tspd tau={tau}", "tspd alone", "tspd",
                    (("tspd_file", "tspd_noce.json"), ("tau", tau))) for tau in (0.5, 0.7, 0.9)]
    out += [Setting(f"tspd+ce tau={tau}", "tspd + ce", "tspd",
                    (("tspd_file", "tspd.json"), ("tau", tau))) for tau in (0.5, 0.7, 0.9)]
    return out


def _controller_kwargs(st: Setting, model_dir: str | None) -> dict[str, Any]:
    kw = dict(st.kwargs)
    if "tspd_file" in kw:
        if model_dir is None:
            raise ConfigError(f"{st.label} reads fitted TSPD parameters from the model folder; "
                              f"pass model_dir.")
        kw["tspd"] = os.path.join(model_dir, kw.pop("tspd_file"))
    return kw


@dataclasses.dataclass(frozen=True)
class Row:
    task: str
    dependency: str
    setting: str
    family: str
    n: int
    accuracy: float
    exact: float
    partial: float
    nfe: float
    tokens_per_forward: float


def evaluate(params: Any, cfg: Any, tokenizer: Any, task_names: Sequence[str],
             settings: Sequence[Setting], n: int = 100, gen_length: int = 32,
             batch_size: int = 64, seed: int = 1234, log: Any = None,
             model_dir: str | None = None) -> list[Row]:
    """Decode `n` held-out instances of each task under each setting and score them
    (`scoring.decode_and_score`).

    Args:
      params, cfg: the model. tokenizer: `dllm_jax.tokenizer.Tokenizer` of the model.
      gen_length: answer length (must be what the model was trained with; answers are
        padded with EOS up to it). Must be divisible by every setting's steps_divisor.
      batch_size: rows per decode call.
      model_dir: the model folder (where TSPD settings read their fitted parameters).
    Returns: one Row per (task, setting).
    """
    from controllers import make_controller
    from dllm_jax.config import GenerateConfig
    from dllm_jax.scoring import decode_and_score, prompt_width, summarize
    from dllm_jax.tasks import get_task

    rows: list[Row] = []
    instances = {name: get_task(name).generate(seed, n, split="test") for name in task_names}
    # One prompt width for every task, so that each setting compiles once.
    width = max(prompt_width(tokenizer, insts) for insts in instances.values())
    for name in task_names:
        task, insts = get_task(name), instances[name]
        for st in settings:
            if gen_length % st.steps_divisor:
                raise ConfigError(f"gen_length {gen_length} is not divisible by {st.steps_divisor} "
                                  f"({st.label}); choose a gen_length that is.")
            gen = GenerateConfig(gen_length=gen_length, block_length=gen_length,
                                 steps=gen_length // st.steps_divisor, cache=st.cache)
            ctrl = make_controller(st.controller, **_controller_kwargs(st, model_dir))
            scored = decode_and_score(params, cfg, tokenizer, task, insts, gen, ctrl,
                                      batch_size=batch_size, width=width)
            m = summarize(scored)
            rows.append(Row(task=name, dependency=task.dependency, setting=st.label,
                            family=st.family, n=m["n"], accuracy=100.0 * m["valid"],
                            exact=100.0 * m["exact"], partial=m["partial"], nfe=m["nfe"],
                            tokens_per_forward=gen_length / m["nfe"]))
            if log is not None:
                r = rows[-1]
                print(f"  {name:18s} {st.label:22s} acc {r.accuracy:5.1f}%  nfe {r.nfe:5.1f}",
                      file=log, flush=True)
    return rows


def format_table(rows: Iterable[Row]) -> str:
    """Markdown table: one line per (task, setting)."""
    lines = ["| task | dependency | setting | n | accuracy % | exact % | partial | mean NFE | tokens/forward |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.task} | {r.dependency} | {r.setting} | {r.n} | {r.accuracy:.1f} | "
                     f"{r.exact:.1f} | {r.partial:.3f} | {r.nfe:.1f} | {r.tokens_per_forward:.2f} |")
    return "\n".join(lines)


def summary_by_dependency(rows: Sequence[Row]) -> str:
    """Mean accuracy per dependency level and setting: the dependency cliff at a glance."""
    levels = sorted({r.dependency for r in rows}, key=["low", "medium", "high"].index)
    settings = list(dict.fromkeys(r.setting for r in rows))
    head = "| setting | mean NFE | " + " | ".join(f"{lv} dep. acc %" for lv in levels) + " |"
    lines = [head, "|---|---|" + "---|" * len(levels)]
    for s in settings:
        sel = [r for r in rows if r.setting == s]
        accs = []
        for lv in levels:
            v = [r.accuracy for r in sel if r.dependency == lv]
            accs.append(f"{statistics.fmean(v):.1f}" if v else "-")
        lines.append(f"| {s} | {statistics.fmean(r.nfe for r in sel):.1f} | " + " | ".join(accs) + " |")
    return "\n".join(lines)


def tspd_targets(rows: Sequence[Row], reference: str = "llada k=1",
                 baseline: str = "threshold 0.9") -> str:
    """For every TSPD + CE setting: mean accuracy and NFE against the threshold-0.9 baseline
    (target: same mean accuracy with >= 30% fewer NFE) and the largest accuracy drop against
    one token per step on a high-dependency task (target: <= 2 points)."""
    def mean(setting: str, field: str, tasks: Sequence[str] | None = None) -> float:
        v = [getattr(r, field) for r in rows if r.setting == setting
             and (tasks is None or r.task in tasks)]
        return statistics.fmean(v) if v else float("nan")

    settings = [s for s in dict.fromkeys(r.setting for r in rows) if s.startswith("tspd")]
    if not settings or baseline not in {r.setting for r in rows}:
        return "(no TSPD or baseline rows)"
    high = sorted({r.task for r in rows if r.dependency == "high"})
    acc0, nfe0 = mean(baseline, "accuracy"), mean(baseline, "nfe")
    lines = [f"Baseline {baseline}: mean accuracy {acc0:.1f}%, mean NFE {nfe0:.2f}.", "",
             "| setting | mean accuracy % | mean NFE | NFE saved vs baseline | accuracy >= baseline | "
             "worst high-dep. drop vs k=1 (points) | targets met |",
             "|---|---|---|---|---|---|---|"]
    for s in settings:
        acc, nfe = mean(s, "accuracy"), mean(s, "nfe")
        saved = 1.0 - nfe / nfe0
        drops = [mean(reference, "accuracy", [t]) - mean(s, "accuracy", [t]) for t in high]
        worst = max(drops) if drops else float("nan")
        ok = acc >= acc0 - 1e-9 and saved >= 0.30 and worst <= 2.0
        lines.append(f"| {s} | {acc:.1f} | {nfe:.2f} | {saved * 100:.1f}% | "
                     f"{'yes' if acc >= acc0 - 1e-9 else 'no'} | {worst:.1f} | "
                     f"{'yes' if ok else 'no'} |")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: str) -> None:
    """Accuracy vs mean NFE, one panel per task, one line per controller family (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in rows))
    cols = 4
    nrows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    families = list(dict.fromkeys(r.family for r in rows))
    for ax, task in zip(axes.flat, tasks):
        for fam in families:
            sel = sorted((r for r in rows if r.task == task and r.family == fam), key=lambda r: r.nfe)
            if sel:
                ax.plot([r.nfe for r in sel], [r.accuracy for r in sel], marker="o", label=fam)
        dep = next(r.dependency for r in rows if r.task == task)
        ax.set_title(f"{task} ({dep} dependency)", fontsize=9)
        ax.set_xlabel("mean NFE")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(-2, 102)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(families), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _atomic_savefig(fig, path)
    plt.close(fig)


def _atomic_savefig(fig: Any, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".png.tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90, format="png")
        os.chmod(tmp, 0o644)                 # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument("--settings", default=None,
                   help="comma-separated setting labels to run (default: all)")
    p.add_argument("--n", type=int, default=100, help="held-out instances per task")
    p.add_argument("--gen-length", type=int, default=None,
                   help="answer length (default: the model's train_config.json, else 32)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=None, help="write the markdown tables here")
    p.add_argument("--plot", default=None, help="write the accuracy-vs-NFE PNG here")


def run(args: argparse.Namespace) -> int:
    from dllm_jax import session
    from dllm_jax.scoring import DEFAULT_ANSWER_LENGTH
    from dllm_jax.tasks import TASKS

    model_dir = session.resolve_model_dir(args.model)   # fail fast, before any work
    names = list(TASKS) if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown tasks {unknown}; valid: {', '.join(TASKS)}.")
    settings = default_settings() + trajectory_settings()
    if args.settings is not None:
        wanted = [s.strip() for s in args.settings.split(",")]
        missing = [w for w in wanted if w not in {s.label for s in settings}]
        if missing:
            raise ConfigError(f"unknown settings {missing}; valid: {', '.join(s.label for s in settings)}.")
        settings = [s for s in settings if s.label in wanted]
    if args.n <= 0:
        raise ConfigError(f"--n must be positive, got {args.n}.")
    model = session.load(model_dir, layout="stacked")
    gen_length = args.gen_length or model.answer_length or DEFAULT_ANSWER_LENGTH
    rows = evaluate(model.params, model.cfg, model.require_tokenizer(), names, settings,
                    n=args.n, gen_length=gen_length, batch_size=args.batch_size, seed=args.seed,
                    log=sys.stderr, model_dir=str(model.model_dir))
    text = (f"### Per task\n\n{format_table(rows)}\n\n### Mean accuracy by dependency level\n\n"
            f"{summary_by_dependency(rows)}\n\n### Issue 6 targets\n\n{tspd_targets(rows)}\n")
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    if args.plot:
        plot(rows, args.plot)
    return 0
