"""Tables, JSON and the Pareto plot of `dllm-jax bench quality`, from its records.

Everything here reads `measure.Record`s only, so it works on records loaded back from the JSON
file as well. Pooled figures (per dependency level, overall) pool the ANSWERS of the records:
accuracy = valid / answers with a Wilson 95 % interval on those counts, mean NFE per answer,
content tokens per forward as total content / total NFE.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Iterable, Sequence

from dllm_jax.bench import stats
from dllm_jax.bench.measure import Record
from dllm_jax.bench.settings import BASELINE, REFERENCE

LEVELS = ("low", "medium", "high")


@dataclasses.dataclass(frozen=True)
class Pooled:
    """Answers of several records taken together (fractions in [0, 1], NFE per answer)."""

    n: int
    n_valid: int
    accuracy: float
    ci_low: float
    ci_high: float
    exact: float
    nfe_mean: float
    content_tpf: float
    content_fraction: float


def pool(records: Sequence[Record]) -> Pooled:
    """Pool the answers of `records` (each record weighs its n answers)."""
    n = sum(r.n for r in records)
    if n == 0:
        raise ValueError("pool needs at least one answer.")
    k = sum(r.n_valid for r in records)
    low, high = stats.wilson_interval(k, n)
    nfe = sum(r.nfe_mean * r.n for r in records)
    content = sum(r.content_mean * r.n for r in records)
    return Pooled(n=n, n_valid=k, accuracy=k / n, ci_low=low, ci_high=high,
                  exact=sum(r.exact * r.n for r in records) / n, nfe_mean=nfe / n,
                  content_tpf=content / nfe if nfe > 0 else float("nan"),
                  content_fraction=sum(r.content_fraction * r.n for r in records) / n)


def _acc(p: Pooled | Record) -> str:
    return f"{100 * p.accuracy:.1f} [{100 * p.ci_low:.1f}, {100 * p.ci_high:.1f}]"


def _settings(records: Iterable[Record]) -> list[str]:
    return list(dict.fromkeys(r.setting for r in records))


def _levels(records: Iterable[Record]) -> list[str]:
    present = {r.dependency for r in records}
    return [lv for lv in LEVELS if lv in present] + sorted(present - set(LEVELS))


def per_task_table(records: Sequence[Record]) -> str:
    """One line per (task, setting): accuracy % with its 95 % interval, exact %, NFE, content."""
    lines = ["| task | dependency | setting | n | accuracy % [95% CI] | exact % | mean NFE | "
             "content tok/forward | content % |", "|---|---|---|---|---|---|---|---|---|"]
    tasks = list(dict.fromkeys(r.task for r in records))
    for r in sorted(records, key=lambda r: tasks.index(r.task)):      # stable: run order kept
        lines.append(f"| {r.task} | {r.dependency} | {r.setting} | {r.n} | {_acc(r)} | "
                     f"{100 * r.exact:.1f} | {r.nfe_mean:.1f} | {r.content_tpf:.2f} | "
                     f"{100 * r.content_fraction:.1f} |")
    return "\n".join(lines)


def per_level_table(records: Sequence[Record]) -> str:
    """One line per (dependency level, setting), answers of the level's tasks pooled."""
    lines = ["| dependency | setting | tasks | n | accuracy % [95% CI] | mean NFE | "
             "content tok/forward |", "|---|---|---|---|---|---|---|"]
    for lv in _levels(records):
        for s in _settings(records):
            sel = [r for r in records if r.dependency == lv and r.setting == s]
            if sel:
                p = pool(sel)
                lines.append(f"| {lv} | {s} | {len(sel)} | {p.n} | {_acc(p)} | "
                             f"{p.nfe_mean:.1f} | {p.content_tpf:.2f} |")
    return "\n".join(lines)


def overall_table(records: Sequence[Record], seconds: dict[str, float] | None = None) -> str:
    """One line per setting, all tasks pooled (and the setting's wall seconds when given)."""
    sec = seconds or {}
    lines = ["| setting | family | cache | n | accuracy % [95% CI] | exact % | mean NFE | "
             "content tok/forward | content % | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in _settings(records):
        sel = [r for r in records if r.setting == s]
        p = pool(sel)
        t = f"{sec[s]:.1f}" if s in sec else "-"
        lines.append(f"| {s} | {sel[0].family} | {sel[0].cache} | {p.n} | {_acc(p)} | "
                     f"{100 * p.exact:.1f} | {p.nfe_mean:.1f} | {p.content_tpf:.2f} | "
                     f"{100 * p.content_fraction:.1f} | {t} |")
    return "\n".join(lines)


def _find(labels: Sequence[str], label: str) -> str | None:
    for cand in (label, f"{label} dual", f"{label} prefix"):
        if cand in labels:
            return cand
    return None


def targets_table(records: Sequence[Record], reference: str = REFERENCE,
                  baseline: str = BASELINE) -> str:
    """The issue's target table, one line per setting.

    NFE saved = 1 - NFE / NFE(baseline) over all tasks; accuracy difference (points) against
    the baseline; whether the accuracy lies at or above the baseline's 95 % lower bound; the
    worst drop (points) against `reference` on a high-dependency task; and whether the
    seed's target holds: >= 30 % fewer NFE, accuracy >= the baseline's lower bound and within
    1 point of its mean (or above), and <= 2 points below one token per step on every
    high-dependency task. A run under `--cache dual` uses the " dual" references.
    """
    labels = _settings(records)
    ref, base = _find(labels, reference), _find(labels, baseline)
    if base is None:
        return f"(no {baseline} records: the target table needs the baseline.)"
    base_p = pool([r for r in records if r.setting == base])
    high = list(dict.fromkeys(r.task for r in records if r.dependency == "high"))
    by = {(r.setting, r.task): r for r in records}
    lines = [f"Baseline {base}: accuracy {_acc(base_p)} %, mean NFE {base_p.nfe_mean:.2f}; "
             f"reference for the high-dependency drop: {ref or '(not run)'}.", "",
             f"| setting | accuracy % [95% CI] | mean NFE | NFE saved vs {base} | "
             f"accuracy diff (points) | >= baseline lower bound | worst high-dep. drop vs "
             f"{ref or reference} (points) | target met |", "|---|---|---|---|---|---|---|---|"]
    for s in labels:
        p = pool([r for r in records if r.setting == s])
        saved = 1.0 - p.nfe_mean / base_p.nfe_mean
        diff = 100 * (p.accuracy - base_p.accuracy)
        above = p.accuracy >= base_p.ci_low
        drops = [(100 * (by[(ref, t)].accuracy - by[(s, t)].accuracy), t) for t in high
                 if ref is not None and (ref, t) in by and (s, t) in by]
        worst = max(drops) if drops else None
        worst_txt = f"{worst[0]:.1f} ({worst[1]})" if worst else "-"
        met = saved >= 0.30 and above and diff >= -1.0 and (worst is not None and worst[0] <= 2.0)
        lines.append(f"| {s} | {_acc(p)} | {p.nfe_mean:.2f} | {100 * saved:.1f}% | {diff:+.1f} | "
                     f"{'yes' if above else 'no'} | {worst_txt} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def discrimination(records: Sequence[Record], level: str = "high", tolerance: float = 0.1) -> str:
    """The issue's first target in one sentence: pairs of settings of different families at
    matched NFE (within `tolerance`, relative) whose pooled `level`-dependency accuracy
    intervals do not overlap."""
    sel = [r for r in records if r.dependency == level]
    if not sel:
        return f"(no {level}-dependency records.)"
    pooled = {s: (pool([r for r in sel if r.setting == s]), next(r.family for r in sel
                                                                  if r.setting == s))
              for s in _settings(sel)}
    pairs, apart = 0, []
    names = list(pooled)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (pa, fa), (pb, fb) = pooled[a], pooled[b]
            if fa == fb or abs(pa.nfe_mean - pb.nfe_mean) > tolerance * max(pa.nfe_mean, pb.nfe_mean):
                continue
            pairs += 1
            if pa.ci_high < pb.ci_low or pb.ci_high < pa.ci_low:
                apart.append((abs(pa.accuracy - pb.accuracy), a, b))
    if not pairs:
        return f"No two families were measured at matched NFE (within {100 * tolerance:.0f} %)."
    text = (f"{len(apart)} of {pairs} cross-family pairs at matched NFE (within "
            f"{100 * tolerance:.0f} %) differ on the {level}-dependency tasks by more than their "
            f"95 % intervals")
    if apart:
        d, a, b = max(apart)
        text += f"; the widest: {a} vs {b} ({100 * d:.1f} points)"
    return text + "."


def markdown(records: Sequence[Record], header: Sequence[str] = (),
             seconds: dict[str, float] | None = None) -> str:
    """The whole report: header lines, overall, per level, targets, per task."""
    parts = list(header)
    if not records:
        return "\n".join(parts + ["", "(no settings were run.)"]) + "\n"
    parts += ["", "### Overall (all tasks pooled)", "", overall_table(records, seconds),
              "", "### By dependency level", "", per_level_table(records),
              "", "### Targets (TSPD + CE against threshold 0.9 and one token per step)", "", targets_table(records), "",
              discrimination(records), "", "### Per task", "", per_task_table(records)]
    return "\n".join(parts) + "\n"


def records_json(records: Sequence[Record]) -> str:
    """The JSON file's text: a list of records (RECORD_FIELDS first, then the extras)."""
    return json.dumps([r.to_json() for r in records], indent=1) + "\n"


def plot(records: Sequence[Record], path: str) -> None:
    """Accuracy (%) vs mean NFE per answer (log axis) with 95 % interval bars: one panel for
    all tasks pooled, one per dependency level, one per task; one line per family (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    panels: list[tuple[str, list[Record]]] = [("all tasks", list(records))]
    panels += [(f"{lv} dependency", [r for r in records if r.dependency == lv])
               for lv in _levels(records)]
    for t in dict.fromkeys(r.task for r in records):
        sel = [r for r in records if r.task == t]
        panels.append((f"{t} ({sel[0].dependency})", sel))
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    families = list(dict.fromkeys(r.family for r in records))
    colors = plt.get_cmap("tab10")
    markers = "os^vDP*Xph<>"
    for ax, (title, sel) in zip(axes.flat, panels):
        for i, fam in enumerate(families):
            pts = []
            for s in _settings(r for r in sel if r.family == fam):
                p = pool([r for r in sel if r.setting == s])
                pts.append((p.nfe_mean, 100 * p.accuracy, 100 * p.ci_low, 100 * p.ci_high))
            if not pts:
                continue
            pts.sort()
            x, y, lo, hi = (list(v) for v in zip(*pts))
            ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]],
                        marker=markers[i % len(markers)], ms=4, capsize=2, lw=1,
                        color=colors(i % 10), label=fam)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("mean NFE per answer")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(-2, 102)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def _atomic(path: str, write: Any) -> None:
    """Write `path` through a temporary file in its folder and a rename (world-readable)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)                 # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically (temporary file + rename)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic(path, write)


__all__ = ["LEVELS", "Pooled", "atomic_write_text", "discrimination", "markdown",
           "overall_table", "per_level_table", "per_task_table", "plot", "pool", "records_json",
           "targets_table"]
