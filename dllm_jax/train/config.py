"""What a training run is: `TrainConfig`, the model shapes it trains (bundled / tiny), and the
check that the two fit together. Every other module of `dllm_jax.train` reads these."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from dllm_jax.config import ConfigError, ModelConfig
from dllm_jax.session import TRAIN_CONFIG_FILE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class TrainError(ConfigError):
    """A training request that cannot run as given; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run (frozen; stored as JSON beside the checkpoints).

    Attributes:
      steps: optimiser steps of the whole run (the schedule's length).
      batch_size: sequences per step.
      lr: peak learning rate; warmup: linear warm-up steps from 0; end_lr_ratio: final
        learning rate as a fraction of `lr` (cosine decay in between).
      weight_decay, b1, b2: AdamW settings; grad_clip: global-norm clip (0: none).
      seed: everything random (init, data pools, batches, noise) derives from it.
      eps: t ~ U(eps, 1).
      ckpt_every: save a checkpoint every this many steps (and at the end); keep_checkpoints:
        how many the manager keeps.
      log_every: progress line every this many steps.
      block_diffusion: SDAR-style block diffusion (block-causal model, per-block t); needs a
        model config with `block_causal` and `block_size`.
      prompt_length, answer_length: fixed layout of a training sequence.
      pool_size: distinct train instances per task family kept on the device.
      task_set: "v1" (`dllm_jax.tasks.TASKS`, answers up to 32 tokens) or "v2"
        (`TASKS_V2`, answers of 64-256 tokens); the folder's train_config.json records it.
      tasks: task families of the set to mix (empty: all of them).
      compute_dtype: 'float32' or 'bfloat16' activations (params and optimiser stay float32).
      attn_impl: attention kernel of the training forward ('xla' is portable and differentiable
        with a mask everywhere).
      init_std: normal(0, init_std) initial weights.
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    grad_clip: float = 1.0
    seed: int = 0
    eps: float = 1e-3
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    block_diffusion: bool = False
    prompt_length: int = 32
    answer_length: int = 32
    pool_size: int = 20000
    task_set: str = "v1"
    tasks: tuple[str, ...] = ()
    compute_dtype: str = "float32"
    attn_impl: str = "xla"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "ckpt_every", "log_every", "prompt_length",
                     "answer_length", "pool_size", "keep_checkpoints"):
            if int(getattr(self, name)) <= 0:
                raise TrainError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.warmup < 0 or self.warmup >= self.steps:
            raise TrainError(f"warmup ({self.warmup}) must be in [0, steps={self.steps}); e.g. "
                             f"--warmup {max(0, self.steps // 10)}.")
        if not 0.0 < self.eps < 1.0:
            raise TrainError(f"eps must be in (0, 1), got {self.eps}.")
        if not self.lr > 0:
            raise TrainError(f"lr must be > 0, got {self.lr}.")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise TrainError(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}.")
        if self.attn_impl not in ("xla", "cudnn", "auto"):
            raise TrainError(f"attn_impl must be 'xla', 'cudnn' or 'auto', got {self.attn_impl!r}.")
        if self.task_set not in ("v1", "v2"):
            raise TrainError(f"task_set must be 'v1' or 'v2', got {self.task_set!r}; e.g. "
                             f"--task-set v2.")
        object.__setattr__(self, "tasks", tuple(self.tasks))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainError(f"unknown TrainConfig fields {unknown}.")
        d = dict(d)
        if "tasks" in d:
            d["tasks"] = tuple(d["tasks"])
        return cls(**d)

    @property
    def task_registry(self) -> Mapping[str, Any]:
        """`{name: Task}` of this run's task set."""
        from dllm_jax.tasks import TASK_SETS

        return TASK_SETS[self.task_set]

    @property
    def task_names(self) -> tuple[str, ...]:
        registry = self.task_registry
        names = self.tasks or tuple(registry)
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise TrainError(f"unknown {self.task_set} tasks {unknown}; valid tasks: "
                             f"{', '.join(registry)}.")
        return names

    @property
    def seq_length(self) -> int:
        return self.prompt_length + self.answer_length


def bundled_model_config(vocab_size: int | None = None, prompt_length: int = 32,
                         answer_length: int = 32, block_size: int = 0) -> ModelConfig:
    """The shapes of the bundled model: LLaDA architecture, ~4.6M params (hidden 256, 6 layers,
    8 heads of 32, SwiGLU 640), the task tokenizer's vocabulary and special ids; with
    `block_size` > 0 a block-causal variant for block diffusion."""
    from dllm_jax.tasks.vocab import EOS_ID, MASK_ID, PAD_ID, task_vocabulary

    return ModelConfig(
        arch="llada", vocab_size=vocab_size or len(task_vocabulary()), hidden_size=256,
        num_layers=6, num_heads=8, num_kv_heads=8, head_dim=32, intermediate_size=640,
        rope_theta=10000.0, rms_norm_eps=1e-5, max_position=prompt_length + answer_length,
        mask_token_id=MASK_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        block_causal=block_size > 0, block_size=block_size)


def tiny_model_config(vocab_size: int | None = None, prompt_length: int = 32,
                      answer_length: int = 32, block_size: int = 0) -> ModelConfig:
    """A test-sized LLaDA config over the task tokenizer (hidden 64, 2 layers)."""
    return bundled_model_config(vocab_size, prompt_length, answer_length, block_size).replace(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
        intermediate_size=128)


def bench_model_config(vocab_size: int | None = None, prompt_length: int = 64,
                       answer_length: int = 257, block_size: int = 0) -> ModelConfig:
    """The shapes of the v2 benchmark models: LLaDA architecture (bidirectional, or with
    `block_size` > 0 block-causal as SDAR), ~5M params (hidden 256, 6 layers, 8 heads of 32,
    SwiGLU 768): as large as a 5-minute H200 run trains and two of them fit the repository
    in bfloat16 (10 MB each)."""
    return bundled_model_config(vocab_size, prompt_length, answer_length, block_size).replace(
        intermediate_size=768)


MODEL_SIZES = {"bundled": bundled_model_config, "tiny": tiny_model_config,
               "bench": bench_model_config}


def check_configs(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """Refuse model / training configs that do not fit together (plain sentences)."""
    if cfg.seq_length > model_cfg.max_position:
        raise TrainError(
            f"prompt_length + answer_length = {cfg.seq_length} exceeds the model's max_position "
            f"{model_cfg.max_position}.")
    if cfg.block_diffusion and not model_cfg.block_causal:
        raise TrainError("block_diffusion needs a block-causal model (block_causal=True and a "
                         "block_size); e.g. --block-size 8.")
    if model_cfg.block_causal and not cfg.block_diffusion:
        raise TrainError("the model is block-causal: train it with block_diffusion=True "
                         "(--block-diffusion).")
    from dllm_jax.tasks.vocab import MASK_ID, task_vocabulary

    if model_cfg.vocab_size < len(task_vocabulary()):
        raise TrainError(f"vocab_size {model_cfg.vocab_size} is smaller than the task tokenizer "
                         f"({len(task_vocabulary())} tokens).")
    if model_cfg.mask_token_id != MASK_ID:
        raise TrainError(f"mask_token_id must be the task tokenizer's <mask> ({MASK_ID}).")



__all__ = ["MODEL_SIZES", "TOKENIZER_FILES", "TRAIN_CONFIG_FILE", "TrainConfig", "TrainError",
           "bench_model_config", "bundled_model_config", "check_configs", "tiny_model_config"]
