"""`r2_centred`: our earlier design after R2-dLLM's abstract (arXiv 2604.18995), kept beside
the authors' rules (`controllers/r2.py`, name `r2`) so that the two can be measured side by
side. It differs from upstream in every rule but a temporal streak: a centred, clipped
neighbour window scored per token instead of upstream's window sweep, no token-cluster rule,
and a union with (instead of additions on top of) the threshold rule.

Spatial rule. A masked token's score aggregates the confidence of the window of w positions
on each side (itself included) inside the active block:
  - a committed position counts as confidence 1 (it is certain), a masked one as its
    confidence; the position just left of the block (the previous block or the prompt, always
    decoded) also counts as committed, so a window reaching past the block start sees 1s;
    positions past the block end are left out (they are undecided and unobserved);
  - `agg="mean"` (default) averages the window, `agg="min"` takes its minimum.
A masked token commits when its score >= threshold AND its own confidence >= `floor`. With
"mean", confident clusters (and tokens next to decoded text) commit together even a little
below the threshold, while a confident token among ambiguous neighbours waits; the floor keeps
a weak token from riding on its neighbours. With w = 0 the rule is the threshold rule (the
floor aside).

Temporal rule. A masked token whose candidate has been the same for the last k observations
(`stable >= k`) with confidence >= `temporal_floor` is finalized.

`R2` commits the union of the enabled rules (`spatial=False` falls back to the plain threshold
rule), and at least one token per row (the highest spatial score).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from controllers.base import at_least_one
from controllers.registry import ControllerOptions, option, register, require
from dllm_jax.state import BlockContext, Features, Trajectory

R2_AGGS = ("mean", "min")


def spatial_score(confidence: jax.Array, masked: jax.Array, window: int, agg: str = "mean"
                  ) -> jax.Array:
    """Neighbour-aggregated confidence `[B, Lb]` (see the module doc).

    confidence: float `[B, Lb]` (any value where not masked); masked: bool `[B, Lb]`.
    """
    b, lb = confidence.shape
    value = jnp.where(masked, jnp.where(jnp.isfinite(confidence), confidence, 0.0), 1.0)
    # Left pad: the decoded context before the block (1.0); right pad: absent.
    padded = jnp.concatenate([jnp.ones((b, window), value.dtype), value,
                              jnp.zeros((b, window), value.dtype)], axis=1)
    present = jnp.concatenate([jnp.ones((b, window + lb), bool), jnp.zeros((b, window), bool)],
                              axis=1)
    idx = jnp.arange(lb)[:, None] + jnp.arange(2 * window + 1)[None, :]      # [Lb, 2w+1]
    vals, pres = padded[:, idx], present[:, idx]                             # [B, Lb, 2w+1]
    if agg == "min":
        return jnp.min(jnp.where(pres, vals, jnp.inf), axis=-1)
    return jnp.sum(jnp.where(pres, vals, 0.0), axis=-1) / jnp.sum(pres, axis=-1)


@struct.dataclass
class R2Centred:
    """Spatial + temporal rules (see the module doc).

    threshold: commit threshold on the spatial score (on confidence when spatial=False).
    window: w neighbours on each side; agg: "mean" | "min"; floor: own-confidence floor of the
      spatial rule.
    k, temporal_floor: the temporal rule (stable for >= k observations, confidence >= floor).
    spatial / temporal: switch each rule.
    """

    threshold: float = struct.field(pytree_node=False, default=0.9)
    window: int = struct.field(pytree_node=False, default=1)
    agg: str = struct.field(pytree_node=False, default="mean")
    floor: float = struct.field(pytree_node=False, default=0.7)
    k: int = struct.field(pytree_node=False, default=3)
    temporal_floor: float = struct.field(pytree_node=False, default=0.7)
    spatial: bool = struct.field(pytree_node=False, default=True)
    temporal: bool = struct.field(pytree_node=False, default=True)
    sampler: str = struct.field(pytree_node=False, default="llada")
    trajectory_filter: ClassVar[None] = None
    verify: ClassVar[None] = None

    def init(self, batch: int, block: int) -> Any:
        return ()

    def rules(self, feats: Features, traj: Trajectory) -> dict[str, jax.Array]:
        """Rule masks `[B, Lb]`: spatial (or threshold), temporal; and the spatial score."""
        masked = feats.masked
        conf = jnp.where(masked, feats.confidence, 0.0)
        if self.spatial:
            score = spatial_score(feats.confidence, masked, self.window, self.agg)
            first = masked & (score >= self.threshold) & (conf >= self.floor)
        else:
            score = conf
            first = masked & (conf >= self.threshold)
        temporal = masked & (traj.stable >= self.k) & (conf >= self.temporal_floor)
        if not self.temporal:
            temporal = jnp.zeros_like(masked)
        return dict(spatial=first, temporal=temporal, score=score)

    def decide(self, feats: Features, traj: Trajectory, ctx: BlockContext, state: Any):
        r = self.rules(feats, traj)
        commit = r["spatial"] | r["temporal"]
        # Ties in the score (e.g. "min" windows) go to the more confident token.
        score = r["score"] + 1e-3 * jnp.where(feats.masked, feats.confidence, 0.0)
        return at_least_one(commit, score, feats.masked), state


@register("r2_centred")
@dataclasses.dataclass(frozen=True)
class R2CentredOptions(ControllerOptions):
    """R2, centred variant: neighbour-aggregated confidence plus temporal stability."""

    threshold: float = option(0.9, "commit threshold on confidence, in (0, 1]")
    window: int = option(1, "R2: neighbours on each side in the spatial score, >= 0")
    agg: str = option("mean", "R2: how the window is aggregated", choices=R2_AGGS)
    floor: float = option(0.7, "R2: own-confidence floor of the spatial rule, in [0, 1]")
    k: int = option(3, "R2: stable observations that finalize a token, >= 1")
    temporal_floor: float = option(0.7, "R2: confidence floor of the temporal rule, in [0, 1]")
    spatial: bool = option(True, "R2: use the spatial rule (else the plain threshold rule)")
    temporal: bool = option(True, "R2: use the temporal rule")

    def validate(self) -> None:
        require(0.0 < self.threshold <= 1.0, "threshold", "in (0, 1]", self.threshold, 0.9)
        require(self.window >= 0, "window", "an integer >= 0 (neighbours per side)",
                self.window, 1)
        require(self.k >= 1, "k", "an integer >= 1 (stable steps)", self.k, 3)
        require(0.0 <= self.floor <= 1.0, "floor", "in [0, 1]", self.floor, 0.7)
        require(0.0 <= self.temporal_floor <= 1.0, "temporal_floor", "in [0, 1]",
                self.temporal_floor, 0.7)

    def build(self, name: str) -> R2Centred:
        return R2Centred(threshold=self.threshold, window=self.window, agg=self.agg, floor=self.floor,
                  k=self.k, temporal_floor=self.temporal_floor, spatial=self.spatial,
                  temporal=self.temporal)


__all__ = ["R2Centred", "R2CentredOptions", "R2_AGGS", "spatial_score"]
