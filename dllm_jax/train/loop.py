"""The training loop: `train()` runs chunks of compiled steps, reports progress, checkpoints
and writes the model folder at the end.

    from dllm_jax.train import TrainConfig, train, bundled_model_config
    result = train(TrainConfig(steps=2000, batch_size=128), bundled_model_config(), "out/model")
    # or: dllm-jax train --out out/model --steps 2000 --batch-size 128
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dllm_jax import progress
from dllm_jax.config import ModelConfig
from dllm_jax.models import Params
from dllm_jax.train.checkpoints import (check_outputs, check_resumable, open_manager,
                                        prepare_ckpt_dir, restore_checkpoint, run_record,
                                        save_checkpoint, save_trained_model)
from dllm_jax.train.config import TrainConfig, TrainError, check_configs
from dllm_jax.train.data import DataPool, build_pool
from dllm_jax.train.step import StepSpec, init_state, lr_schedule, train_chunk


class Progress:
    """Training progress: a tqdm bar (`dllm_jax.progress`) with loss, tokens/s and lr on a
    terminal; on any other stream one log line per report (step, loss, tokens/s (all prompt
    + answer tokens), steps/s, lr, ETA), since a log file is a record, not a display."""

    def __init__(self, total: int, stream: Any = None, tokens_per_step: int = 0) -> None:
        self.total, self.stream, self.tokens_per_step = total, stream or sys.stderr, tokens_per_step
        self.tty = progress.shows_bar(False, self.stream)
        self._bar = None
        self._t, self._s = None, None

    def start(self, step: int) -> None:
        self._t, self._s = time.perf_counter(), step
        if self.tty:
            self._bar = progress.bar(self.total, "train", unit="step", stream=self.stream,
                                     initial=step)

    def update(self, step: int, loss: float, lr: float) -> dict[str, float]:
        now = time.perf_counter()
        last_t = now if self._t is None else self._t
        last_s = step if self._s is None else self._s
        dt = max(now - last_t, 1e-9)
        rate = (step - last_s) / dt
        self._t, self._s = now, step
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        tok = rate * self.tokens_per_step
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(f"loss {loss:.4f} | {tok / 1e3:.1f}k tok/s | lr {lr:.2e}")
        else:
            self.stream.write(f"step {step}/{self.total} | loss {loss:.4f} | {tok / 1e3:.1f}k "
                              f"tok/s | {rate:.1f} steps/s | lr {lr:.2e} | eta "
                              f"{_fmt_seconds(eta)}\n")
            self.stream.flush()
        return {"step": step, "loss": loss, "steps_per_s": rate, "tokens_per_s": tok}

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclasses.dataclass
class TrainResult:
    """params: float32 params at the end of this call; losses: per-step losses of the steps
    run by this call (`first_step` is the step of losses[0]); step: steps done in the run;
    seconds: wall time of the training loop; out_dir: the model folder (None if not written)."""

    params: Params
    losses: np.ndarray
    first_step: int
    step: int
    seconds: float
    out_dir: Path | None


def _chunk_ends(start: int, cfg: TrainConfig, stop: int) -> list[int]:
    ends = sorted({s for s in range(start + 1, stop + 1)
                   if s % cfg.log_every == 0 or s % cfg.ckpt_every == 0 or s == stop})
    return ends


def train(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    out_dir: str | os.PathLike | None,
    *,
    ckpt_dir: str | os.PathLike | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    time_limit: float | None = None,
    pool: tuple[DataPool, tuple[str, ...]] | None = None,
    save_dtype: str = "float32",
    overwrite: bool = False,
    stream: Any = None,
    quiet: bool = False,
) -> TrainResult:
    """Train (or continue training) a model with the masked-diffusion objective.

    Args:
      cfg, model_cfg: the run (see `TrainConfig`, `bundled_model_config`).
      out_dir: model folder written at the end of the run (None: do not write one).
      ckpt_dir: checkpoint folder (default `<out_dir>-ckpt`); None with out_dir None: no
        checkpoints.
      resume: continue from the latest checkpoint in `ckpt_dir` (same configs required).
      stop_at: stop after this step (a checkpoint is written), as if interrupted; resume later.
      time_limit: stop (with a checkpoint) at the first chunk end after this many seconds.
      pool: a prebuilt `build_pool(cfg)` to reuse.
      save_dtype: dtype of the saved model params ('float32' or 'bfloat16').
      overwrite: replace an existing model folder at `out_dir`.
      stream: where progress goes (default stderr); quiet: no progress.
    """
    check_configs(cfg, model_cfg)
    if ckpt_dir is None and out_dir is not None:
        ckpt_dir = f"{os.fspath(out_dir).rstrip(os.sep)}-ckpt"
    if resume:
        if ckpt_dir is None:
            raise TrainError("resume needs a checkpoint folder (ckpt_dir).")
        check_resumable(Path(ckpt_dir).absolute())
    check_outputs(out_dir, ckpt_dir, overwrite)
    spec = StepSpec.of(cfg, model_cfg)
    pool_, _ = pool if pool is not None else build_pool(cfg)
    mngr = None
    state = None
    if ckpt_dir is not None:
        ckpt_path = Path(ckpt_dir).absolute()
        prepare_ckpt_dir(ckpt_path, cfg, model_cfg, resume)
        mngr = open_manager(ckpt_path, cfg)
        latest = mngr.latest_step()
        if resume and latest is not None:
            state = restore_checkpoint(mngr, latest, cfg, model_cfg)
        elif resume and not quiet:
            print(f"{ckpt_path} holds the run's settings but no checkpoint step yet (it was "
                  f"stopped before its first save); starting from step 0.",
                  file=stream or sys.stderr)
    if state is None:
        state = init_state(cfg, model_cfg)
    start = int(state["step"])
    stop = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    schedule = lr_schedule(cfg)
    meta = {"run": run_record(cfg, model_cfg)}
    reporter = None if quiet else Progress(cfg.steps, stream, cfg.batch_size * cfg.seq_length)
    losses: list[np.ndarray] = []
    t0 = time.perf_counter()
    if reporter:
        reporter.start(start)
    step = start
    for end in _chunk_ends(start, cfg, stop):
        lrs = np.asarray(schedule(np.arange(step, end)), np.float32)
        state, metrics = train_chunk(state, pool_, lrs, spec)
        chunk_losses = np.asarray(metrics["loss"])
        losses.append(chunk_losses)
        step = end
        if not np.isfinite(chunk_losses).all():
            raise TrainError(f"the loss became {chunk_losses[-1]} by step {step}; lower --lr.")
        if reporter and (step % cfg.log_every == 0 or step == stop):
            reporter.update(step, float(chunk_losses[-1]), float(lrs[-1]))
        timed_out = time_limit is not None and time.perf_counter() - t0 > time_limit
        if mngr is not None and (step % cfg.ckpt_every == 0 or step == stop or timed_out):
            save_checkpoint(mngr, state, meta)
        if timed_out:
            break
    if reporter:
        reporter.close()
    if mngr is not None:
        mngr.wait_until_finished()
        mngr.close()
    seconds = time.perf_counter() - t0
    params = jax.device_get(state["params"])
    written = None
    if out_dir is not None and step >= cfg.steps:
        written = save_trained_model(out_dir, cfg, model_cfg, params, save_dtype=save_dtype,
                                     overwrite=overwrite, extra={"steps_done": step})
    return TrainResult(params=params, losses=np.concatenate(losses) if losses else np.zeros(0),
                       first_step=start, step=step, seconds=seconds, out_dir=written)



__all__ = ["Progress", "TrainResult", "train"]
