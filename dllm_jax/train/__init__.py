"""Masked-diffusion training of small models on the dependency tasks (`dllm_jax.tasks`).

One module per job:

- `config`: `TrainConfig` (one run, stored as JSON beside the checkpoints), `TrainError`,
  the bundled / tiny model shapes and `check_configs`.
- `data`: per-task pools of train-split instances on the device; the batch of a step.
- `objective`: the LLaDA masked-diffusion loss and SDAR-style block diffusion.
- `step`: optimiser (optax AdamW), learning-rate schedule, train state, compiled chunks.
- `checkpoints`: resumable orbax checkpoints and the finished model folder.
- `loop`: `train()`, the loop over chunks with progress reports.
- `evaluation`: held-out scores of a trained model (`dllm_jax.scoring.decode_and_score`).
- `cli`: `dllm-jax train`.
- `controller_fit`, `controller_fit_cli`: fitting the TSPD controller on a model's decode
  trajectories (`dllm-jax train-controller`); import them from their modules.

Usage:

    from dllm_jax.train import TrainConfig, train, bundled_model_config
    result = train(TrainConfig(steps=2000, batch_size=128), bundled_model_config(), "out/model")
    # or: dllm-jax train --out out/model --steps 2000 --batch-size 128
"""

from __future__ import annotations

from dllm_jax.train.checkpoints import save_trained_model
from dllm_jax.train.config import (TOKENIZER_FILES, TRAIN_CONFIG_FILE, TrainConfig, TrainError,
                                   bundled_model_config, check_configs, tiny_model_config)
from dllm_jax.train.data import (TRAIN_MIX, DataPool, batch_at, build_pool, data_key,
                                 encode_instances, load_pool, part_instances, sample_batch,
                                 save_pool, task_instances)
from dllm_jax.train.evaluation import evaluate, format_results
from dllm_jax.train.loop import Progress, TrainResult, train
from dllm_jax.train.objective import (block_diffusion_logits, loss_fn, masked_diffusion_loss,
                                      sample_noise)
from dllm_jax.train.step import StepSpec, init_state, lr_schedule, make_optimizer, train_chunk

__all__ = [
    "TrainConfig", "TrainError", "TrainResult", "DataPool", "StepSpec", "TRAIN_MIX",
    "bundled_model_config", "tiny_model_config", "build_pool", "task_instances",
    "encode_instances", "save_pool", "load_pool", "sample_batch", "batch_at", "data_key", "sample_noise",
    "masked_diffusion_loss", "block_diffusion_logits", "loss_fn", "lr_schedule",
    "make_optimizer", "init_state", "train_chunk", "train", "save_trained_model", "evaluate",
    "format_results",
    "TRAIN_CONFIG_FILE", "TOKENIZER_FILES", "check_configs", "part_instances", "Progress",
]
