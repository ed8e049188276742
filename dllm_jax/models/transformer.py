"""The forward passes of the dense decoder families (LLaDA, Dream, SDAR): a bidirectional (or
block-causal) pre-norm transformer as pure functions of a params pytree.

Three entry points, all returning float32 logits of the requested query positions only
(`[batch, n_query, vocab]`: the LM head never sees `[batch, length, vocab]` when a block is
asked for):
  `apply`          a full forward,
  `apply_refresh`  a full forward that also returns every layer's keys/values (a KVCache),
  `apply_cached`   a forward over a short region whose context comes from a KVCache.
and one for speculative verification (`dllm_jax.speculative`), returning hidden states:
  `apply_with_references`  tokens at explicit positions under an explicit attention mask,
                   optionally after a KVCache's entries.
Attention is chosen by explicit keywords carried down the call: `attn_impl` ("xla" | "cudnn" |
"auto" | "ring") and `mesh` (a mesh whose `seq` axis is > 1 makes attention sequence-parallel).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dllm_jax.attention import AttentionImpl, attention_mask, dot_product_attention
from dllm_jax.cache import KVCache
from dllm_jax.config import ModelConfig
from dllm_jax.models.layers import (attention_out_and_mlp, embed, lm_logits, project_qkv,
                                    rope_tables)

Params = dict[str, Any]
#: attend(q, k, v, cached_k, cached_v) -> attention output `[B, T, H, hd]`.
Attend = Callable[..., jax.Array]


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


def query_logits(cfg: ModelConfig, params: Params, x: jax.Array, query_idx: jax.Array
                 ) -> jax.Array:
    """Hidden states `[B, T, D]` -> float32 logits `[B, Q, V]` at `query_idx [B, Q]`."""
    src = logit_source_index(cfg, query_idx)
    return lm_logits(cfg, params, jnp.take_along_axis(x, src[:, :, None], axis=1))


def run_layers(cfg: ModelConfig, params: Params, x: jax.Array, cos: jax.Array, sin: jax.Array,
               attend: Attend, cache: KVCache | None = None, collect_kv: bool = False,
               into: KVCache | None = None) -> tuple[jax.Array, Any]:
    """The layers over `x [B, T, D]`.

    Stacked layers (a dict of `[L, ...]` arrays) run under `lax.scan`; per-layer layers (a
    list of dicts, see `params.unstack_layers`) run as an unrolled Python loop, so that no
    layer's weights are sliced (and on GPU copied) out of a stacked buffer at every call.

    Returns the final hidden states and, with collect_kv, the per-layer (post-RoPE) keys and
    values `[L, B, T, Hkv, hd]`: stacked into new arrays, or with `into` (a KVCache
    `[L, B, C, Hkv, hd]`) written layer by layer into its first min(T, C) entries, so that a
    cache carried by the decode loop is updated in place instead of a second one built beside
    it (per-layer params; the stacked layout's scan builds its own).
    """
    def layer(x: jax.Array, xs: Any) -> tuple[jax.Array, Any]:
        lp, ck, cv = xs
        q, k, v = project_qkv(cfg, lp, x, cos, sin)
        x = attention_out_and_mlp(cfg, lp, x, attend(q, k, v, ck, cv))
        return x, ((k, v) if collect_kv else None)

    layers = params["layers"]
    if isinstance(layers, (list, tuple)) and into is not None:
        k_all, v_all = into.k, into.v
        n = min(x.shape[1], k_all.shape[2])     # a longer sequence keeps its first n entries
        for i, lp in enumerate(layers):
            x, (k, v) = layer(x, (lp, None, None))
            k_all = k_all.at[i, :, :n].set(k[:, :n].astype(k_all.dtype))
            v_all = v_all.at[i, :, :n].set(v[:, :n].astype(v_all.dtype))
        return x, (k_all, v_all)
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


def _mask_block(cfg: ModelConfig) -> int:
    return cfg.block_size if cfg.block_causal else 0


def _full_forward(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
                  key_valid: jax.Array | None, attn_impl: AttentionImpl, mesh: Any,
                  collect_kv: bool = False, into: KVCache | None = None
                  ) -> tuple[jax.Array, Any]:
    """All layers over the whole sequence `[B, T]` -> final hidden states `[B, T, D]` (+ k/v)."""
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    mask = attention_mask(positions, positions, key_valid, _mask_block(cfg))

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, ck: Any, cv: Any) -> jax.Array:
        return dot_product_attention(q, k, v, mask, attn_impl, mesh)

    return run_layers(cfg, params, embed(params, tokens), cos, sin, attend,
                      collect_kv=collect_kv, into=into)


def apply(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    key_valid: jax.Array | None = None,
    query_idx: jax.Array | None = None,
    *,
    attn_impl: AttentionImpl = "auto",
    mesh: Any = None,
) -> jax.Array:
    """Logits of the denoiser at the requested query positions.

    Args:
      params: pytree laid out as in `params.py` (float32 or bfloat16 leaves; any layout).
      cfg: the model's config (static).
      tokens: `[batch, length]` int token ids (MASK where the model should predict).
      positions: `[batch, length]` int RoPE positions; default `default_positions(key_valid)`
        (or 0..length-1 without a key mask).
      key_valid: `[batch, length]` bool, False on left padding; None means no padding.
      query_idx: `[batch, n_query]` int sequence indices whose logits are wanted (e.g. the
        active block); None means every position.
      attn_impl, mesh: attention kernel and device mesh (see `attention`).
    Returns:
      float32 logits `[batch, n_query, vocab]` (Dream's shift already applied).
    """
    b, t = tokens.shape
    if positions is None:
        if key_valid is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        else:
            positions = default_positions(key_valid)
    x, _ = _full_forward(params, cfg, tokens, positions, key_valid, attn_impl, mesh)
    if query_idx is None:
        query_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return query_logits(cfg, params, x, query_idx)


def apply_refresh(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
                  key_valid: jax.Array, query_idx: jax.Array, *,
                  attn_impl: AttentionImpl = "auto", mesh: Any = None,
                  into: KVCache | None = None) -> tuple[jax.Array, KVCache]:
    """A full forward that also returns every layer's keys/values as a KVCache.

    Shapes as in `apply`; the cache holds `[L, B, T, Hkv, hd]` post-RoPE keys and values.
    into: a KVCache `[L, B, >= T, Hkv, hd]` whose first T entries to overwrite (the decode
      loop's carried cache: written in place, one cache alive instead of two) instead of
      building a new one; per-layer params only (the stacked layout's scan builds its own).
    """
    x, (ks, vs) = _full_forward(params, cfg, tokens, positions, key_valid, attn_impl, mesh,
                                collect_kv=True, into=into)
    return query_logits(cfg, params, x, query_idx), KVCache(k=ks, v=vs)


def apply_cached(params: Params, cfg: ModelConfig, cache: KVCache, tokens: jax.Array,
                 positions: jax.Array, valid: jax.Array, cache_positions: jax.Array,
                 cache_usable: jax.Array, query_idx: jax.Array, *,
                 attn_impl: AttentionImpl = "auto", mesh: Any = None,
                 collect_kv: bool = False) -> Any:
    """Logits for a region of R tokens whose context outside the region comes from a cache.

    Args:
      cache: KVCache `[L, B, T, Hkv, hd]`.
      tokens, positions, valid: `[B, R]` the recomputed region (valid False on padding).
      cache_positions: `[B, T]` RoPE positions of the cached entries.
      cache_usable: `[B, T]` bool, cached entries the region may attend to (the region's own
        stale entries must be excluded).
      query_idx: `[B, Q]` indices INTO THE REGION whose logits are wanted.
      collect_kv: also return the region's own (post-RoPE) keys/values as a KVCache
        `[L, B, R, Hkv, hd]` (what a block-causal cache writes once a block is final).
    Returns:
      float32 logits `[B, Q, V]` (with collect_kv: and the region's KVCache).
    """
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    mask = attention_mask(positions, jnp.concatenate([cache_positions, positions], axis=1),
                          jnp.concatenate([cache_usable, valid], axis=1), _mask_block(cfg))

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, ck: jax.Array, cv: jax.Array
               ) -> jax.Array:
        return dot_product_attention(q, jnp.concatenate([ck, k], axis=1),
                                     jnp.concatenate([cv, v], axis=1), mask, attn_impl, mesh)

    x, kv = run_layers(cfg, params, embed(params, tokens), cos, sin, attend, cache=cache,
                       collect_kv=collect_kv)
    logits = query_logits(cfg, params, x, query_idx)
    return (logits, KVCache(k=kv[0], v=kv[1])) if collect_kv else logits


def apply_with_references(params: Params, cfg: ModelConfig, tokens: jax.Array,
                          positions: jax.Array, mask: jax.Array, *, cache: KVCache | None = None,
                          n_main: int = 0, main_mask: jax.Array | None = None,
                          collect_kv: bool = False, attn_impl: AttentionImpl = "auto",
                          mesh: Any = None, into: KVCache | None = None) -> Any:
    """Final hidden states (before the final norm) of tokens under explicit masks.

    Args:
      tokens: `[B, n_main + R]` token ids: an optional main sequence (the first `n_main`),
        then R reference tokens (e.g. copies of a region holding drafted tokens: the
        speculative verification's groups).
      positions: `[B, n_main + R]` their RoPE positions (a copy carries its original's).
      mask: bool `[B, R, C + n_main + R]`: the keys each reference token may attend to: the C
        entries of `cache` (C = 0 without one), then the main sequence, then the references.
        The model's own rule (block-causal, padding) must already be in it.
      cache: a KVCache `[L, B, C, Hkv, hd]` whose keys/values come first, or None.
      n_main, main_mask: the main sequence attends only to itself, under `main_mask`
        `[B, n_main, n_main]` (so it is exactly a full forward of those tokens).
      collect_kv: also return every token's keys/values as a KVCache `[L, B, n_main + R,
        Hkv, hd]` (the main sequence's are a refreshed cache); with `into` (a KVCache
        `[L, B, n_main, Hkv, hd]`, per-layer params) only the main sequence's, written into it
        in place.
    Returns:
      `[B, n_main + R, D]` hidden states (with collect_kv: and the KVCache);
      `layers.lm_logits` turns chosen rows into logits (a position's logits come from the
      row `logit_source_index` names).
    """
    if n_main and cache is not None:
        raise ValueError("apply_with_references takes a main sequence or a cache, not both.")
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, ck: Any, cv: Any) -> jax.Array:
        if ck is not None:
            k, v = jnp.concatenate([ck, k], axis=1), jnp.concatenate([cv, v], axis=1)
        if not n_main:
            return dot_product_attention(q, k, v, mask, attn_impl, mesh)
        main = dot_product_attention(q[:, :n_main], k[:, :n_main], v[:, :n_main], main_mask,
                                     attn_impl, mesh)
        refs = dot_product_attention(q[:, n_main:], k, v, mask, attn_impl, mesh)
        return jnp.concatenate([main, refs], axis=1)

    x, kv = run_layers(cfg, params, embed(params, tokens), cos, sin, attend, cache=cache,
                       collect_kv=collect_kv, into=into if collect_kv else None)
    return (x, KVCache(k=kv[0], v=kv[1])) if collect_kv else x
