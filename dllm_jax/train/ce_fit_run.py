"""Record decodes of a model, fit its CE filter and choose its look-ahead (`--fit ce`).

1. Record: decode the prompts one token per step (`low_confidence`, steps = gen_length,
   `controller_fit.reference_config`) with `trace=True`: the least censored source, since a
   position stops being observed once committed and a parallel decoder commits the rising
   trajectories early (`ce_fit`'s docstring). Optionally also Fast-dLLM threshold decodes.
   Each trace becomes per-position log-odds sequences (`ce_fit.observation_sequences`), by
   default only of content positions (up to and including the reference answer's first EOS,
   `controller_fit.content_end`): EOS padding is confident from the first forward and would
   dominate the fit.
2. Split by prompt into fit / validation (`ce_fit.split_sequences`).
3. Fit (q, r, slope_var0) on the fit part (`ce_fit.fit_ce_filter`, h-step predictive
   log-likelihood), and choose (z, horizon) on the validation part (`ce_fit.choose_z_h`:
   the smallest calibrated z per horizon, the horizon that fires most).
`fit_ce` returns a `controllers.ce_fitted.CEFit`, which `dllm-jax train-controller --fit ce`
writes to MODEL/ce.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import numpy as np

from controllers.baselines import LowConfidence, Threshold
from controllers.ce_fitted import CEFit
from dllm_jax.config import ConfigError, GenerateConfig
from dllm_jax.train import ce_fit as C
from dllm_jax.train.controller_fit import batches, content_end, reference_config


def record_sequences(params: Any, cfg: Any, prompts: Any, prompt_valid: Any = None, *,
                     gen: GenerateConfig, thresholds: Sequence[float] = (),
                     batch_size: int = 32, key: Optional[jax.Array] = None,
                     content_only: bool = True, quiet: bool = True
                     ) -> tuple[C.ObservationSequences, list[str]]:
    """Observation sequences of the reference decode (+ one per threshold) of every prompt.

    prompts int `[N, P]` left-padded, prompt_valid bool `[N, P]`. `row` of the result is the
    prompt index (the same for every source, so a fit / validation split by row keeps a
    prompt's sequences together). Returns (sequences, the sources' labels).
    """
    from dllm_jax import progress
    from dllm_jax.decode import generate

    prompts = np.asarray(prompts, np.int32)
    if prompts.ndim != 2 or prompts.shape[0] == 0:
        raise ConfigError(f"record needs a [N, P] batch of prompts, got shape {prompts.shape}.")
    valid = (np.ones(prompts.shape, bool) if prompt_valid is None
             else np.asarray(prompt_valid, bool))
    key = jax.random.key(0) if key is None else key
    ref_gen, rec_gen = reference_config(gen), dataclasses.replace(gen, trace=True)
    sources = ["reference"] + [f"threshold {t}" for t in thresholds]
    seqs: list[C.ObservationSequences] = []
    n_batches = -(-prompts.shape[0] // batch_size)
    pbar = progress.bar(n_batches * len(sources), "record", quiet=quiet, unit="decode")
    for start, k, ids, ok in batches(prompts, valid, batch_size):
        ref_out = generate(params, cfg, ids, ref_gen, LowConfidence(), prompt_valid=ok, key=key)
        ref = np.asarray(ref_out.tokens)
        keep = np.zeros(ref.shape, bool)                         # [B, G]: real rows only
        last = (content_end(ref[:k], int(cfg.eos_token_id)) if content_only
                else np.full(k, ref.shape[1] - 1))
        keep[:k] = np.arange(ref.shape[1])[None, :] <= last[:, None]
        outs = [ref_out]
        pbar.update(1)
        for t in thresholds:
            outs.append(generate(params, cfg, ids, rec_gen, Threshold(threshold=float(t)),
                                 prompt_valid=ok, key=key))
            pbar.update(1)
        for out in outs:
            tr = {k_: np.asarray(v) for k_, v in out.stats.trace.items()}
            seqs.append(C.observation_sequences(tr, positions=keep, row_offset=start))
    pbar.close()
    return C.concat_sequences(seqs), sources


def fit_ce(seqs: C.ObservationSequences, *, horizons: Sequence[int] = (1, 2),
           steps: int = 400, lr: float = 0.05, zs: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 3.0),
           choose_horizons: Sequence[int] = (1, 2, 3, 4), threshold: float = 0.9,
           val_fraction: float = 0.25, seed: int = 0) -> CEFit:
    """Fit the filter on the fit split and choose (z, horizon) on the validation split."""
    if len(np.unique(seqs.row)) < 2:
        raise ConfigError("the CE fit needs sequences of at least 2 prompts (one for "
                          "validation); record more prompts (--n).")
    fit_part, val_part = C.split_sequences(seqs, val_fraction, seed)
    filt, metrics = C.fit_ce_filter(fit_part.y, fit_part.valid, fit_part.restart,
                                    horizons=horizons, steps=steps, lr=lr)
    table, chosen = C.choose_z_h(filt, val_part.y, val_part.valid, val_part.restart, zs=zs,
                                 horizons=choose_horizons, threshold=threshold)
    _, default_choice = C.choose_z_h(C.CEFilter(), val_part.y, val_part.valid,
                                     val_part.restart, zs=zs, horizons=choose_horizons,
                                     threshold=threshold)
    metrics.update(
        n_sequences_total=int(seqs.y.shape[0]), n_sequences_fit=int(fit_part.y.shape[0]),
        n_sequences_val=int(val_part.y.shape[0]),
        n_prompts_fit=int(len(np.unique(fit_part.row))),
        n_prompts_val=int(len(np.unique(val_part.row))),
        observations=int(seqs.valid.sum()), val_fraction=float(val_fraction),
        loglik_val_init=float(C.predictive_log_likelihood(
            C.CEFilter(), val_part.y, val_part.valid, val_part.restart, horizons)),
        loglik_val_fit=float(C.predictive_log_likelihood(
            filt, val_part.y, val_part.valid, val_part.restart, horizons)),
        default_filter_choice=default_choice)
    return CEFit(ce_filter=filt, z=float(chosen["z"]), horizon=int(chosen["h"]),
                 calibrated=bool(chosen["calibrated"]), threshold=float(threshold),
                 coverage=tuple(table), metrics=metrics)


__all__ = ["fit_ce", "record_sequences"]
