"""Model families behind one interface.

    from dllm_jax import models
    params = models.init_params(cfg, jax.random.key(0))     # stacked layout, float32
    logits = models.apply(params, cfg, tokens)               # [B, T, V] float32

A family is one module with its params table (`params.Family`: each weight's shape, logical
axes, initialiser and Hugging Face name) registered in `FAMILIES` by `ModelConfig.arch`:
`llada` (llada.py), `dream` (qwen2.py), `sdar` (qwen3.py). The dense-decoder forward passes
they share are in `transformer.py`, over the layers of `layers.py`. `diffusion_gemma`
(diffusion_gemma.py, with moe.py) is an encoder + canvas denoiser with its own entry points
(`diffusion_gemma.encode` / `denoise`), not `apply`. The sharding rules
(`sharding.param_axes`), the converter's key map (`checkpoints_convert`) and the layouts
(`decode_layout`) read the family table, so adding a family is one module + its table.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dllm_jax.config import ModelConfig
from dllm_jax.models import diffusion_gemma, llada, qwen2, qwen3
from dllm_jax.models.params import (FUSED, Family, Fused, Params, Weight, decode_layout,
                                    init_from_table, shapes_from_table, stack_layers,
                                    unstack_layers)
from dllm_jax.models.transformer import (apply, apply_cached, apply_refresh,
                                         default_positions, logit_source_index, query_logits,
                                         run_layers)

FAMILIES: dict[str, Family] = {f.arch: f for f in (llada.FAMILY, qwen2.FAMILY, qwen3.FAMILY,
                                                   diffusion_gemma.FAMILY)}


def family(arch_or_cfg: str | ModelConfig) -> Family:
    """The Family of an architecture name or a ModelConfig."""
    arch = arch_or_cfg.arch if isinstance(arch_or_cfg, ModelConfig) else arch_or_cfg
    try:
        return FAMILIES[arch]
    except KeyError:
        raise ValueError(f"no model family {arch!r}; the families are "
                         f"{', '.join(FAMILIES)}.") from None


def param_shapes(cfg: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """The stacked params pytree of `cfg` as `jax.ShapeDtypeStruct`s (no memory allocated)."""
    return shapes_from_table(family(cfg), cfg, dtype)


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32,
                std: float = 0.02) -> Params:
    """Random params (normal(0, std) weights, zero biases, unit norm scales), stacked."""
    return init_from_table(family(cfg), cfg, key, dtype, std)


__all__ = ["FAMILIES", "FUSED", "Family", "Fused", "Params", "Weight", "apply", "apply_cached",
           "apply_refresh", "decode_layout", "default_positions", "family", "init_params",
           "logit_source_index", "param_shapes", "query_logits", "run_layers", "stack_layers",
           "unstack_layers"]
