"""What a run leaves on disk: resumable orbax checkpoints and the finished model folder.

Checkpoints: `orbax.checkpoint.CheckpointManager` in `ckpt_dir` (one step folder per save,
`keep_checkpoints` kept) with `ocp.args.Composite(state=StandardSave({params, opt_state, step,
data_key}), meta=JsonSave(...))`; `train_config.json` beside them records the run, and a
resume refuses a different configuration. At the end `save_trained_model(out_dir, ...)` writes
a model folder with the task tokenizer (`tokenizer.json`, `tokenizer_config.json`) and
`train_config.json`: `load_model(out_dir)` and `Tokenizer.from_dir(out_dir)` read it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax.checkpoint import save_model
from dllm_jax.config import ModelConfig
from dllm_jax.models import Params
from dllm_jax.train.config import TOKENIZER_FILES, TRAIN_CONFIG_FILE, TrainConfig, TrainError
from dllm_jax.train.step import init_state


def open_manager(ckpt_dir: Path, cfg: TrainConfig) -> Any:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True)
    return ocp.CheckpointManager(ckpt_dir, options=options)


def save_checkpoint(mngr: Any, state: dict[str, Any], meta: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    step = int(state["step"])
    host = jax.device_get(state)  # a host copy: the device buffers are donated to the next chunk
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host),
                                            meta=ocp.args.JsonSave(meta)), force=True)


def restore_checkpoint(mngr: Any, step: int, cfg: TrainConfig, model_cfg: ModelConfig
                        ) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        jax.eval_shape(lambda: init_state(cfg, model_cfg)))
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          meta=ocp.args.JsonRestore()))
    return restored["state"]


def run_record(cfg: TrainConfig, model_cfg: ModelConfig) -> dict[str, Any]:
    return {"train": cfg.to_dict(), "model": model_cfg.to_dict()}


def prepare_ckpt_dir(ckpt_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, resume: bool
                      ) -> None:
    record = run_record(cfg, model_cfg)
    path = ckpt_dir / TRAIN_CONFIG_FILE
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        if not resume:
            raise TrainError(
                f"{ckpt_dir} already holds checkpoints of a run; pass --resume (resume=True) to "
                f"continue it, or choose another --ckpt-dir / remove it.")
        if stored != record:
            diff = sorted(
                f"{part}.{k}" for part in ("train", "model")
                for k in set(stored.get(part, {})) | set(record[part])
                if stored.get(part, {}).get(k) != record[part].get(k))
            raise TrainError(
                f"cannot resume: the run in {ckpt_dir} was configured differently ({', '.join(diff)}); "
                f"resume with the same settings or start a new --ckpt-dir.")
        return
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise TrainError(f"{ckpt_dir} exists and is not a dllm-jax training folder (no "
                         f"{TRAIN_CONFIG_FILE}); choose another --ckpt-dir.")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def save_trained_model(out_dir: str | os.PathLike, cfg: TrainConfig, model_cfg: ModelConfig,
                       params: Params, *, save_dtype: str = "float32", overwrite: bool = False,
                       extra: Mapping[str, Any] | None = None) -> Path:
    """Write a complete model folder: params (as `save_dtype`), config, the task tokenizer and
    `train_config.json` (the run, plus `extra`)."""
    from dllm_jax.tasks.vocab import build_task_tokenizer

    dtype = jnp.dtype(save_dtype)
    host = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, dtype)), params)
    with tempfile.TemporaryDirectory() as tmp:
        build_task_tokenizer(tmp)
        record = {**run_record(cfg, model_cfg), **dict(extra or {})}
        rec_path = os.path.join(tmp, TRAIN_CONFIG_FILE)
        with open(rec_path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        files = {name: os.path.join(tmp, name) for name in (*TOKENIZER_FILES, TRAIN_CONFIG_FILE)}
        return save_model(out_dir, model_cfg, host, overwrite=overwrite, extra_files=files)



__all__ = ["open_manager", "prepare_ckpt_dir", "restore_checkpoint", "run_record",
           "save_checkpoint", "save_trained_model"]
