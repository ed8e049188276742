"""DiffusionGemma (`google/diffusiongemma-*`, transformers' `modeling_diffusion_gemma.py`), text
part: a causal Gemma-4 encoder that writes a KV cache over the prompt (and over each finished
canvas), and a bidirectional denoiser over a canvas of `canvas_length` tokens that reads that
cache. Encoder and denoiser share every weight except the denoiser's self-conditioning MLP
(and each its own `layer_scalar` buffers); the LM head is the embedding.

One layer (both stacks): `x += norm(attn(norm(x)))`; then, on the residual r,
`x = r + norm(norm(MLP(norm(r))) + norm(MoE(norm(r), route(r))))`; then `x *= layer_scalar`.
Attention: q/k RMSNorm (with scale) and v RMSNorm (without) per head, RoPE after the norms,
no 1/sqrt(d) scaling. Sliding layers (`layer_types` "sliding"): `head_dim`, `num_kv_heads`,
`rope_theta`, a window of `sliding_window` keys (itself included) in the encoder; in the
denoiser the canvas sees the last `sliding_window - 1` cached keys (the ones transformers'
sliding cache keeps) and the whole canvas. Full layers: `global_head_dim`,
`global_num_kv_heads`, no v projection (v is the k projection, v-normed, before RoPE),
proportional RoPE (`global_rope_fraction` of the frequencies of theta `global_rope_theta`,
the rest identity). Embeddings are scaled by sqrt(D) (cast to the weight dtype, as
transformers does); logits are soft-capped `cap * tanh(logits / cap)`. The self-conditioning
signal is `softmax(previous logits) @ embed * sqrt(D)` through a GELU MLP, added to the canvas
embeddings and RMS-normed (zero on the first step).

Params (`FAMILY`): `layers/*` the weights every layer has (norms, MLP, MoE), stacked
`[num_layers, ...]`; `sliding/*` and `full/*` the attention weights of the layers of each
type, stacked over those layers only (`Family.layer_groups`). The Hugging Face checkpoint
keeps the shared weights under `model.decoder.*` (the encoder's are tied to them, absent or
ignored) plus `model.encoder.language_model.layers.{i}.layer_scalar`; the vision tower
(`model.encoder.vision_tower`, `embed_vision`) is dropped with a notice.

Positions: pass RoPE positions explicitly or take `0..T-1` (transformers' default, left
padding included; RoPE is relative, so a per-row shift changes nothing); windows are measured
in positions, which therefore must be consecutive along the sequence.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax.attention import AttentionImpl, dot_product_attention
from dllm_jax.config import ModelConfig
from dllm_jax.config_gemma import FULL, SLIDING
from dllm_jax.models.layers import apply_rope, dense
from dllm_jax.models.moe import MoEImpl, experts, route
from dllm_jax.models.params import Family, Weight

Params = dict[str, Any]

_D = "model.decoder."
_L = _D + "layers.{i}."


def _groups(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {kind: tuple(i for i, t in enumerate(cfg.layer_types) if t == kind)
            for kind in (SLIDING, FULL)}


def _attention_weights(kind: str) -> tuple[Weight, ...]:
    if kind == SLIDING:
        hd, kv = (lambda c: c.head_dim), (lambda c: c.num_kv_heads)
    else:
        hd, kv = (lambda c: c.global_head_dim), (lambda c: c.global_num_kv_heads)
    a = _L + "self_attn."
    out = (
        Weight(f"{kind}/q_proj", ("embed", "heads"), lambda c: (c.hidden_size, c.num_heads * hd(c)),
               hf=a + "q_proj.weight", transposed=True),
        Weight(f"{kind}/k_proj", ("embed", "kv_heads"), lambda c: (c.hidden_size, kv(c) * hd(c)),
               hf=a + "k_proj.weight", transposed=True),
        Weight(f"{kind}/o_proj", ("heads", "embed"), lambda c: (c.num_heads * hd(c), c.hidden_size),
               hf=a + "o_proj.weight", transposed=True),
        Weight(f"{kind}/q_norm", ("head_dim",), lambda c: (hd(c),), hf=a + "q_norm.weight",
               init="ones"),
        Weight(f"{kind}/k_norm", ("head_dim",), lambda c: (hd(c),), hf=a + "k_norm.weight",
               init="ones"),
    )
    if kind == SLIDING:  # full layers reuse the k projection as values
        out += (Weight(f"{kind}/v_proj", ("embed", "kv_heads"),
                       lambda c: (c.hidden_size, kv(c) * hd(c)), hf=a + "v_proj.weight",
                       transposed=True),)
    return out


def _norm(path: str, hf: str) -> Weight:
    return Weight(path, ("embed",), lambda c: (c.hidden_size,), hf=hf, init="ones")


def _mlp(prefix: str, hf: str) -> tuple[Weight, ...]:
    d, f = (lambda c: c.hidden_size), (lambda c: c.intermediate_size)
    return (
        Weight(prefix + "gate_proj", ("embed", "mlp"), lambda c: (d(c), f(c)),
               hf=hf + "gate_proj.weight", transposed=True),
        Weight(prefix + "up_proj", ("embed", "mlp"), lambda c: (d(c), f(c)),
               hf=hf + "up_proj.weight", transposed=True),
        Weight(prefix + "down_proj", ("mlp", "embed"), lambda c: (f(c), d(c)),
               hf=hf + "down_proj.weight", transposed=True),
    )


WEIGHTS: tuple[Weight, ...] = (
    Weight("embed", ("vocab", "embed"), lambda c: (c.vocab_size, c.hidden_size),
           hf=_D + "embed_tokens.weight"),
    _norm("final_norm", _D + "norm.weight"),
    _norm("sc_norm", _D + "self_conditioning.pre_norm.weight"),
    *_mlp("sc_", _D + "self_conditioning."),
    _norm("layers/attn_norm", _L + "input_layernorm.weight"),
    _norm("layers/post_attn_norm", _L + "post_attention_layernorm.weight"),
    _norm("layers/mlp_norm", _L + "pre_feedforward_layernorm.weight"),
    *_mlp("layers/", _L + "mlp."),
    _norm("layers/post_mlp_norm", _L + "post_feedforward_layernorm_1.weight"),
    _norm("layers/moe_norm", _L + "pre_feedforward_layernorm_2.weight"),
    _norm("layers/router_scale", _L + "router.scale"),
    Weight("layers/router_proj", ("embed", None), lambda c: (c.hidden_size, c.num_experts),
           hf=_L + "router.proj.weight", transposed=True),
    Weight("layers/expert_scale", (None,), lambda c: (c.num_experts,),
           hf=_L + "router.per_expert_scale", init="ones"),
    Weight("layers/experts_gate_up", ("expert", "embed", None),
           lambda c: (c.num_experts, c.hidden_size, 2 * c.moe_intermediate_size),
           hf=_L + "experts.gate_up_proj", transforms=("transpose_inner",)),
    Weight("layers/experts_down", ("expert", None, "embed"),
           lambda c: (c.num_experts, c.moe_intermediate_size, c.hidden_size),
           hf=_L + "experts.down_proj", transforms=("transpose_inner",)),
    _norm("layers/post_moe_norm", _L + "post_feedforward_layernorm_2.weight"),
    _norm("layers/post_ffw_norm", _L + "post_feedforward_layernorm.weight"),
    Weight("layers/layer_scalar", (None,), lambda c: (1,), hf=_L + "layer_scalar", init="ones"),
    Weight("layers/enc_layer_scalar", (None,), lambda c: (1,),
           hf="model.encoder.language_model.layers.{i}.layer_scalar", init="ones"),
    *_attention_weights(SLIDING),
    *_attention_weights(FULL),
)

FAMILY = Family(
    arch="diffusion_gemma", weights=WEIGHTS, layer_groups=_groups,
    hf_ignore=(r".*rotary_emb\.inv_freq$", r"^lm_head\.weight$",
               # the encoder's text weights are tied to the decoder's (transformers keeps the
               # decoder's when both are saved); only its layer_scalar buffers are its own
               r"^model\.encoder\.language_model\.(?!layers\.\d+\.layer_scalar$).*"),
    hf_dropped=((r"^model\.encoder\.(vision_tower|embed_vision)\.",
                 "the vision tower (DiffusionGemma is ported text-only)"),),
)


# ----------------------------------------------------------------------------- pieces
class EncoderCache(NamedTuple):
    """Keys / values the encoder wrote, per layer type: `k[kind]`, `v[kind]`
    `[layers of that kind, B, S, kv_heads, head_dim]` (post-norm, keys post-RoPE), with the
    RoPE `positions [B, S]` and `valid [B, S]` (False on padding) of the entries."""

    k: dict[str, jax.Array]
    v: dict[str, jax.Array]
    positions: jax.Array
    valid: jax.Array


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """transformers' Gemma-4 RMSNorm: float32 normalise, times the (float32) scale, cast back."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        xf = xf * weight.astype(jnp.float32)
    return xf.astype(x.dtype)


def inv_freq(head_dim: int, theta: float, fraction: float) -> np.ndarray:
    """`head_dim / 2` RoPE frequencies: the first `int(fraction * head_dim // 2)` of base
    theta over `head_dim` (proportional RoPE), the rest 0 (no rotation)."""
    n = int(fraction * head_dim // 2)
    out = np.zeros(head_dim // 2, np.float64)
    out[:n] = 1.0 / theta ** (np.arange(0, 2 * n, 2, dtype=np.float64) / head_dim)
    return out


def rope(cfg: ModelConfig, kind: str, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, T, head_dim]` (float32) of a layer type."""
    if kind == SLIDING:
        f = inv_freq(cfg.head_dim, cfg.rope_theta, 1.0)
    else:
        f = inv_freq(cfg.global_head_dim, cfg.global_rope_theta, cfg.global_rope_fraction)
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(f, jnp.float32)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def scaled_embed(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    e = params["embed"]
    return jnp.take(e, tokens, axis=0) * jnp.asarray(cfg.hidden_size ** 0.5, jnp.float32).astype(e.dtype)


def gelu_mlp(p: Params, h: jax.Array, prefix: str = "") -> jax.Array:
    if prefix + "gate_up_proj" in p:          # fused layout (params.unstack_layers)
        gate, up = jnp.split(dense(h, p[prefix + "gate_up_proj"]), 2, axis=-1)
    else:
        gate, up = dense(h, p[prefix + "gate_proj"]), dense(h, p[prefix + "up_proj"])
    return dense(jax.nn.gelu(gate, approximate=True) * up, p[prefix + "down_proj"])


def lm_logits(params: Params, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """Final-normed hidden `[B, T, D]` -> soft-capped float32 logits `[B, T, V]` (tied head)."""
    logits = jnp.einsum("btd,vd->btv", h, params["embed"], preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST if h.dtype == jnp.float32 else None)
    if cfg.logit_softcap > 0:
        logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
    return logits


def _layer_params(params: Params, cfg: ModelConfig, i: int) -> tuple[Params, Params, str, int]:
    """Layer i's shared params, its attention params, its type and its row in the type's stack."""
    kind = cfg.layer_types[i]
    layers = params["layers"]
    lp = layers[i] if isinstance(layers, (list, tuple)) else {k: a[i] for k, a in layers.items()}
    row = _groups(cfg)[kind].index(i)
    return lp, {k: a[row] for k, a in params[kind].items()}, kind, row


def _project(cfg: ModelConfig, ap: Params, kind: str, h: jax.Array, cos: jax.Array,
             sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, t, _ = h.shape
    hd = cfg.head_dim if kind == SLIDING else cfg.global_head_dim
    q = dense(h, ap["q_proj"]).reshape(b, t, cfg.num_heads, hd)
    k_raw = dense(h, ap["k_proj"]).reshape(b, t, -1, hd)
    v_raw = dense(h, ap["v_proj"]).reshape(b, t, -1, hd) if kind == SLIDING else k_raw
    eps = cfg.rms_norm_eps
    q = apply_rope(rms_norm(q, ap["q_norm"], eps), cos, sin)
    k = apply_rope(rms_norm(k_raw, ap["k_norm"], eps), cos, sin)
    return q, k, rms_norm(v_raw, None, eps)


def _layer(cfg: ModelConfig, lp: Params, ap: Params, kind: str, row: int, x: jax.Array,
           tables: dict[str, tuple[jax.Array, jax.Array]], attend: Any, scalar: str,
           moe_impl: MoEImpl) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    eps = cfg.rms_norm_eps
    b, t, d = x.shape
    q, k, v = _project(cfg, ap, kind, rms_norm(x, lp["attn_norm"], eps), *tables[kind])
    a = attend(kind, row, q * jnp.asarray(q.shape[-1] ** 0.5, q.dtype), k, v)  # scaling 1
    x = x + rms_norm(dense(a.reshape(b, t, -1), ap["o_proj"]), lp["post_attn_norm"], eps)
    dense_out = rms_norm(gelu_mlp(lp, rms_norm(x, lp["mlp_norm"], eps)), lp["post_mlp_norm"], eps)
    flat = x.reshape(b * t, d)
    weights, idx = route(lp, flat, cfg.top_k_experts, eps)
    moe_out = experts(lp, rms_norm(flat, lp["moe_norm"], eps), weights, idx, moe_impl)
    moe_out = rms_norm(moe_out.reshape(b, t, d), lp["post_moe_norm"], eps)
    x = x + rms_norm(dense_out + moe_out, lp["post_ffw_norm"], eps)
    return x * lp[scalar].astype(x.dtype), (k, v)


def _run(params: Params, cfg: ModelConfig, x: jax.Array, positions: jax.Array, attend: Any,
         scalar: str, moe_impl: MoEImpl) -> tuple[jax.Array, dict[str, list], dict[str, list]]:
    tables = {kind: rope(cfg, kind, positions) for kind in (SLIDING, FULL)}
    ks: dict[str, list] = {SLIDING: [], FULL: []}
    vs: dict[str, list] = {SLIDING: [], FULL: []}
    for i in range(cfg.num_layers):
        lp, ap, kind, row = _layer_params(params, cfg, i)
        x, (k, v) = _layer(cfg, lp, ap, kind, row, x, tables, attend, scalar, moe_impl)
        ks[kind].append(k)
        vs[kind].append(v)
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), ks, vs


# ----------------------------------------------------------------------------- entry points
def encode(params: Params, cfg: ModelConfig, tokens: jax.Array, valid: jax.Array | None = None,
           positions: jax.Array | None = None, cache: EncoderCache | None = None, *,
           attn_impl: AttentionImpl = "auto", mesh: Any = None, moe_impl: MoEImpl = "ragged"
           ) -> tuple[jax.Array, EncoderCache]:
    """The causal encoder over `tokens [B, T]` (after `cache`'s entries, if given).

    valid: `[B, T]` bool, False on (left) padding; None: all valid. positions: `[B, T]` RoPE
    positions; default continues the cache (`0..T-1` without one).
    Returns the final-normed hidden states `[B, T, D]` and the cache extended by T entries.
    """
    b, t = tokens.shape
    if valid is None:
        valid = jnp.ones((b, t), bool)
    if positions is None:
        start = 0 if cache is None else cache.positions[:, -1:] + 1
        positions = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    k_pos, k_valid = positions, valid
    if cache is not None:
        k_pos = jnp.concatenate([cache.positions, positions], axis=1)
        k_valid = jnp.concatenate([cache.valid, valid], axis=1)
    qp, kp = positions[:, :, None], k_pos[:, None, :]
    causal = k_valid[:, None, :] & (kp <= qp)
    masks = {FULL: causal, SLIDING: causal & (kp > qp - cfg.sliding_window)}
    rows = _groups(cfg)

    def attend(kind: str, row: int, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        if cache is not None:
            k = jnp.concatenate([cache.k[kind][row], k], axis=1)
            v = jnp.concatenate([cache.v[kind][row], v], axis=1)
        return dot_product_attention(q, k, v, masks[kind], attn_impl, mesh)

    h, ks, vs = _run(params, cfg, scaled_embed(params, cfg, tokens), positions, attend,
                     "enc_layer_scalar", moe_impl)
    new_k = {kind: jnp.stack(ks[kind]) for kind in rows}
    new_v = {kind: jnp.stack(vs[kind]) for kind in rows}
    if cache is not None:
        new_k = {kind: jnp.concatenate([cache.k[kind], new_k[kind]], axis=2) for kind in rows}
        new_v = {kind: jnp.concatenate([cache.v[kind], new_v[kind]], axis=2) for kind in rows}
    return h, EncoderCache(new_k, new_v, k_pos, k_valid)


def self_conditioning(params: Params, cfg: ModelConfig, x: jax.Array,
                      sc_logits: jax.Array | None, sc_mask: jax.Array | None = None
                      ) -> jax.Array:
    """Canvas embeddings `x [B, C, D]` plus the signal of the previous step's logits
    (`[B, C, V]`, None on the first step), RMS-normed. `sc_mask [B]` False zeroes a row's
    signal (exactly as if no logits were given, transformers' `self_conditioning_mask`)."""
    if sc_logits is None:
        soft = jnp.zeros_like(x)
    else:
        e = params["embed"]
        p = jax.nn.softmax(sc_logits.astype(jnp.float32), axis=-1).astype(e.dtype)
        soft = jnp.einsum("bcv,vd->bcd", p, e,
                          precision=jax.lax.Precision.HIGHEST if e.dtype == jnp.float32 else None)
        soft = soft * jnp.asarray(cfg.hidden_size ** 0.5, jnp.float32).astype(e.dtype)
        soft = soft.astype(x.dtype)
        if sc_mask is not None:
            soft = soft * sc_mask.astype(soft.dtype)[:, None, None]
    sc = gelu_mlp(params, rms_norm(soft, params["sc_norm"], cfg.rms_norm_eps), prefix="sc_")
    return rms_norm(x + sc, None, cfg.rms_norm_eps)


def denoise(params: Params, cfg: ModelConfig, canvas: jax.Array, cache: EncoderCache,
            sc_logits: jax.Array | None = None, positions: jax.Array | None = None,
            sc_mask: jax.Array | None = None, *, attn_impl: AttentionImpl = "auto",
            mesh: Any = None, moe_impl: MoEImpl = "ragged") -> jax.Array:
    """The denoiser's float32 soft-capped logits `[B, C, V]` for a canvas `[B, C]`.

    The canvas attends bidirectionally to itself and to the valid cache entries (on sliding
    layers only those with position > first canvas position - sliding_window). positions:
    `[B, C]`; default the positions right after the cache's last entry. sc_logits / sc_mask:
    see `self_conditioning`.
    """
    b, c = canvas.shape
    if positions is None:
        positions = cache.positions[:, -1:] + 1 + jnp.arange(c, dtype=jnp.int32)[None, :]
    start = positions[:, :1]
    ones = jnp.ones((b, c), bool)
    full = jnp.concatenate([cache.valid, ones], axis=1)
    local = jnp.concatenate([cache.valid & (cache.positions > start - cfg.sliding_window), ones],
                            axis=1)
    masks = {kind: jnp.broadcast_to(m[:, None, :], (b, c, m.shape[1]))
             for kind, m in ((FULL, full), (SLIDING, local))}

    def attend(kind: str, row: int, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        k = jnp.concatenate([cache.k[kind][row], k], axis=1)
        v = jnp.concatenate([cache.v[kind][row], v], axis=1)
        return dot_product_attention(q, k, v, masks[kind], attn_impl, mesh)

    x = self_conditioning(params, cfg, scaled_embed(params, cfg, canvas), sc_logits, sc_mask)
    h, _, _ = _run(params, cfg, x, positions, attend, "layer_scalar", moe_impl)
    return lm_logits(params, cfg, h)
