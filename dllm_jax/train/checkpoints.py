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


def check_resumable(ckpt_dir: Path) -> None:
    """Raise TrainError unless `ckpt_dir` holds a run to resume (its train_config.json)."""
    if not ckpt_dir.exists():
        why = "the folder does not exist"
    elif not ckpt_dir.is_dir():
        why = "it is not a folder"
    elif not any(ckpt_dir.iterdir()):
        why = "the folder is empty"
    elif not (ckpt_dir / TRAIN_CONFIG_FILE).is_file():
        why = f"the folder is not a dllm-jax training folder (no {TRAIN_CONFIG_FILE})"
    else:
        return
    raise TrainError(f"there is no checkpoint to resume in {ckpt_dir} ({why}); drop --resume to "
                     f"start a new run, or pass the --ckpt-dir of the run to continue.")


def check_outputs(out_dir: str | os.PathLike | None, ckpt_dir: str | os.PathLike | None,
                  overwrite: bool) -> None:
    """Before any work: the model folder can be written at the end (missing or empty, or
    replaceable with `overwrite`) and the checkpoint folder can be created."""
    from dllm_jax.checkpoint import CheckpointError, check_destination
    from dllm_jax.files import check_output_path

    if out_dir is not None:
        out = Path(os.path.expanduser(os.fspath(out_dir)))
        try:
            check_destination(out, overwrite)
        except CheckpointError as e:
            raise TrainError(str(e).replace("--overwrite (overwrite=True)", "--overwrite")
                             .replace("another destination", "another --out")) from None
        if not out.exists():
            check_output_path(out, "--out", create_parent=True)
    if ckpt_dir is not None:
        ck = Path(os.path.expanduser(os.fspath(ckpt_dir)))
        if ck.exists() and not ck.is_dir():
            raise TrainError(f"--ckpt-dir {ck} is a file; pass a folder.")
        if not ck.exists():
            check_output_path(ck, "--ckpt-dir", create_parent=True)


def prepare_ckpt_dir(ckpt_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, resume: bool
                      ) -> None:
    from dllm_jax.files import write_json

    record = json.loads(json.dumps(run_record(cfg, model_cfg)))  # as stored: tuples -> lists
    path = ckpt_dir / TRAIN_CONFIG_FILE
    if path.is_file():
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
            if not isinstance(stored, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise TrainError(f"{path} cannot be read ({e}); restore it, or start a new run in "
                             f"another --ckpt-dir.") from None
        if not resume:
            raise TrainError(
                f"{ckpt_dir} already holds checkpoints of a run; pass --resume to "
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
    write_json(path, record)


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



__all__ = ["check_outputs", "check_resumable", "open_manager", "prepare_ckpt_dir", "restore_checkpoint", "run_record",
           "save_checkpoint", "save_trained_model"]
