"""`left_to_right`: one token per step, the leftmost masked position of the active block.

The autoregressive-order baseline of speculative decoding: greedy SimSD with draft order
left_to_right (`controllers/simsd.py`) commits exactly its tokens, with fewer forwards.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from controllers.base import Stateless
from controllers.registry import ControllerOptions, register
from dllm_jax.state import BlockContext, Features, Trajectory


def leftmost(masked: jax.Array) -> jax.Array:
    """bool `[B, Lb]`: the first masked position of each row (none in a row without MASK)."""
    return masked & (jnp.cumsum(masked.astype(jnp.int32), axis=-1) == 1)


@struct.dataclass
class LeftToRight(Stateless):
    """Commit the leftmost masked token of the block at every step."""

    sampler: str = struct.field(pytree_node=False, default="llada")
    def decide(self, feats: Features, traj: Trajectory, ctx: BlockContext, state: Any):
        return leftmost(feats.masked), state


@register("left_to_right")
@dataclasses.dataclass(frozen=True)
class LeftToRightOptions(ControllerOptions):
    """One token per step: the leftmost masked position of the block (autoregressive order)."""

    def build(self, name: str) -> LeftToRight:
        return LeftToRight()
