"""The denoiser: a bidirectional (or block-causal) pre-norm transformer as pure functions of a
params pytree.

Params layout (one table; `checkpoints_convert` and `sharding` read it). Dense weights are
stored `[in, out]` (transposed from PyTorch's `[out, in]`); per-layer tensors are stacked on a
leading `[num_layers]` axis so that the layers run under one `lax.scan`:

    embed        [V, D]
    layers/attn_norm  [L, D]            layers/mlp_norm   [L, D]
    layers/q_proj     [L, D, H*hd]      layers/q_bias     [L, H*hd]     (qkv_bias)
    layers/k_proj     [L, D, Hkv*hd]    layers/k_bias     [L, Hkv*hd]   (qkv_bias)
    layers/v_proj     [L, D, Hkv*hd]    layers/v_bias     [L, Hkv*hd]   (qkv_bias)
    layers/q_norm     [L, hd]           layers/k_norm     [L, hd]       (qk_norm)
    layers/o_proj     [L, H*hd, D]
    layers/gate_proj  [L, D, F]         layers/up_proj    [L, D, F]
    layers/down_proj  [L, F, D]
    final_norm   [D]
    lm_head      [D, V]                 (absent when tie_embeddings)

Numerics follow the PyTorch originals: RMSNorm and RoPE in float32, softmax in float32,
logits returned in float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax.attention import (AttentionImpl, attention_mask, dot_product_attention,
                                matmul_precision)
from dllm_jax.config import ModelConfig

if TYPE_CHECKING:
    from dllm_jax.cache import KVCache

Params = dict[str, Any]


# ----------------------------------------------------------------------------- layout
def param_shapes(cfg: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """The params pytree of `cfg` as `jax.ShapeDtypeStruct`s (no memory allocated)."""
    L, D, V, F = cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    hd = cfg.head_dim

    def s(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))

    layers: Params = {
        "attn_norm": s(L, D),
        "q_proj": s(L, D, cfg.q_size),
        "k_proj": s(L, D, cfg.kv_size),
        "v_proj": s(L, D, cfg.kv_size),
        "o_proj": s(L, cfg.q_size, D),
        "mlp_norm": s(L, D),
        "gate_proj": s(L, D, F),
        "up_proj": s(L, D, F),
        "down_proj": s(L, F, D),
    }
    if cfg.qkv_bias:
        layers.update(q_bias=s(L, cfg.q_size), k_bias=s(L, cfg.kv_size), v_bias=s(L, cfg.kv_size))
    if cfg.qk_norm:
        layers.update(q_norm=s(L, hd), k_norm=s(L, hd))
    params: Params = {"embed": s(V, D), "layers": layers, "final_norm": s(D)}
    if not cfg.tie_embeddings:
        params["lm_head"] = s(D, V)
    return params


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32,
                std: float = 0.02) -> Params:
    """Random params (normal(0, std) weights, zero biases, unit norm scales)."""
    shapes = param_shapes(cfg, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, sd), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            out.append(jnp.ones(sd.shape, sd.dtype))
        elif "bias" in name:
            out.append(jnp.zeros(sd.shape, sd.dtype))
        else:
            out.append((std * jax.random.normal(k, sd.shape, jnp.float32)).astype(sd.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- pieces
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis in float32, cast back to x's dtype, then scaled."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables `[batch, len, head_dim]` (float32) for the half-split RoPE layout."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `[batch, len, heads, head_dim]` by tables `[batch, len, head_dim]` (float32 math)."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rot * sin[:, :, None, :]
    return out.astype(x.dtype)


def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...i,io->...o", x, w, precision=matmul_precision(w.dtype))


def project_qkv(cfg: ModelConfig, lp: Params, x: jax.Array, cos: jax.Array, sin: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer's queries, keys, values for hidden states `x [B, T, D]`, RoPE applied.

    Returns q `[B, T, H, hd]`, k and v `[B, T, Hkv, hd]`.
    """
    b, t, _ = x.shape
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    if "qkv_proj" in lp:                      # fused layout (see `unstack_layers`)
        qkv = _dense(h, lp["qkv_proj"])
        if cfg.qkv_bias:
            qkv = qkv + lp["qkv_bias"]
        q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
    else:
        q, k, v = _dense(h, lp["q_proj"]), _dense(h, lp["k_proj"]), _dense(h, lp["v_proj"])
        if cfg.qkv_bias:
            q, k, v = q + lp["q_bias"], k + lp["k_bias"], v + lp["v_bias"]
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_out_and_mlp(cfg: ModelConfig, lp: Params, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Residual updates after attention: `x + o_proj(attn)`, then `+ SwiGLU(mlp_norm(.))`."""
    b, t = attn.shape[:2]
    x = x + _dense(attn.reshape(b, t, cfg.q_size), lp["o_proj"])
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    if "gate_up_proj" in lp:                  # fused layout (see `unstack_layers`)
        gate, up = jnp.split(_dense(h, lp["gate_up_proj"]), 2, axis=-1)
    else:
        gate, up = _dense(h, lp["gate_proj"]), _dense(h, lp["up_proj"])
    return x + _dense(jax.nn.silu(gate) * up, lp["down_proj"])


def lm_logits(cfg: ModelConfig, params: Params, h: jax.Array) -> jax.Array:
    """Final norm and LM head: hidden `[B, Q, D]` -> float32 logits `[B, Q, V]`."""
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    precision = matmul_precision(h.dtype)
    if cfg.tie_embeddings:
        return jnp.einsum("bqd,vd->bqv", h, params["embed"], preferred_element_type=jnp.float32,
                          precision=precision)
    return jnp.einsum("bqd,dv->bqv", h, params["lm_head"], preferred_element_type=jnp.float32,
                      precision=precision)


def default_positions(key_valid: jax.Array) -> jax.Array:
    """Per-row positions for a left-padded batch: 0 at each row's first real token.

    `key_valid [B, T]` bool -> `[B, T]` int32 (padding positions are clipped to 0).
    """
    return jnp.maximum(jnp.cumsum(key_valid.astype(jnp.int32), axis=1) - 1, 0)


def logit_source_index(cfg: ModelConfig, query_idx: jax.Array) -> jax.Array:
    """Sequence index whose output predicts each query index (Dream reads i - 1; first keeps 0)."""
    if cfg.logits_shift:
        return jnp.maximum(query_idx - 1, 0)
    return query_idx


# ----------------------------------------------------------------------------- forward
def apply(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    key_valid: jax.Array | None = None,
    query_idx: jax.Array | None = None,
    *,
    attn_impl: AttentionImpl = "auto",
) -> jax.Array:
    """Logits of the denoiser at the requested query positions.

    Args:
      params: pytree laid out as in the module docstring (float32 or bfloat16 leaves).
      cfg: the model's config (static).
      tokens: `[batch, length]` int token ids (MASK where the model should predict).
      positions: `[batch, length]` int RoPE positions; default `default_positions(key_valid)`
        (or 0..length-1 without a key mask).
      key_valid: `[batch, length]` bool, False on left padding; None means no padding.
      query_idx: `[batch, n_query]` int sequence indices whose logits are wanted (e.g. the
        active block); None means every position. Only these rows reach the LM head, so the
        `[length, vocab]` logits tensor is never built when a block is asked for.
      attn_impl: attention kernel, see `attention.dot_product_attention`.
    Returns:
      float32 logits `[batch, n_query, vocab]` (Dream's shift already applied).
    """
    b, t = tokens.shape
    if positions is None:
        if key_valid is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        else:
            positions = default_positions(key_valid)
    x, _ = _full_forward(params, cfg, tokens, positions, key_valid, attn_impl)
    if query_idx is None:
        query_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return _query_logits(cfg, params, x, query_idx)


# ----------------------------------------------------------------------------- KV cache
def _run_layers(cfg: ModelConfig, params: Params, x: jax.Array, cos: jax.Array, sin: jax.Array,
                attend: Any, cache: Any = None, collect_kv: bool = False
                ) -> tuple[jax.Array, Any]:
    """The layers over `x`. `attend(q, k, v, cached_k, cached_v) -> out`.

    Stacked layers (a dict of `[L, ...]` arrays) run under `lax.scan`; per-layer layers (a
    list of dicts, see `unstack_layers`) run as an unrolled Python loop, so that no layer's
    weights are sliced (and on GPU copied) out of a stacked buffer at every call.

    Returns the final hidden states and, with collect_kv, the per-layer (post-RoPE) keys and
    values `[L, B, T, Hkv, hd]`.
    """
    def layer(x: jax.Array, xs: Any) -> tuple[jax.Array, Any]:
        lp, ck, cv = xs
        q, k, v = project_qkv(cfg, lp, x, cos, sin)
        x = attention_out_and_mlp(cfg, lp, x, attend(q, k, v, ck, cv))
        return x, ((k, v) if collect_kv else None)

    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        kvs = []
        for i, lp in enumerate(layers):
            ck = None if cache is None else cache.k[i]
            cv = None if cache is None else cache.v[i]
            x, kv = layer(x, (lp, ck, cv))
            kvs.append(kv)
        if not collect_kv:
            return x, None
        return x, (jnp.stack([k for k, _ in kvs]), jnp.stack([v for _, v in kvs]))
    xs = (layers, None if cache is None else cache.k, None if cache is None else cache.v)
    return jax.lax.scan(layer, x, xs)


_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "qkv_bias": ("q_bias", "k_bias", "v_bias"),
          "gate_up_proj": ("gate_proj", "up_proj")}


def unstack_layers(params: Params, fuse: bool = False) -> Params:
    """The same params with `layers` as a list of per-layer dicts (one buffer per weight).

    On GPU the per-layer layout runs faster (no weight copies out of the stacked buffers
    inside the layer loop); call it once, outside jit. Each stacked leaf is released as soon
    as it is split, so the peak extra memory is one stacked leaf (if the caller drops its
    own reference to the stacked params).

    fuse: also join q/k/v into one `qkv_proj [D, q+2kv]` (and biases into `qkv_bias`) and
    gate/up into one `gate_up_proj [D, 2F]`, so that each is one wider matmul.
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        per_layer = [dict(lp) for lp in layers]
    else:
        names = list(layers)
        n = layers[names[0]].shape[0]
        per_layer = [{} for _ in range(n)]
        stacked = dict(layers)
        for name in names:
            leaf = stacked.pop(name)
            for i in range(n):
                per_layer[i][name] = leaf[i]
            del leaf
    if fuse:
        for lp in per_layer:
            for joined, parts in _FUSED.items():
                if all(p in lp for p in parts):
                    lp[joined] = jnp.concatenate([lp.pop(p) for p in parts], axis=-1)
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = per_layer
    return out


def decode_layout(params: Params, fuse: bool = True) -> Params:
    """The params layout that decodes fastest on this backend: per-layer (and, with fuse,
    fused q/k/v and gate/up) weights on accelerators, where the scan's weight slices cost
    copies every step; the stacked layout (one `lax.scan`, quicker to compile) on CPU."""
    if jax.default_backend() == "cpu":
        return params
    return unstack_layers(params, fuse=fuse)


def stack_layers(params: Params, cfg: ModelConfig | None = None) -> Params:
    """Inverse of `unstack_layers`: `layers` as a dict of `[L, ...]` arrays (a fused layout
    is split again, which needs `cfg`)."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return params
    split = []
    for lp in layers:
        lp = dict(lp)
        if "qkv_proj" in lp or "gate_up_proj" in lp:
            if cfg is None:
                raise ValueError("stack_layers needs the ModelConfig to split fused weights.")
            cuts = [cfg.q_size, cfg.q_size + cfg.kv_size]
            for joined in ("qkv_proj", "qkv_bias"):
                if joined in lp:
                    for p, a in zip(_FUSED[joined], jnp.split(lp.pop(joined), cuts, axis=-1)):
                        lp[p] = a
            if "gate_up_proj" in lp:
                lp["gate_proj"], lp["up_proj"] = jnp.split(lp.pop("gate_up_proj"), 2, axis=-1)
        split.append(lp)
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = {name: jnp.stack([lp[name] for lp in split]) for name in split[0]}
    return out


def _full_forward(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
                  key_valid: jax.Array | None, attn_impl: AttentionImpl,
                  collect_kv: bool = False) -> tuple[jax.Array, Any]:
    """All layers over the whole sequence `[B, T]` -> final hidden states `[B, T, D]` (+ k/v)."""
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    mask = attention_mask(positions, positions, key_valid,
                          cfg.block_size if cfg.block_causal else 0)
    attend = lambda q, k, v, ck, cv: dot_product_attention(q, k, v, mask, attn_impl)  # noqa: E731
    return _run_layers(cfg, params, _embed(params, tokens), cos, sin, attend,
                       collect_kv=collect_kv)


def _embed(params: Params, tokens: jax.Array) -> jax.Array:
    return jnp.take(params["embed"], tokens, axis=0)


def _query_logits(cfg: ModelConfig, params: Params, x: jax.Array, query_idx: jax.Array
                  ) -> jax.Array:
    src = logit_source_index(cfg, query_idx)
    return lm_logits(cfg, params, jnp.take_along_axis(x, src[:, :, None], axis=1))


def apply_refresh(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
                  key_valid: jax.Array, query_idx: jax.Array, *,
                  attn_impl: AttentionImpl = "auto") -> tuple[jax.Array, "KVCache"]:
    """A full forward that also returns every layer's keys/values as a KVCache.

    Shapes as in `apply`; the cache holds `[L, B, T, Hkv, hd]` post-RoPE keys and values.
    """
    from dllm_jax.cache import KVCache

    x, (ks, vs) = _full_forward(params, cfg, tokens, positions, key_valid, attn_impl,
                                collect_kv=True)
    return _query_logits(cfg, params, x, query_idx), KVCache(k=ks, v=vs)


def apply_cached(params: Params, cfg: ModelConfig, cache: "KVCache", tokens: jax.Array,
                 positions: jax.Array, valid: jax.Array, cache_positions: jax.Array,
                 cache_usable: jax.Array, query_idx: jax.Array, *,
                 attn_impl: AttentionImpl = "auto") -> jax.Array:
    """Logits for a region of R tokens whose context outside the region comes from a cache.

    Args:
      cache: KVCache `[L, B, T, Hkv, hd]`.
      tokens, positions, valid: `[B, R]` the recomputed region (valid False on padding).
      cache_positions: `[B, T]` RoPE positions of the cached entries.
      cache_usable: `[B, T]` bool, cached entries the region may attend to (the region's own
        stale entries must be excluded).
      query_idx: `[B, Q]` indices INTO THE REGION whose logits are wanted.
    Returns:
      float32 logits `[B, Q, V]`.
    """
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    mask = attention_mask(positions, jnp.concatenate([cache_positions, positions], axis=1),
                          jnp.concatenate([cache_usable, valid], axis=1),
                          cfg.block_size if cfg.block_causal else 0)

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, ck: jax.Array, cv: jax.Array
               ) -> jax.Array:
        return dot_product_attention(q, jnp.concatenate([ck, k], axis=1),
                                     jnp.concatenate([cv, v], axis=1), mask, attn_impl)

    x, _ = _run_layers(cfg, params, _embed(params, tokens), cos, sin, attend, cache=cache)
    return _query_logits(cfg, params, x, query_idx)
