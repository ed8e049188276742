"""Logits -> per-token features, and the one place where trajectories are updated.

All arithmetic is float32. Shapes: logits `[B, Lb, V]`, everything else `[B, Lb]`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from dllm_jax.state import Features, Trajectory

Sampler = Literal["llada", "dream"]
NEG_INF = -jnp.inf


def suppress_tokens(logits: jax.Array, token_ids: tuple[int, ...]) -> jax.Array:
    """Set the logits of `token_ids` to -inf (LLaDA's `logits_eos_inf`)."""
    if not token_ids:
        return logits
    ids = jnp.asarray(token_ids, jnp.int32)
    return logits.at[..., ids].set(NEG_INF)


def observe(
    logits: jax.Array,
    block_tokens: jax.Array,
    mask_id: int,
    key: jax.Array,
    temperature: float = 0.0,
    sampler: Sampler = "llada",
    low_confidence_ids: tuple[int, ...] = (),
) -> Features:
    """Candidates and their confidence, entropy and margin for one step.

    Args:
      logits: float32 `[B, Lb, V]` for the active block (cfg already applied).
      block_tokens: int32 `[B, Lb]` current tokens of the block (MASK where undecided).
      mask_id: the MASK token id.
      key: PRNG key (used only when temperature > 0).
      temperature: 0 is greedy. "llada": Gumbel-max on the logits with noise scale
        `temperature`, confidence read from the untempered softmax (LLaDA `generate`).
        "dream": sample from softmax(logits / temperature), confidence read from that
        tempered distribution (Dream `sample_tokens`).
      sampler: which convention above.
      low_confidence_ids: token ids removed from the distribution that confidence is read
        from (LLaDA's `confidence_eos_eot_inf`: the softmax is renormalised without them, so
        a candidate equal to one of them gets confidence 0).
    Returns:
      Features; confidence is -inf where the position is not masked.
    """
    logits = logits.astype(jnp.float32)
    if sampler == "dream" and temperature > 0:
        dist_logits = logits / temperature
    else:
        dist_logits = logits
    logp = jax.nn.log_softmax(dist_logits, axis=-1)
    probs = jnp.exp(logp)
    if temperature > 0:
        if sampler == "llada":
            # argmax(exp(l) / (-log u)^T) == argmax(l - T * log(-log u)).
            u = jax.random.uniform(key, logits.shape, jnp.float32, minval=1e-20, maxval=1.0)
            candidate = jnp.argmax(logits - temperature * jnp.log(-jnp.log(u)), axis=-1)
        else:
            candidate = jax.random.categorical(key, dist_logits, axis=-1)
    else:
        candidate = jnp.argmax(logits, axis=-1)
    candidate = candidate.astype(jnp.int32)
    conf_probs = probs
    if low_confidence_ids:
        conf_probs = jax.nn.softmax(suppress_tokens(dist_logits, low_confidence_ids), axis=-1)
    confidence = jnp.take_along_axis(conf_probs, candidate[..., None], axis=-1)[..., 0]
    top2 = jax.lax.top_k(probs, 2)[0]
    margin = top2[..., 0] - top2[..., 1]
    entropy = -jnp.sum(jnp.where(probs > 0, probs * logp, 0.0), axis=-1)
    masked = block_tokens == mask_id
    confidence = jnp.where(masked, confidence, NEG_INF)
    return Features(candidate=candidate, confidence=confidence, entropy=entropy,
                    margin=margin, masked=masked)


def update_trajectory(traj: Trajectory, feats: Features, beta: float = 0.5) -> Trajectory:
    """Fold one step's features into the `[B, Lb]` trajectory window of the active block.

    Only masked positions are updated; committed ones keep their history.
    momentum_t = beta * momentum_{t-1} + (1 - beta) * (c_t - c_{t-1}) (0 at the first step).
    """
    m = feats.masked
    conf = jnp.where(jnp.isfinite(feats.confidence), feats.confidence, 0.0)
    first = traj.observed == 0
    same = feats.candidate == traj.prev_candidate
    delta = jnp.where(first, 0.0, conf - traj.prev_confidence)
    new = Trajectory(
        prev_candidate=feats.candidate,
        prev_confidence=conf,
        momentum=jnp.where(first, 0.0, beta * traj.momentum + (1.0 - beta) * delta),
        stable=jnp.where(same & ~first, traj.stable + 1, 1),
        flips=traj.flips + (~same & ~first).astype(jnp.int32),
        observed=traj.observed + 1,
    )
    return jax.tree_util.tree_map(lambda n, o: jnp.where(m, n, o), new, traj)
