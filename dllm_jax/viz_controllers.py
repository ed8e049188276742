"""Pictures of what the trajectory controllers see, for single tokens of a traced decode
(`GenerateConfig(trace=True)`), and of the dependency cliff from benchmark records.

- `ce_forecast_band`: a token's confidence while masked, and CE's forecast of it `horizon`
  observations ahead with the band mean +- z sd (the filter run offline on the trace, as the
  decode loop runs it); the threshold line shows where the look-ahead would fire (the band's
  lower edge above the threshold).
- `tspd_probability`: TSPD's p(converged) per step for a few tokens, the tau line, the commit.
- `dependency_cliff`: accuracy against mean NFE per task for one controller family, from the
  quality benchmark's JSON records (`dllm-jax bench quality --json`).
matplotlib comes with the `notebooks` extra (`viz.INSTALL_HINT`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from dllm_jax.features import CEFilter
from dllm_jax.viz import VizError, _pyplot, _trace


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def ce_forecast_band(out: Any, position: int, *, ce_filter: CEFilter = CEFilter(),
                     horizon: int = 2, z: float = 1.0, threshold: float = 0.9, row: int = 0,
                     ax: Any = None) -> Any:
    """Observed confidence of answer `position` (row `row`) at each of its observations, and
    CE's h-step forecast made at observation t drawn at t + h: the mean and the band
    mean +- z sd, mapped from log-odds to probability. Returns the Axes."""
    from dllm_jax.train import ce_fit

    seqs = ce_fit.observation_sequences(_trace(out), min_observations=1)
    hit = np.flatnonzero((seqs.row == row) & (seqs.position == position))
    if hit.size == 0:
        raise VizError(f"answer position {position} of row {row} was never observed while "
                       f"masked (it committed in the step that first saw it, or is outside "
                       f"the answer); pick another position.")
    i = int(hit[0])
    y, valid, restart = seqs.y[i:i + 1], seqs.valid[i:i + 1], seqs.restart[i:i + 1]
    mean, sd, _, _ = (np.asarray(a)[0, 0] for a in ce_fit.forecasts(
        ce_filter, y, valid, restart, [horizon]))
    n = int(valid[0].sum())
    t = np.arange(n)
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 3.2))
    ax.plot(t, _sigmoid(y[0, :n]), "o-", label="confidence")
    ahead = t + horizon
    ax.plot(ahead, _sigmoid(mean[:n]), "--", label=f"CE forecast, {horizon} ahead")
    ax.fill_between(ahead, _sigmoid(mean[:n] - z * sd[:n]), _sigmoid(mean[:n] + z * sd[:n]),
                    alpha=0.25, label=f"mean +- {z:g} sd")
    for k in np.flatnonzero(restart[0, :n])[1:]:
        ax.axvline(k, color="grey", lw=0.6, ls=":")
    ax.axhline(threshold, color="red", lw=0.8, label=f"threshold {threshold:g}")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("observation (steps while masked; dotted: candidate changed)")
    ax.set_ylabel("probability")
    ax.set_title(f"position {position}: confidence and CE forecast")
    ax.legend(fontsize="small")
    return ax


def tspd_probability(out: Any, tspd: Any, gen: Any, positions: Sequence[int], row: int = 0,
                     ax: Any = None) -> Any:
    """TSPD's p(converged) at each step for answer `positions` of row `row` while they were
    masked (features replayed from the trace exactly as the loop computes them; the decode
    need not have used TSPD), the tau line, and a circle where each was committed."""
    from dllm_jax.train.controller_fit import replay_features

    tr = {k: jnp.asarray(v) for k, v in _trace(out).items()}
    x, live, a0 = replay_features(tr, gen=gen, vocab_size=tspd.vocab_size, use_ce=tspd.use_ce,
                                  horizon=tspd.horizon, ce_filter=tspd.ce_filter)
    p = np.asarray(_sigmoid(np.asarray(tspd.params.logit(x))))        # [S, B, Lb]
    live, a0 = np.asarray(live), np.asarray(a0)
    steps, lb = int(out.stats.steps), gen.block_length
    fix = np.asarray(out.stats.fix_step)[row]
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 3.2))
    for pos in positions:
        off = int(pos) - a0[:steps]
        here = (off >= 0) & (off < lb)
        vals = np.full(steps, np.nan)
        s_idx = np.flatnonzero(here)
        ok = live[s_idx, row, off[s_idx]]
        vals[s_idx[ok]] = p[s_idx[ok], row, off[s_idx[ok]]]
        (line,) = ax.plot(np.arange(steps), vals, marker=".", label=f"pos {pos}")
        k = int(fix[pos])
        if 0 <= k < steps and not np.isnan(vals[k]):
            ax.plot([k], [vals[k]], "o", ms=9, mfc="none", color=line.get_color())
    ax.axhline(tspd.tau, color="red", lw=0.8, label=f"tau {tspd.tau:g}")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("p(converged)")
    ax.set_title("TSPD's p(converged) until commit (circle: committed)")
    ax.legend(fontsize="small", ncol=2)
    return ax


def dependency_cliff(records: Sequence[Mapping[str, Any]], family: str = "llada",
                     ax: Any = None) -> Any:
    """Accuracy (%) against mean NFE per task for the settings whose label starts with
    `family` (e.g. "llada": k = 1, 2, 4, 8 tokens per step), one line per task, coloured by
    dependency level, from `bench quality --json` records. Returns the Axes."""
    rows = [r for r in records if str(r["setting"]).split(" ")[0] == family]
    if not rows:
        raise VizError(f"no records of settings named {family!r}; the file has "
                       f"{sorted({str(r['setting']) for r in records})}.")
    colours = {"low": "tab:green", "medium": "tab:orange", "high": "tab:red"}
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.6))
    for task in sorted({r["task"] for r in rows}):
        pts = sorted((float(r["nfe_mean"]), 100.0 * float(r["accuracy"]), r["dependency"])
                     for r in rows if r["task"] == task)
        xs, ys, dep = [p[0] for p in pts], [p[1] for p in pts], pts[0][2]
        ax.plot(xs, ys, "o-", color=colours.get(dep, "grey"), alpha=0.8)
        ax.annotate(task, (xs[0], ys[0]), fontsize=7, xytext=(3, 0),
                    textcoords="offset points")
    for dep, c in colours.items():
        ax.plot([], [], color=c, label=f"{dep} dependency")
    ax.set_xscale("log")
    ax.set_xlabel("mean forward passes per answer")
    ax.set_ylabel("accuracy %")
    ax.set_title(f"the dependency cliff: {family} settings, per task")
    ax.legend(fontsize="small")
    return ax


__all__ = ["ce_forecast_band", "dependency_cliff", "tspd_probability"]
