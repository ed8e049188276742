"""Mixture-of-experts block of DiffusionGemma (Gemma-4 style): a router with its own RMSNorm,
top-k routing over softmax probabilities renormalised to sum to one and scaled per expert,
and GELU-tanh gated experts stored as stacks.

Per-layer params (`diffusion_gemma.FAMILY`): `router_scale [D]`, `router_proj [D, E]`,
`expert_scale [E]`, `experts_gate_up [E, D, 2F]` (gate | up columns, as transformers'
`gate_up_proj [E, 2F, D]` transposed per expert), `experts_down [E, F, D]`.

Two implementations of the expert sum, equal up to float rounding:
  "dense"   every expert on every token, combined by the routing weights (zero outside the
            top-k): `E / k` times the FLOPs of the routed tokens, but plain einsums that a
            mesh can split over the expert axis.
  "ragged"  token-expert pairs sorted by expert and run as grouped matmuls
            (`lax.ragged_dot`): only the routed FLOPs.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from dllm_jax.attention import matmul_precision

Params = dict[str, Any]
MoEImpl = Literal["dense", "ragged"]


def _rms(x: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def route(lp: Params, x: jax.Array, top_k: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """Routing of tokens `x [N, D]` (the residual stream before the feed-forward norms).

    Returns float32 weights `[N, k]` (top-k probabilities renormalised, times the expert's
    `expert_scale`) and int32 expert ids `[N, k]` in decreasing probability.
    """
    d = x.shape[-1]
    h = _rms(x, eps) * lp["router_scale"] * jnp.asarray(d ** -0.5, x.dtype)
    scores = jnp.einsum("nd,de->ne", h, lp["router_proj"],
                        precision=matmul_precision(h.dtype))
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    weights, idx = jax.lax.top_k(probs, top_k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights * lp["expert_scale"][idx].astype(jnp.float32), idx.astype(jnp.int32)


def _act(gate_up: jax.Array) -> jax.Array:
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.gelu(gate, approximate=True) * up


def experts(lp: Params, x: jax.Array, weights: jax.Array, idx: jax.Array,
            impl: MoEImpl = "ragged") -> jax.Array:
    """`sum_k weights[n, k] * expert_{idx[n, k]}(x[n])` for normed tokens `x [N, D]`."""
    n, d = x.shape
    e = lp["experts_gate_up"].shape[0]
    precision = matmul_precision(x.dtype)
    if impl == "dense":
        h = _act(jnp.einsum("nd,edf->nef", x, lp["experts_gate_up"], precision=precision))
        y = jnp.einsum("nef,efd->ned", h, lp["experts_down"], precision=precision)
        combine = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], idx].add(weights)
        return jnp.einsum("ne,ned->nd", combine, y.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST).astype(x.dtype)
    if impl != "ragged":
        raise ValueError(f"unknown MoE impl {impl!r}; use 'dense' or 'ragged'.")
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    h = _act(jax.lax.ragged_dot(x[token], lp["experts_gate_up"], sizes, precision=precision))
    y = jax.lax.ragged_dot(h, lp["experts_down"], sizes, precision=precision)
    y = y.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, d), jnp.float32).at[token].add(y).astype(x.dtype)
