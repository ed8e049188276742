"""The training objective: LLaDA's masked-diffusion loss, or SDAR-style block diffusion.

Masked diffusion (LLaDA, SFT form). For each `[prompt | answer]` sequence draw `t ~ U(eps, 1)`,
replace each answer token by `<mask>` with probability `t` (the prompt is never masked), and
minimise

    loss = sum_{b, i in answer, masked} CE(logits[b, i], answer[b, i]) / t_b  /  (B * answer_length)

(the 1/t-weighted cross-entropy on the masked answer positions, normalised by the number of
answer tokens).

Block diffusion (`TrainConfig.block_diffusion`, SDAR / BD3-LM style). The model attends
block-causally (`ModelConfig.block_causal`, blocks of `block_size` positions counted from each
row's first real token, as `attention.attention_mask` counts them). Each block draws its own
`t ~ U(eps, 1)` and its answer tokens are masked with that probability and weighted 1/t. The
forward runs on the concatenation `[x_t | x_0]` (noisy copy, clean copy; same RoPE positions),
with this mask (q = query, k = key, b(.) = block):

    noisy q -> noisy k : b(k) == b(q)     (its own block, bidirectional)
    noisy q -> clean k : b(k) <  b(q)     (the clean context, as block-wise decoding sees it)
    clean q -> clean k : b(k) <= b(q)     (block-causal, builds the clean context)
    clean q -> noisy k : never

so every block is denoised from the clean blocks before it in one forward, which is exactly
what block-by-block decoding with a KV cache of finished blocks sees.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dllm_jax.attention import dot_product_attention
from dllm_jax.config import ModelConfig
from dllm_jax.models import Params, apply, default_positions, query_logits, run_layers
from dllm_jax.models.layers import embed, rope_tables


def sample_noise(key: jax.Array, answer_positions: jax.Array, eps: float, block_size: int = 0,
                 max_position: int = 0) -> tuple[jax.Array, jax.Array]:
    """Per-token mask ratio and mask of the answer.

    Args:
      key: PRNG key.
      answer_positions: int `[B, A]` RoPE positions of the answer tokens (block ids derive
        from them in block diffusion).
      eps: t ~ U(eps, 1).
      block_size: 0 -> one t per sequence (LLaDA); > 0 -> one t per block of positions (SDAR).
      max_position: the model's longest sequence (bounds the number of blocks).
    Returns:
      `(t [B, A] float32, masked [B, A] bool)`: each answer token is masked with probability
      its t.
    """
    kt, km = jax.random.split(key)
    b, a = answer_positions.shape
    if block_size > 0:
        nb = max(max_position, 1) // block_size + 1
        t_blocks = jax.random.uniform(kt, (b, nb), jnp.float32, eps, 1.0)
        t = jnp.take_along_axis(t_blocks, answer_positions // block_size, axis=1)
    else:
        t = jnp.broadcast_to(jax.random.uniform(kt, (b, 1), jnp.float32, eps, 1.0), (b, a))
    masked = jax.random.uniform(km, (b, a), jnp.float32) < t
    return t, masked


def masked_diffusion_loss(logits: jax.Array, answer: jax.Array, masked: jax.Array,
                          t: jax.Array) -> jax.Array:
    """`sum(CE on masked answer tokens / t) / (B * A)` for logits `[B, A, V]` of the answer."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, answer[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(masked, ce / t, 0.0)) / answer.size


def block_diffusion_logits(params: Params, cfg: ModelConfig, noisy: jax.Array,
                           clean: jax.Array, valid: jax.Array, query_idx: jax.Array,
                           attn_impl: str = "xla") -> jax.Array:
    """Logits at `query_idx` of the noisy copy from one forward over `[noisy | clean]` with the
    block-diffusion mask of the module docstring. Shapes: tokens `[B, T]`, query `[B, Q]`."""
    t = noisy.shape[1]
    pos = default_positions(valid)
    tokens2 = jnp.concatenate([noisy, clean], axis=1)
    pos2 = jnp.concatenate([pos, pos], axis=1)
    valid2 = jnp.concatenate([valid, valid], axis=1)
    blk = pos2 // cfg.block_size
    is_noisy = jnp.arange(2 * t) < t
    qb, kb = blk[:, :, None], blk[:, None, :]
    qn, kn = is_noisy[None, :, None], is_noisy[None, None, :]
    allowed = jnp.where(qn, jnp.where(kn, kb == qb, kb < qb), (~kn) & (kb <= qb))
    mask = allowed & valid2[:, None, :]
    cos, sin = rope_tables(pos2, cfg.head_dim, cfg.rope_theta)

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, ck: Any, cv: Any) -> jax.Array:
        return dot_product_attention(q, k, v, mask, attn_impl)

    x, _ = run_layers(cfg, params, embed(params, tokens2), cos, sin, attend)
    return query_logits(cfg, params, x, query_idx)


def loss_fn(params: Params, model_cfg: ModelConfig, prompt: jax.Array, answer: jax.Array,
            key: jax.Array, *, eps: float, block_diffusion: bool = False,
            compute_dtype: Any = jnp.float32, attn_impl: str = "xla"
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss of one batch and what it was computed from.

    Args:
      params: float32 params (cast to `compute_dtype` for the forward).
      prompt: int `[B, P]` left-padded with `pad_token_id`; answer: int `[B, A]`.
      key: noise key.
    Returns:
      `(loss, aux)` with aux: `tokens [B, P+A]` (the model input: prompt unchanged, masked answer
      tokens replaced by `<mask>`), `t [B, A]`, `masked [B, A]`, `logits [B, A, V]`.
    """
    b, p = prompt.shape
    a = answer.shape[1]
    valid = jnp.concatenate([prompt != model_cfg.pad_token_id, jnp.ones((b, a), bool)], axis=1)
    positions = default_positions(valid)
    bs = model_cfg.block_size if block_diffusion else 0
    t, masked = sample_noise(key, positions[:, p:], eps, bs, model_cfg.max_position)
    noisy_answer = jnp.where(masked, model_cfg.mask_token_id, answer)
    tokens = jnp.concatenate([prompt, noisy_answer], axis=1)
    query = jnp.broadcast_to(jnp.arange(p, p + a, dtype=jnp.int32), (b, a))
    pc = jax.tree.map(lambda x: x.astype(compute_dtype), params)
    if block_diffusion:
        clean = jnp.concatenate([prompt, answer], axis=1)
        logits = block_diffusion_logits(pc, model_cfg, tokens, clean, valid, query, attn_impl)
    else:
        logits = apply(pc, model_cfg, tokens, positions=positions, key_valid=valid,
                       query_idx=query, attn_impl=attn_impl)
    loss = masked_diffusion_loss(logits, answer, masked, t)
    return loss, {"tokens": tokens, "t": t, "masked": masked, "logits": logits}



__all__ = ["block_diffusion_logits", "loss_fn", "masked_diffusion_loss", "sample_noise"]
