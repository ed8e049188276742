"""The entropy-bound rule (DiffusionGemma's `EntropyBoundSampler`), as a controller for every
model.

At each step the still-masked positions of the active block are sorted by the entropy of
their predictive distribution (nats), lowest first, and the first k are committed, k the
largest with

    sum(entropy of the first k) - max(entropy of the first k) <= entropy_bound

(at least one: the lowest-entropy position always passes, its left side being 0). So a step
commits many near-certain tokens at once, and one token when the distribution is flat.

On a masked model (LLaDA, Dream, SDAR) committed tokens stay; on DiffusionGemma's revocable
canvas (`dllm_jax.diffusion_gemma_sampler`) the accepted positions keep their sample for the
step and the rest are re-randomised, and the canvas stops adaptively once its argmax is
stable and its mean entropy below `confidence_threshold`. The options named `canvas_*`,
`adaptive_stop`, `stability_threshold` and `confidence_threshold` are that canvas loop's
(transformers' generation config) and are refused on masked models.

Why CE / TSPD are not offered on the canvas: they decide when a single token may be frozen,
but DiffusionGemma freezes nothing before the whole canvas stops (every position is
re-decided at every step); their stability idea is already the adaptive stop's rule.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from controllers.base import Stateless, at_least_one
from controllers.registry import ControllerOptions, option, register, require
from dllm_jax.state import BlockContext, Features, Trajectory


def entropy_bound_accept(ent: jax.Array, bound: float, eligible: jax.Array | None = None
                         ) -> jax.Array:
    """`[B, C]` bool: the lowest-entropy eligible positions whose entropy sum minus the
    largest of them is <= `bound` (the lowest one always passes).

    Args:
      ent: float `[B, C]` entropies (nats).
      bound: the entropy budget.
      eligible: bool `[B, C]` positions that may be accepted (default: all).
    """
    if eligible is not None:
        ent = jnp.where(eligible, ent, jnp.inf)
    order = jnp.argsort(ent, axis=-1, stable=True)
    srt = jnp.take_along_axis(ent, order, axis=-1)
    before = jnp.cumsum(jnp.where(jnp.isfinite(srt), srt, 0.0), axis=-1) - jnp.where(
        jnp.isfinite(srt), srt, 0.0)
    keep = (before <= bound) & jnp.isfinite(srt)
    rows = jnp.arange(ent.shape[0])[:, None]
    return jnp.zeros(ent.shape, bool).at[rows, order].set(keep)


@struct.dataclass
class EntropyBound(Stateless):
    """Commit the lowest-entropy masked tokens within an entropy budget (module docstring);
    the canvas fields are read only by DiffusionGemma's sampler."""

    entropy_bound: float = struct.field(pytree_node=False, default=0.1)
    adaptive_stop: bool = struct.field(pytree_node=False, default=True)
    stability_threshold: int = struct.field(pytree_node=False, default=1)
    confidence_threshold: float = struct.field(pytree_node=False, default=0.005)
    canvas_t_min: float = struct.field(pytree_node=False, default=0.4)
    canvas_t_max: float = struct.field(pytree_node=False, default=0.8)
    sampler: str = struct.field(pytree_node=False, default="llada")
    def decide(self, feats: Features, traj: Trajectory, ctx: BlockContext, state: Any):
        commit = entropy_bound_accept(feats.entropy, self.entropy_bound, feats.masked)
        return at_least_one(commit, -feats.entropy, feats.masked), state

    def canvas_options(self) -> dict[str, Any]:
        """The fields of the canvas loop's `CanvasConfig` this controller sets."""
        return dict(entropy_bound=self.entropy_bound, t_min=self.canvas_t_min,
                    t_max=self.canvas_t_max,
                    stability_threshold=self.stability_threshold if self.adaptive_stop else None,
                    confidence_threshold=self.confidence_threshold if self.adaptive_stop
                    else None)

    def canvas_only_changes(self) -> list[str]:
        """Names of the canvas-only options set away from their defaults (refused on masked
        models, where they would do nothing)."""
        default = EntropyBound()
        return [f.name for f in dataclasses.fields(self)
                if f.name not in ("entropy_bound", "sampler")
                and getattr(self, f.name) != getattr(default, f.name)]


@register("entropy_bound")
@dataclasses.dataclass(frozen=True)
class EntropyBoundOptions(ControllerOptions):
    """DiffusionGemma's entropy-bound rule: commit the lowest-entropy masked tokens while
    their entropy sum minus the largest stays within a budget (nats)."""

    entropy_bound: float = option(0.1, "entropy budget in nats, > 0: commit the lowest-entropy "
                                       "tokens while their sum minus the largest is <= it")
    adaptive_stop: bool = option(True, "DiffusionGemma only: stop a canvas once it is stable "
                                       "and confident")
    stability_threshold: int = option(1, "DiffusionGemma only: steps the argmax canvas must "
                                         "stay unchanged before the stop, >= 0")
    confidence_threshold: float = option(0.005, "DiffusionGemma only: mean entropy (nats) "
                                                "below which a stable canvas stops, > 0")
    canvas_t_min: float = option(0.4, "DiffusionGemma only: temperature at the last step, >= 0")
    canvas_t_max: float = option(0.8, "DiffusionGemma only: temperature at the first step, "
                                      "> canvas-t-min")

    def validate(self) -> None:
        require(self.entropy_bound > 0, "entropy_bound", "> 0", self.entropy_bound, 0.1)
        require(self.stability_threshold >= 0, "stability_threshold", ">= 0",
                self.stability_threshold, 1)
        require(self.confidence_threshold > 0, "confidence_threshold", "> 0",
                self.confidence_threshold, 0.005)
        require(self.canvas_t_min >= 0, "canvas_t_min", ">= 0", self.canvas_t_min, 0.4)
        require(self.canvas_t_max > self.canvas_t_min, "canvas_t_max",
                f"> canvas_t_min ({self.canvas_t_min})", self.canvas_t_max, 0.8)

    def build(self, name: str) -> EntropyBound:
        return EntropyBound(entropy_bound=self.entropy_bound, adaptive_stop=self.adaptive_stop,
                            stability_threshold=self.stability_threshold,
                            confidence_threshold=self.confidence_threshold,
                            canvas_t_min=self.canvas_t_min, canvas_t_max=self.canvas_t_max)


__all__ = ["EntropyBound", "EntropyBoundOptions", "entropy_bound_accept"]
