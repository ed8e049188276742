"""The published decoding rules, matched to their original implementations.

- LLaDA `generate` (ML-GSAI/LLaDA, generate.py): low-confidence and random remasking with
  a fixed number of commits per step.
- Fast-dLLM (NVlabs/Fast-dLLM, llada/generate.py): confidence threshold and the "factor"
  (dynamic threshold) rule.
- SDAR (JetAstra/SDAR, block_diffusion_generate): `low_confidence_dynamic` (its
  `low_confidence_static` is `low_confidence` on its block layout, `sequential` with one
  token per step is `left_to_right`).
- Dream (DreamLM/Dream, generation_utils.py): maskgit_plus / topk_margin / entropy orders
  and the `origin` rule, on Dream's time grid.

Every controller sees the active block only: `Features` are `[B, Lb]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from controllers.base import Stateless, at_least_one, top_k_commit
from controllers.registry import ControllerOptions, option, register, require
from dllm_jax.state import BlockContext, Features, Trajectory


def llada_transfer_count(masked_at_start: jax.Array, step: jax.Array, steps: int) -> jax.Array:
    """LLaDA's `get_num_transfer_tokens`: M // S per step, one more in the first M % S steps.

    masked_at_start: int `[B]` MASKs in the block when it began; step: scalar step in block.
    """
    base = masked_at_start // steps
    rem = masked_at_start % steps
    return base + (step < rem).astype(jnp.int32)


@struct.dataclass
class LowConfidence(Stateless):
    """LLaDA remasking: commit the `k_s` most confident (or random) masked tokens per step.

    remasking: "low_confidence" (softmax probability of the candidate) or "random".
    """

    remasking: str = struct.field(pytree_node=False, default="low_confidence")
    sampler: str = struct.field(pytree_node=False, default="llada")
    def decide(self, feats: Features, traj: Trajectory, ctx: BlockContext, state: Any):
        if self.remasking == "random":
            score = jax.random.uniform(ctx.key, feats.confidence.shape, jnp.float32)
        else:
            score = feats.confidence
        k = llada_transfer_count(ctx.masked_at_block_start, ctx.block_step, ctx.steps_per_block)
        commit = top_k_commit(score, k, feats.masked)
        return at_least_one(commit, score, feats.masked), state


@struct.dataclass
class Threshold(Stateless):
    """Fast-dLLM: commit every masked token with confidence >= threshold; at least the best one.

    The original keeps the top-1 and drops the others only when confidence < threshold, so a
    confidence equal to the threshold commits.
    """

    threshold: float = struct.field(pytree_node=False, default=0.9)
    sampler: str = struct.field(pytree_node=False, default="llada")
    def decide(self, feats: Features, traj: Trajectory, ctx: BlockContext, state: Any):
        commit = feats.masked & (feats.confidence >= self.threshold)
        return at_least_one(commit, feats.confidence, feats.masked), state


@struct.dataclass
class LowConfidenceDynamic(Stateless):
    """SDAR's `low_confidence_dynamic` (JetAstra/SDAR `block_diffusion_generate`): every
    masked token with confidence > threshold when there are at least the step's quota of
    them (LLaDA's transfer count of the block), else the quota's most confident. (SDAR's
    generate.py defaults to threshold 0.85; the shared --threshold flag to 0.9.)"""

    threshold: float = struct.field(pytree_node=False, default=0.9)
    sampler: str = struct.field(pytree_node=False, default="llada")
    def decide(self, feats: Features, traj: Trajectory, ctx: BlockContext, state: Any):
        k = llada_transfer_count(ctx.masked_at_block_start, ctx.block_step, ctx.steps_per_block)
        high = feats.masked & (feats.confidence > self.threshold)
        enough = jnp.sum(high, axis=-1) >= k
        commit = jnp.where(enough[:, None], high, top_k_commit(feats.confidence, k, feats.masked))
        return at_least_one(commit, feats.confidence, feats.masked), state


def factor_commit_count(sorted_conf: jax.Array, n_masked: jax.Array, factor: float) -> jax.Array:
    """Fast-dLLM's `get_transfer_index_dynamic` count for each row.

    sorted_conf: float `[B, Lb]` confidences sorted descending (masked entries first).
    n_masked: int `[B]`. With thresholds th_i = 1 - factor / (i + 2) for 0-based rank i
    (th_0 = -1), n_pass = length of the longest passing prefix. The original's loop then
    commits n_pass, except that it commits all n_masked when n_pass >= n_masked - 1.
    """
    lb = sorted_conf.shape[-1]
    i = jnp.arange(lb)
    th = jnp.where(i == 0, -1.0, 1.0 - factor / (i + 2.0))
    valid = i[None, :] < n_masked[:, None]
    passes = (sorted_conf >= th[None, :]) | ~valid
    n_pass = jnp.argmin(jnp.concatenate([passes, jnp.zeros_like(passes[:, :1])], axis=1), axis=1)
    n_pass = jnp.minimum(n_pass, n_masked)
    return jnp.where(n_pass >= n_masked - 1, n_masked, n_pass)


@struct.dataclass
class Factor(Stateless):
    """Fast-dLLM's factor rule: commit the n most confident while c_n >= 1 - factor / (n + 1)."""

    factor: float = struct.field(pytree_node=False, default=1.0)
    sampler: str = struct.field(pytree_node=False, default="llada")
    def decide(self, feats: Features, traj: Trajectory, ctx: BlockContext, state: Any):
        score = jnp.where(feats.masked, feats.confidence, -jnp.inf)
        sorted_conf = -jnp.sort(-score, axis=-1)
        n_masked = feats.masked.sum(-1).astype(jnp.int32)
        k = factor_commit_count(sorted_conf, n_masked, self.factor)
        commit = top_k_commit(score, k, feats.masked)
        return at_least_one(commit, score, feats.masked), state


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps)` in float32, reproduced bit for bit.

    PyTorch fills the first half forwards from `start` and the second half backwards from
    `end` with step (end - start) / (steps - 1); Dream's time grid is built this way.
    """
    if steps == 1:
        return np.array([start], np.float32)
    step = np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1))
    half = steps // 2
    i = np.arange(steps)
    fwd = np.float32(start) + step * i.astype(np.float32)
    bwd = np.float32(end) - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < half, fwd, bwd).astype(np.float32)


DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


@struct.dataclass
class DreamOrder(Stateless):
    """Dream's `_sample` orders on the time grid t = linspace(1, eps, S + 1).

    At step s of a block (times t > u): `origin` commits each masked token with probability
    1 - u / t; the other orders commit int(M * (1 - u / t)) of the M masked tokens ranked by
    their score (top-1 probability, top-1 minus top-2 margin, or negative entropy); the last
    step commits everything. With alg_temp > 0 the ranking is sampled from
    softmax(score / alg_temp) without replacement (Gumbel top-k). Like the original, a step
    may commit nothing; the grid's last step ends the block, so the decode still ends.
    Dream counts M as the batch mean; here it is per row, so rows never affect each other.
    """

    alg: str = struct.field(pytree_node=False, default="maskgit_plus")
    eps: float = struct.field(pytree_node=False, default=1e-3)
    alg_temp: float = struct.field(pytree_node=False, default=0.0)
    sampler: str = struct.field(pytree_node=False, default="dream")
    def _times(self, ctx: BlockContext) -> tuple[jax.Array, jax.Array, jax.Array]:
        grid = jnp.asarray(torch_linspace_f32(1.0, self.eps, ctx.steps_per_block + 1))
        s = jnp.minimum(ctx.block_step, ctx.steps_per_block - 1)
        last = ctx.block_step >= ctx.steps_per_block - 1
        return grid[s], grid[s + 1], last

    def decide(self, feats: Features, traj: Trajectory, ctx: BlockContext, state: Any):
        t, u, last = self._times(ctx)
        frac = jnp.float32(1.0) - u / t
        masked = feats.masked
        if self.alg == "origin":
            draw = jax.random.uniform(ctx.key, masked.shape, jnp.float32)
            commit = masked & ((draw < frac) | last)
            return commit, state
        if self.alg == "maskgit_plus":
            score = feats.confidence
        elif self.alg == "topk_margin":
            score = feats.margin
        else:
            score = -feats.entropy
        n = masked.sum(-1).astype(jnp.int32)
        k = jnp.where(last, n, (n.astype(jnp.float32) * frac).astype(jnp.int32))
        if self.alg_temp > 0:
            g = -jnp.log(-jnp.log(jax.random.uniform(ctx.key, score.shape, jnp.float32,
                                                     minval=1e-20, maxval=1.0)))
            score = score / self.alg_temp + g
        return top_k_commit(score, k, masked), state


# ----------------------------------------------------------------------------- registry
@register("random")
@register("low_confidence")
@dataclasses.dataclass(frozen=True)
class LowConfidenceOptions(ControllerOptions):
    """LLaDA remasking: commit a fixed number of the most confident (or random) tokens per step."""

    def build(self, name: str) -> LowConfidence:
        return LowConfidence(remasking=name)


def uses_time_grid(controller: Any) -> bool:
    """True for Dream's orders: they follow a time grid of `steps` points and may commit
    nothing in a step, so every step of a budget above the answer length can run; every other
    controller commits at least one token per step (`at_least_one`), so a decode runs at most
    gen_length steps whatever the budget (the CLIs and the server refuse a larger one)."""
    return isinstance(controller, DreamOrder)


@register("threshold")
@dataclasses.dataclass(frozen=True)
class ThresholdOptions(ControllerOptions):
    """Fast-dLLM: commit every masked token with confidence >= threshold."""

    threshold: float = option(0.9, "commit threshold on confidence, in (0, 1]")

    def validate(self) -> None:
        require(0.0 < self.threshold <= 1.0, "threshold", "in (0, 1]", self.threshold, 0.9)

    def build(self, name: str) -> Threshold:
        return Threshold(threshold=self.threshold)


@register("low_confidence_dynamic")
@dataclasses.dataclass(frozen=True)
class LowConfidenceDynamicOptions(ControllerOptions):
    """SDAR: every masked token above the threshold if they fill the step's quota, else the
    quota's most confident."""

    threshold: float = option(0.9, "commit threshold on confidence, in (0, 1]")

    def validate(self) -> None:
        require(0.0 < self.threshold <= 1.0, "threshold", "in (0, 1]", self.threshold, 0.9)

    def build(self, name: str) -> LowConfidenceDynamic:
        return LowConfidenceDynamic(threshold=self.threshold)


@register("factor")
@dataclasses.dataclass(frozen=True)
class FactorOptions(ControllerOptions):
    """Fast-dLLM's factor rule: commit the n most confident while c_n >= 1 - factor / (n + 1)."""

    factor: float = option(1.0, "factor of the dynamic threshold 1 - factor / (n + 1), > 0")

    def validate(self) -> None:
        require(self.factor > 0.0, "factor", "> 0", self.factor, 1.0)

    def build(self, name: str) -> Factor:
        return Factor(factor=self.factor)


@dataclasses.dataclass(frozen=True)
class _DreamTimeGrid(ControllerOptions):
    """The option every Dream order shares: the end of its time grid."""

    eps: float = option(1e-3, "end of Dream's time grid linspace(1, eps, steps + 1), in (0, 1)")

    def validate(self) -> None:
        require(0.0 < self.eps < 1.0, "eps", "in (0, 1)", self.eps, 1e-3)


@register("entropy")
@register("topk_margin")
@register("maskgit_plus")
@dataclasses.dataclass(frozen=True)
class DreamOrderOptions(_DreamTimeGrid):
    """Dream's ranked orders: commit int(M * (1 - u / t)) masked tokens ranked by a score."""

    alg_temp: float = option(0.0, "temperature of the sampled ranking (0: greedy), >= 0")

    def validate(self) -> None:
        super().validate()
        require(self.alg_temp >= 0.0, "alg_temp", ">= 0", self.alg_temp, 0.0)

    def build(self, name: str) -> DreamOrder:
        return DreamOrder(alg=name, eps=self.eps, alg_temp=self.alg_temp)


@register("origin")
@dataclasses.dataclass(frozen=True)
class DreamOriginOptions(_DreamTimeGrid):
    """Dream's origin rule: commit each masked token with probability 1 - u / t."""

    def build(self, name: str) -> DreamOrder:
        return DreamOrder(alg=name, eps=self.eps)
