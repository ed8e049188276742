"""The Controller protocol and the helpers every controller shares.

A controller is a frozen pytree dataclass (hyper-parameters as static fields, learned
parameters as leaves) with

    sampler: str                          "llada" | "dream" (how candidates are drawn)
    trajectory_filter: CEFilter | None    the CE filter the decode loop runs, or None
    verify: Verify | None                 speculative decoding (decoding order, acceptance
                                          rule): the loop runs verification forwards, or None
    init(batch, block) -> state
    decide(feats, traj, ctx, state) -> (commit [B, Lb] bool, state)

That is everything the decode loop reads from a controller. With `verify` set (SimSD,
`dllm_jax/speculative.py`), `ctx.accepted` holds the run the acceptance rule commits and the
loop keeps the longest prefix (in decoding order, at least one position) of `decide`'s
commit within it. Controllers are built by name
with `controllers.make_controller` (see `controllers/registry.py`).

`decide` is pure and jit-compatible; it never branches in Python on traced values. The
decode loop keeps only commits on masked positions of unfinished rows.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from dllm_jax.features import CEFilter
from dllm_jax.speculative import Verify
from dllm_jax.state import BlockContext, Features, Trajectory


@runtime_checkable
class Controller(Protocol):
    """Decides which masked tokens of the active block to commit at a step."""

    #: "llada" (Gumbel-max, untempered confidence) or "dream" (tempered sampling).
    sampler: str
    #: The CE filter settings the decode loop runs to update `Trajectory.ce_mean / ce_cov`
    #: (see `dllm_jax.features.update_trajectory`), or None when the controller reads no
    #: filter (then those fields are left as they are).
    trajectory_filter: CEFilter | None
    #: The speculative capability (`dllm_jax.speculative.Verify`: decoding order and
    #: acceptance rule) that makes the decode loop verify drafts, or None (plain steps).
    verify: Verify | None

    def init(self, batch: int, block: int) -> Any: ...

    def decide(self, feats: Features, traj: Trajectory, ctx: BlockContext, state: Any
               ) -> tuple[jax.Array, Any]: ...


class Stateless:
    """Base of the controllers that keep no state between steps, read no CE filter and do not
    speculate: `trajectory_filter` and `verify` are None and `init` returns `()`. (Subclasses
    are `flax.struct.dataclass`es; these are class attributes, not fields.)"""

    trajectory_filter: ClassVar[None] = None
    verify: ClassVar[None] = None

    def init(self, batch: int, block: int) -> Any:
        return ()


def rank_descending(score: jax.Array) -> jax.Array:
    """Rank of each entry of `score [B, Lb]` within its row, 0 = largest (ties: lower index first)."""
    order = jnp.argsort(-score, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def top_k_commit(score: jax.Array, k: jax.Array, masked: jax.Array) -> jax.Array:
    """Commit the `k[b]` highest-scoring masked positions of each row.

    Args:
      score: float `[B, Lb]`; only masked entries compete.
      k: int `[B]` (or scalar) number to commit per row; clipped to the masked count.
      masked: bool `[B, Lb]`.
    Returns: bool `[B, Lb]`.
    """
    score = jnp.where(masked, score, -jnp.inf)
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), score.shape[:1])
    return (rank_descending(score) < k[:, None]) & masked


def at_least_one(commit: jax.Array, score: jax.Array, masked: jax.Array) -> jax.Array:
    """Add the best-scoring masked position to every row that has a MASK but no commit.

    This is what guarantees that a decode ends: every unfinished row advances each step.
    """
    need = ~jnp.any(commit, axis=-1) & jnp.any(masked, axis=-1)
    best = top_k_commit(score, jnp.ones(score.shape[:1], jnp.int32), masked)
    return commit | (best & need[:, None])


def finite_or(score: jax.Array, value: float) -> jax.Array:
    """Replace non-finite entries (e.g. -inf confidence of committed positions) by `value`."""
    return jnp.where(jnp.isfinite(score), score, value)
