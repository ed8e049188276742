"""Fit TSPD parameters on trajectories recorded from a model (works with any model).

1. Reference: decode every prompt one token per step (`low_confidence`, steps = gen_length);
   its final tokens are the labels' target.
2. Record: decode the same prompts with `generate(trace=True)` under a few controllers (the
   reference decode itself and Fast-dLLM thresholds by default), so the recorded states cover
   slow and parallel decoding alike.
3. Replay: fold each trace through `features.update_trajectory` (the same function, filter
   and momentum the decode loop uses) and `tspd.tspd_features`, so the fitted model sees
   exactly the features the controller computes at decode time.
4. Label each (step, masked position): 1 when its current candidate equals the reference's
   final token at that position.
5. Fit `TSPDParams` with optax (Adam, full batch) on the weighted logistic loss
   sum_i w_i BCE(logit_i, y_i) / sum_i w_i + l2 * |weights|^2, w_i = 1 for positives and
   `neg_weight` for negatives (> 1 makes a wrong commit dearer than a late one). Prompts are
   split into fit / validation groups; the metrics report both, and the validation precision
   and recall of the commit rule p > tau next to those of confidence >= 0.9.

`dllm-jax train-controller --model DIR` (`controller_fit_cli`) runs this on training-split
task instances (`dllm_jax.tasks`) and writes DIR/tspd.json (or --out FILE).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from controllers.baselines import LowConfidence, Threshold
from controllers.ce import py_logit
from controllers.tspd import TSPD, TSPDParams, feature_names, tspd_features
from dllm_jax import features as F
from dllm_jax.config import ConfigError, GenerateConfig
from dllm_jax.features import CEFilter
from dllm_jax.state import Features, Trajectory


@dataclasses.dataclass
class Recording:
    """Labelled feature rows. x: float32 `[N, F]`; y: float32 `[N]` (1 = converged);
    group: int32 `[N]` prompt index; source: int32 `[N]` index of the recording controller;
    features: the column names; sources: the recording controllers' labels."""

    x: np.ndarray
    y: np.ndarray
    group: np.ndarray
    source: np.ndarray
    features: tuple[str, ...]
    sources: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.y.shape[0])


def batches(prompts: np.ndarray, valid: np.ndarray, batch_size: int
             ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Fixed-size chunks (the last one padded with copies of its first row: rows never affect
    each other, and one shape means one compile). Yields (start, n_real, ids, valid)."""
    n = prompts.shape[0]
    for i in range(0, n, batch_size):
        ids, ok = prompts[i:i + batch_size], valid[i:i + batch_size]
        k = ids.shape[0]
        if k < batch_size and n > batch_size:
            pad = batch_size - k
            ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
            ok = np.concatenate([ok, np.repeat(ok[:1], pad, 0)])
        yield i, k, ids, ok


def reference_config(gen: GenerateConfig) -> GenerateConfig:
    """One token per step: steps = gen_length, same answer and block lengths, traced."""
    return dataclasses.replace(gen, steps=gen.gen_length, trace=True, cache="none",
                               refresh_every=0)


@functools.partial(jax.jit, static_argnames=("gen", "vocab_size", "use_ce", "horizon",
                                             "ce_filter"))
def replay_features(trace: Mapping[str, jax.Array], *, gen: GenerateConfig, vocab_size: int,
                    use_ce: bool, horizon: int, ce_filter: Optional[CEFilter]
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Recompute what TSPD sees at each step of a recorded decode.

    trace: `DecodeStats.trace` of a `generate(..., GenerateConfig(trace=True))` call.
    Returns (x `[S, B, Lb, F]`, live `[S, B, Lb]` (a masked position of a step that ran),
    a0 `[S]` answer index of the active block's start).
    """
    lb = gen.block_length
    b = trace["candidate"].shape[1]
    filt = ce_filter if use_ce else None
    xs = {k: trace[k] for k in ("candidate", "confidence", "entropy", "margin", "masked",
                                "block")}

    def body(traj: Trajectory, s: Mapping[str, jax.Array]):
        live = s["block"] >= 0
        a0 = jnp.maximum(s["block"], 0) * lb
        masked = s["masked"] & live
        feats = Features(candidate=s["candidate"], confidence=s["confidence"],
                         entropy=s["entropy"], margin=s["margin"], masked=masked)
        win = F.update_trajectory(traj.window(a0, lb), feats, gen.momentum_beta, filt)
        x = tspd_features(feats, win, vocab_size, use_ce, horizon, ce_filter)
        return traj.write_window(a0, win), (x, masked, a0)

    _, out = jax.lax.scan(body, Trajectory.zeros(b, gen.gen_length), xs)
    return out


def content_end(ref: np.ndarray, eos_id: int) -> np.ndarray:
    """int `[B]`: index of the last content position of each reference answer `[B, G]` (its
    first EOS; G - 1 without one). Positions after it are EOS padding."""
    is_eos = ref == eos_id
    return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), ref.shape[1] - 1)


def _label_rows(x: np.ndarray, live: np.ndarray, a0: np.ndarray, cand: np.ndarray,
                ref: np.ndarray, last: Optional[np.ndarray] = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the live entries: (x [n, F], y [n], row index b [n]); with `last` `[B]` only
    positions up to each row's last content position (`content_end`)."""
    s, b, lb = live.shape
    pos = a0[:, None, None] + np.arange(lb)[None, None, :]                  # [S, 1, Lb]
    pos = np.broadcast_to(np.minimum(pos, ref.shape[1] - 1), (s, b, lb))
    rows = np.broadcast_to(np.arange(b)[None, :, None], (s, b, lb))
    y = (cand == ref[rows, pos])
    if last is not None:
        live = live & (pos <= last[rows])
    return x[live], y[live].astype(np.float32), rows[live].astype(np.int32)


def record(params: Any, cfg: Any, prompts: Any, prompt_valid: Any = None, *,
           gen: GenerateConfig, controllers: Optional[Sequence[tuple[str, Any]]] = None,
           thresholds: Sequence[float] = (0.9, 0.7), include_reference: bool = True,
           use_ce: bool = True, horizon: int = 2, ce_filter: CEFilter = CEFilter(),
           batch_size: int = 32, key: Optional[jax.Array] = None,
           content_only: bool = False, quiet: bool = True) -> Recording:
    """Record labelled TSPD feature rows from `params` on `prompts` (see the module doc).

    Args:
      params, cfg: any model. prompts: int `[N, P]` left-padded; prompt_valid: bool `[N, P]`.
      gen: answer/block length (and momentum) of the decodes; its `steps` is ignored by the
        threshold recorders and replaced by gen_length for the reference.
      controllers: (label, controller) pairs to record with; default: Fast-dLLM `thresholds`.
      include_reference: also record the reference (one token per step) decode's own trace.
      use_ce, horizon, ce_filter: the TSPD feature settings to compute.
      content_only: keep only rows of content positions (up to and including the reference
        answer's first EOS), so that EOS padding, which commits in the first forwards, does
        not dominate the fit.
      quiet: False draws a progress bar over the decodes (on a terminal).
    """
    from dllm_jax import progress
    from dllm_jax.decode import generate

    prompts = np.asarray(prompts, np.int32)
    if prompts.ndim != 2 or prompts.shape[0] == 0:
        raise ConfigError(f"record needs a [N, P] batch of prompts, got shape {prompts.shape}.")
    valid = (np.ones(prompts.shape, bool) if prompt_valid is None
             else np.asarray(prompt_valid, bool))
    key = jax.random.key(0) if key is None else key
    if controllers is None:
        controllers = [(f"threshold {t}", Threshold(threshold=float(t))) for t in thresholds]
    ref_gen = reference_config(gen)
    rec_gen = dataclasses.replace(gen, trace=True)
    opts = dict(vocab_size=int(cfg.vocab_size), use_ce=use_ce, horizon=int(horizon),
                ce_filter=ce_filter)
    names = feature_names(use_ce)
    xs, ys, gs, ss = [], [], [], []
    labels = (["reference"] if include_reference else []) + [c[0] for c in controllers]

    def add(out: Any, src: int, start: int, k: int, ref: np.ndarray, g: GenerateConfig) -> None:
        tr = out.stats.trace
        x, live, a0 = replay_features(tr, gen=g, **opts)
        last = content_end(ref[:k], int(cfg.eos_token_id)) if content_only else None
        x, y, rows = _label_rows(np.asarray(x)[:, :k], np.asarray(live)[:, :k],
                                 np.asarray(a0), np.asarray(tr["candidate"])[:, :k], ref[:k],
                                 last)
        xs.append(x), ys.append(y), gs.append(rows + start)
        ss.append(np.full(y.shape, src, np.int32))

    n_batches = -(-prompts.shape[0] // batch_size)
    pbar = progress.bar(n_batches * (1 + len(controllers)), "record", quiet=quiet, unit="decode")
    for start, k, ids, ok in batches(prompts, valid, batch_size):
        ref_out = generate(params, cfg, ids, ref_gen, LowConfidence(), prompt_valid=ok, key=key)
        ref = np.asarray(ref_out.tokens)
        pbar.update(1)
        if include_reference:
            add(ref_out, 0, start, k, ref, ref_gen)
        for j, (_, ctrl) in enumerate(controllers):
            out = generate(params, cfg, ids, rec_gen, ctrl, prompt_valid=ok, key=key)
            add(out, j + int(include_reference), start, k, ref, rec_gen)
            pbar.update(1)
    pbar.close()
    return Recording(x=np.concatenate(xs).astype(np.float32), y=np.concatenate(ys),
                     group=np.concatenate(gs), source=np.concatenate(ss), features=names,
                     sources=tuple(labels))


#: Feature groups an ablation can drop (`fit_tspd(drop=...)`), by column name.
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "ce": ("ce_mean", "ce_log_sd"),
    "position": ("rel_pos", "dist_committed", "frac_committed"),
    "momentum": ("momentum",),
}


def dropped_columns(features: Sequence[str], drop: Sequence[str]) -> list[int]:
    """Column indices of the feature groups in `drop` (see FEATURE_GROUPS)."""
    unknown = [g for g in drop if g not in FEATURE_GROUPS]
    if unknown:
        raise ConfigError(f"unknown feature groups {unknown}; choose from "
                          f"{', '.join(FEATURE_GROUPS)}.")
    names = [n for g in drop for n in FEATURE_GROUPS[g]]
    return [i for i, f in enumerate(features) if f in names]


def _split_groups(group: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """bool [N]: rows of the validation prompts (none when fewer than 2 prompts)."""
    uniq = np.unique(group)
    n_val = int(math.ceil(val_fraction * len(uniq))) if val_fraction > 0 else 0
    if len(uniq) < 2 or n_val == 0:
        return np.zeros(group.shape, bool)
    n_val = min(n_val, len(uniq) - 1)
    val = np.random.default_rng(seed).permutation(uniq)[:n_val]
    return np.isin(group, val)


def _weights(y: jax.Array, neg_weight: float) -> jax.Array:
    return jnp.where(y > 0.5, 1.0, jnp.float32(neg_weight))


def weighted_loss(p: TSPDParams, x: jax.Array, y: jax.Array, neg_weight: float = 1.0
                  ) -> jax.Array:
    """The weighted mean logistic loss (no penalty)."""
    w = _weights(y, neg_weight)
    return jnp.sum(w * optax.sigmoid_binary_cross_entropy(p.logit(x), y)) / jnp.sum(w)


@functools.partial(jax.jit, static_argnames=("steps", "lr", "l2", "neg_weight"))
def _optimise(p0: TSPDParams, x: jax.Array, y: jax.Array, *, steps: int, lr: float, l2: float,
              neg_weight: float) -> tuple[TSPDParams, jax.Array]:
    trainable = ("w", "b", "w1", "b1", "w2")
    theta0 = {k: getattr(p0, k) for k in trainable}
    opt = optax.adam(lr)

    def objective(theta: dict[str, jax.Array]) -> jax.Array:
        p = p0.replace(**theta)
        pen = jnp.sum(theta["w"] ** 2) + jnp.sum(theta["w1"] ** 2) + jnp.sum(theta["w2"] ** 2)
        return weighted_loss(p, x, y, neg_weight) + l2 * pen

    def step(carry, _):
        theta, st = carry
        loss, g = jax.value_and_grad(objective)(theta)
        upd, st = opt.update(g, st, theta)
        return (optax.apply_updates(theta, upd), st), loss

    (theta, _), losses = jax.lax.scan(step, (theta0, opt.init(theta0)), None, length=steps)
    return p0.replace(**theta), losses


def _rule_stats(commit: np.ndarray, y: np.ndarray) -> dict[str, float]:
    n_commit = int(commit.sum())
    return {"precision": float(y[commit].mean()) if n_commit else float("nan"),
            "recall": float(commit[y > 0.5].mean()) if (y > 0.5).any() else float("nan"),
            "commit_rate": float(commit.mean()) if commit.size else float("nan")}


def fit_tspd(rec: Recording, *, vocab_size: int, hidden: int = 16, steps: int = 400,
             lr: float = 0.02, l2: float = 1e-4, neg_weight: float = 1.0,
             val_fraction: float = 0.2, max_rows: int = 500_000, tau: float = 0.5,
             use_ce: bool = True, horizon: int = 2, ce_filter: CEFilter = CEFilter(),
             seed: int = 0, drop: Sequence[str] = ()) -> tuple[TSPD, dict[str, Any]]:
    """Fit TSPD parameters on `rec`; returns (controller, metrics). See the module doc.

    drop: feature groups to leave out (ablations): "ce" (the CE forecast), "position"
      (position in the block, distance to decoded, decoded fraction), "momentum"; their
      columns are zeroed for the fit and their weights are zero in the result, so the
      fitted controller ignores them at decode time too.
    """
    if len(rec) == 0:
        raise ConfigError("no recorded rows to fit on; record more prompts.")
    if tuple(rec.features) != feature_names(use_ce):
        raise ConfigError(f"the recording has features {rec.features}, use_ce={use_ce} needs "
                          f"{feature_names(use_ce)}; record with the same use_ce.")
    if steps <= 0 or hidden < 0 or lr <= 0 or neg_weight <= 0 or not 0 < tau < 1:
        raise ConfigError("fit needs steps > 0, hidden >= 0, lr > 0, neg_weight > 0 and tau in "
                          "(0, 1).")
    dropped = dropped_columns(rec.features, drop)
    if dropped:
        rec = dataclasses.replace(rec, x=rec.x.copy())
        rec.x[:, dropped] = 0.0
    rng = np.random.default_rng(seed)
    val = _split_groups(rec.group, val_fraction, seed)
    tr_idx, va_idx = np.flatnonzero(~val), np.flatnonzero(val)
    if len(tr_idx) > max_rows:
        tr_idx = np.sort(rng.choice(tr_idx, max_rows, replace=False))
    x_tr, y_tr = rec.x[tr_idx], rec.y[tr_idx]
    n_feat = x_tr.shape[1]
    mean = x_tr.mean(0)
    scale = np.maximum(x_tr.std(0), 1e-2)
    pos = float(np.clip(np.average(y_tr > 0.5, weights=np.where(y_tr > 0.5, 1.0, neg_weight)),
                        1e-4, 1 - 1e-4))
    k1 = jax.random.key(seed)
    p0 = TSPDParams.zeros(n_feat, hidden).replace(
        x_mean=jnp.asarray(mean, jnp.float32), x_scale=jnp.asarray(scale, jnp.float32),
        b=jnp.float32(py_logit(pos)),
        w1=jax.random.normal(k1, (n_feat, hidden), jnp.float32) * (0.5 / math.sqrt(n_feat)))
    xj, yj = jnp.asarray(x_tr), jnp.asarray(y_tr)
    loss_init = float(weighted_loss(p0, xj, yj, neg_weight))
    p, losses = _optimise(p0, xj, yj, steps=int(steps), lr=float(lr), l2=float(l2),
                          neg_weight=float(neg_weight))
    if dropped:  # a dropped column contributes nothing, also where decode sees its real value
        idx = jnp.asarray(dropped)
        p = p.replace(w=p.w.at[idx].set(0.0), w1=p.w1.at[idx].set(0.0),
                      x_mean=p.x_mean.at[idx].set(0.0), x_scale=p.x_scale.at[idx].set(1.0))
    ctrl = TSPD(params=p, tau=float(tau), vocab_size=int(vocab_size), use_ce=use_ce,
                horizon=int(horizon), ce_filter=ce_filter)
    metrics: dict[str, Any] = {
        "n_rows": len(rec), "n_fit": int(len(tr_idx)), "n_val": int(len(va_idx)),
        "n_prompts": int(len(np.unique(rec.group))), "sources": list(rec.sources),
        "pos_rate": float(rec.y.mean()), "hidden": int(hidden), "steps": int(steps),
        "lr": float(lr), "l2": float(l2), "neg_weight": float(neg_weight),
        "loss_init": loss_init, "loss_fit": float(weighted_loss(p, xj, yj, neg_weight)),
        "objective_first": float(losses[0]), "objective_last": float(losses[-1]),
        "dropped": sorted(set(drop)),
    }
    ev = va_idx if len(va_idx) else tr_idx
    x_ev, y_ev = rec.x[ev], rec.y[ev]
    z = np.asarray(p.logit(jnp.asarray(x_ev)))
    metrics["eval_on"] = "validation prompts" if len(va_idx) else "fit rows"
    metrics["loss_eval"] = float(weighted_loss(p, jnp.asarray(x_ev), jnp.asarray(y_ev),
                                               neg_weight))
    metrics["accuracy_eval"] = float(((z > 0) == (y_ev > 0.5)).mean())
    metrics["tspd_at_tau"] = _rule_stats(z > py_logit(tau), y_ev)
    metrics["threshold_0.9"] = _rule_stats(x_ev[:, 0] >= py_logit(0.9), y_ev)
    return ctrl, metrics


def train_controller(params: Any, cfg: Any, prompts: Any, prompt_valid: Any = None, *,
                     gen: GenerateConfig, thresholds: Sequence[float] = (0.9, 0.7),
                     include_reference: bool = True, use_ce: bool = True, horizon: int = 2,
                     ce_filter: CEFilter = CEFilter(), batch_size: int = 32,
                     key: Optional[jax.Array] = None, content_only: bool = False,
                     quiet: bool = True, **fit_kwargs: Any) -> tuple[TSPD, dict[str, Any]]:
    """`record` then `fit_tspd`; `fit_kwargs` go to `fit_tspd` (hidden, steps, lr, tau, drop,
    ...)."""
    rec = record(params, cfg, prompts, prompt_valid, gen=gen, thresholds=thresholds,
                 include_reference=include_reference, use_ce=use_ce, horizon=horizon,
                 ce_filter=ce_filter, batch_size=batch_size, key=key, content_only=content_only,
                 quiet=quiet)
    return fit_tspd(rec, vocab_size=int(cfg.vocab_size), use_ce=use_ce, horizon=horizon,
                    ce_filter=ce_filter, **fit_kwargs)


__all__ = ["FEATURE_GROUPS", "Recording", "batches", "content_end", "dropped_columns", "fit_tspd",
           "record", "reference_config", "replay_features", "train_controller", "weighted_loss"]
