"""`simsd`: speculative draft-and-verify decoding (SimSD, arXiv 2606.02544) in the loop.

The controller declares the capability as its static `verify` field
(`dllm_jax.speculative.Verify`: the decoding order and the acceptance rule); the decode loop
then drafts (from the current step's candidates, or a draft model passed to `generate`),
runs one verification forward per step and applies the acceptance rule
(`dllm_jax/speculative.py` states the mask, the positions and the rules). `decide` commits
the whole accepted run (`ctx.accepted`).

Greedy SimSD with draft order left_to_right commits exactly the tokens of the
`left_to_right` controller (lossless) in at most as many forwards; with draft order
confidence the first position of each step is the most confident draft's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from flax import struct

from controllers.registry import ControllerOptions, option, register
from dllm_jax.speculative import ACCEPTANCES, ORDERS, Verify
from dllm_jax.state import BlockContext, Features, Trajectory


@struct.dataclass
class SimSD:
    """Commit the run of drafts the verification accepts (at least one token per step)."""

    verify: Verify = struct.field(pytree_node=False, default=Verify())
    sampler: str = struct.field(pytree_node=False, default="llada")
    trajectory_filter: ClassVar[None] = None

    def init(self, batch: int, block: int) -> Any:
        return ()

    def decide(self, feats: Features, traj: Trajectory, ctx: BlockContext, state: Any):
        if ctx.accepted is None:
            raise ValueError("simsd decides inside a speculative decode loop (it reads "
                             "ctx.accepted); run it through dllm_jax.decode.generate.")
        return ctx.accepted, state


@register("simsd")
@dataclasses.dataclass(frozen=True)
class SimSDOptions(ControllerOptions):
    """SimSD: draft the masked tokens, verify them in one forward, commit the accepted run."""

    draft_order: str = option("left_to_right", "order in which drafts are verified: "
                              "left_to_right (within the block) or confidence",
                              choices=ORDERS)
    acceptance: str = option("auto", "draft acceptance: greedy (draft == verified argmax), "
                             "sampling (ratio min(1, p/q), residual on rejection) or auto "
                             "(greedy at temperature 0)", choices=ACCEPTANCES)

    def build(self, name: str) -> SimSD:
        return SimSD(verify=Verify(order=self.draft_order, acceptance=self.acceptance))
