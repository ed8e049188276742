"""DiffusionGemma behind the same front door as the masked models: a `GenerateConfig` and a
controller in, a `decode.GenerateOutput` out.

`session.Session.generate_ids` calls `decode_canvas` for a DiffusionGemma model, so
`dllm-jax generate / batch / serve` and the notebooks decode it like any other model. The
mapping (every other combination is refused with a sentence naming the flag):

- controller: `entropy_bound` only (its `canvas_*`, `adaptive_stop`, `stability_threshold`,
  `confidence_threshold` options are transformers' generation-config fields); the other
  controllers decide when a masked token may be frozen, and the canvas freezes nothing
  before it stops (see `controllers/entropy_bound.py`).
- `gen_length` -> `max_new_tokens`: `ceil(gen_length / canvas_length)` canvases, the answer
  cut to `gen_length` tokens; `block_length` must be the model's `canvas_length` (or equal
  `gen_length` when one canvas holds the answer).
- `steps` -> the denoising budget over all canvases: `max_denoising_steps = steps / canvases`
  per canvas (transformers' default is 48 per canvas).
- `temperature`, `cfg_scale`, `cache`, `trace` and the EOS options have no meaning on the
  canvas (its temperature follows the `canvas_t_max -> canvas_t_min` schedule, the encoder
  cache is always on) and must keep their defaults.

Output: `tokens [B, gen_length]` (PAD after the first EOS), `stats.nfe [B]` denoiser passes,
`stats.steps` the loop steps of the batch (sum over canvases of the longest row's),
`stats.fix_step [B, gen_length]` the step at which each position's canvas stopped.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from dllm_jax.config import ConfigError, GenerateConfig, ModelConfig


def canvas_config(cfg: ModelConfig, gen: GenerateConfig, controller: Any) -> Any:
    """The `diffusion_gemma_sampler.CanvasConfig` of a decode request (module docstring);
    raises ConfigError naming the flag that does not apply."""
    from controllers.entropy_bound import EntropyBound
    from dllm_jax.diffusion_gemma_sampler import CanvasConfig

    if not isinstance(controller, EntropyBound):
        raise ConfigError(f"DiffusionGemma decodes with --controller entropy_bound, not "
                          f"{type(controller).__name__}: its canvas re-decides every position at "
                          f"every step, so per-token commit rules do not apply.")
    c = cfg.canvas_length
    if gen.block_length != c and not (gen.block_length == gen.gen_length <= c):
        raise ConfigError(f"--block-length must be the model's canvas length {c} (got "
                          f"{gen.block_length}); pass --block-length {c}.")
    defaults = GenerateConfig(gen_length=gen.gen_length, block_length=gen.block_length,
                              steps=gen.steps)
    for field, flag in (("temperature", "--temperature"), ("cfg_scale", "--cfg"),
                        ("cache", "--cache"), ("refresh_every", "--refresh-every"),
                        ("trace", "trace"), ("logits_eos_inf", "logits_eos_inf"),
                        ("confidence_eos_eot_inf", "confidence_eos_eot_inf")):
        if getattr(gen, field) != getattr(defaults, field):
            raise ConfigError(f"{flag} does not apply to DiffusionGemma's canvas (its "
                              f"temperature follows --canvas-t-max -> --canvas-t-min and its "
                              f"encoder cache is always on); leave it out.")
    canvases = math.ceil(gen.gen_length / c)
    if gen.steps < canvases:
        raise ConfigError(f"--steps must be at least the number of canvases ({canvases}), got "
                          f"{gen.steps}; e.g. --steps {48 * canvases}.")
    return CanvasConfig(max_new_tokens=gen.gen_length,
                        max_denoising_steps=gen.steps // canvases,
                        **controller.canvas_options())


def decode_canvas(params: Any, cfg: ModelConfig, ids: Any, valid: Any, gen: GenerateConfig,
                  controller: Any, key: Any = None, mesh: Any = None) -> Any:
    """Decode left-padded prompts `ids [B, P]` (`valid [B, P]`) with DiffusionGemma's canvas
    sampler; returns a `decode.GenerateOutput` (module docstring). `key` defaults to
    `jax.random.key(0)` (the canvas starts from random tokens, so a decode always draws)."""
    from dllm_jax.decode import GenerateOutput
    from dllm_jax.diffusion_gemma_sampler import generate
    from dllm_jax.state import DecodeStats

    canvas = canvas_config(cfg, gen, controller)
    key = jax.random.key(0) if key is None else key
    out = generate(params, cfg, jnp.asarray(ids, jnp.int32), jnp.asarray(valid, bool), canvas,
                   key=key, mesh=mesh)
    c, g = cfg.canvas_length, gen.gen_length
    steps = out.steps                                         # [K, B]
    row_ends = jnp.cumsum(steps, axis=0)                      # [K, B] row's step at canvas end
    fix_step = jnp.repeat(row_ends.T - 1, c, axis=1)[:, :g].astype(jnp.int32)   # [B, G]
    batch_steps = jnp.sum(jnp.max(steps, axis=1)).astype(jnp.int32)
    stats = DecodeStats(nfe=out.nfe, steps=batch_steps, fix_step=fix_step,
                        trace=None, draft_nfe=jnp.zeros_like(out.nfe))
    return GenerateOutput(tokens=out.tokens[:, :g], stats=stats)


__all__ = ["canvas_config", "decode_canvas"]
