"""The compiled training step: optimiser, learning-rate schedule, train state and chunks.

Optimiser: `optax.adamw` (wrapped by `optax.inject_hyperparams`, so the compiled step takes
the learning rate as an input) after global-norm clipping; the learning rate follows
`optax.warmup_cosine_decay_schedule(0, lr, warmup, steps, lr * end_lr_ratio)`, evaluated per
step on the host. Several steps run in one compiled `lax.scan` (a chunk); `loop.train` ends
chunks at every multiple of `log_every` and `ckpt_every`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dllm_jax.config import ModelConfig
from dllm_jax.models import Params, init_params
from dllm_jax.train.config import TrainConfig
from dllm_jax.train.data import DataPool, batch_at, data_key
from dllm_jax.train.objective import loss_fn


def lr_schedule(cfg: TrainConfig) -> Callable[[Any], Any]:
    """optax warm-up + cosine decay over the whole run."""
    import optax

    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps,
                                              cfg.lr * cfg.end_lr_ratio)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static part of the compiled training step (a jit static argument): everything but
    the learning rate, so runs that differ only in lr / warmup / steps share one compile."""

    model_cfg: ModelConfig
    batch_size: int
    eps: float
    block_diffusion: bool
    compute_dtype: str
    attn_impl: str
    b1: float
    b2: float
    weight_decay: float
    grad_clip: float

    @classmethod
    def of(cls, cfg: TrainConfig, model_cfg: ModelConfig) -> "StepSpec":
        return cls(model_cfg, cfg.batch_size, cfg.eps, cfg.block_diffusion, cfg.compute_dtype,
                   cfg.attn_impl, cfg.b1, cfg.b2, cfg.weight_decay, cfg.grad_clip)


def make_optimizer(spec: StepSpec) -> Any:
    """clip_by_global_norm -> adamw (learning rate injected per step)."""
    import optax

    adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=spec.b1, b2=spec.b2,
                                                  weight_decay=spec.weight_decay)
    if spec.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(spec.grad_clip), adamw)
    return optax.chain(optax.identity(), adamw)


def _set_lr(opt_state: Any, lr: jax.Array) -> Any:
    first, inject = opt_state
    hp = dict(inject.hyperparams)
    hp["learning_rate"] = jnp.asarray(lr, jnp.asarray(hp["learning_rate"]).dtype)
    return (first, inject._replace(hyperparams=hp))


def init_state(cfg: TrainConfig, model_cfg: ModelConfig) -> dict[str, Any]:
    """Step-0 train state: `{params, opt_state, step, data_key}` (params float32)."""
    params = init_params(model_cfg, jax.random.fold_in(jax.random.key(cfg.seed), 0),
                           jnp.float32, cfg.init_std)
    opt_state = make_optimizer(StepSpec.of(cfg, model_cfg)).init(params)
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(0),
            "data_key": jax.random.key_data(data_key(cfg.seed))}


def _train_step(state: dict[str, Any], pool: DataPool, lr: jax.Array, spec: StepSpec
                ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    import optax

    key = jax.random.wrap_key_data(state["data_key"])
    prompt, answer, noise_key = batch_at(pool, key, state["step"], spec.batch_size)

    def objective(params: Params) -> tuple[jax.Array, Any]:
        loss, aux = loss_fn(params, spec.model_cfg, prompt, answer, noise_key, eps=spec.eps,
                            block_diffusion=spec.block_diffusion,
                            compute_dtype=jnp.dtype(spec.compute_dtype), attn_impl=spec.attn_impl)
        return loss, jnp.sum(aux["masked"])

    (loss, n_masked), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
    opt = make_optimizer(spec)
    opt_state = _set_lr(state["opt_state"], lr)
    updates, opt_state = opt.update(grads, opt_state, state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
           "data_key": state["data_key"]}
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "masked": n_masked}


def _train_chunk_impl(state: dict[str, Any], pool: DataPool, lrs: jax.Array, spec: StepSpec
                      ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    return jax.lax.scan(lambda s, lr: _train_step(s, pool, lr, spec), state, lrs)


_train_chunk = jax.jit(_train_chunk_impl, static_argnames=("spec",), donate_argnums=(0,))


def train_chunk(state: dict[str, Any], pool: DataPool, lrs: Any, spec: StepSpec
                ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """`len(lrs)` training steps in one compiled scan (the input state is donated).

    Returns the new state and per-step metrics `{loss, grad_norm, masked}` `[n]`.
    """
    return _train_chunk(state, pool, jnp.asarray(lrs, jnp.float32), spec=spec)


__all__ = ["StepSpec", "init_state", "lr_schedule", "make_optimizer", "train_chunk"]
