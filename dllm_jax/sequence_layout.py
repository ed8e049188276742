"""Where prompt and answer sit in the sequence the decode loop carries.

The loop denoises a CANVAS: `length` positions starting at sequence index `start`, split into
`length / block_length` blocks that the loop visits in order. How the canvas relates to the
answer depends on the attention:

Bidirectional models (LLaDA, Dream): the sequence is `[prompt (left-padded, width P) | MASK *
G]`; the canvas is the answer (`start = P`, `length = G`, offset 0), as in LLaDA's generate.

Block-causal models (SDAR) align blocks to ABSOLUTE positions, as SDAR's own
`block_diffusion_generate` does for one prompt of length p and block length Lb: its canvas is
ceil((p + G) / Lb) * Lb positions, the prefill is [0, p // Lb * Lb), decoding starts with the
block that holds the prompt's tail (its Lb - p % Lb masks) and the last block is full too, so
the answer is x[p : p + G]. A batch of prompts of different lengths gets the same per row, in
lockstep: row r (p_r real tokens) is shifted right by a multiple of Lb,
off_r = (P // Lb - p_r // Lb) * Lb, so that every row's first decoded block starts at the same
sequence index `start = P // Lb * Lb` and model blocks (position // Lb) coincide with loop
blocks in every row. The canvas is G + Lb positions (the most any row needs):

    canvas index c:   0 .. t_r-1       t_r .. t_r+G-1   t_r+G .. end of that block   the rest
    row r holds:      prompt tail      answer (MASK)    MASKs decoded, not returned  padding

with t_r = p_r % Lb (`answer_offset`). A row with t_r = 0 needs G / Lb blocks: its last
canvas block is padding (not a key, never decoded: the row is inactive there). Positions are
0 at each row's first real token.

Shapes: B = batch, P = padded prompt width, T = `start + length`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from dllm_jax.config import GenerateConfig, ModelConfig


@struct.dataclass
class SequenceLayout:
    """The decode's sequence and its canvas.

    tokens: int32 `[B, T]` initial tokens (prompt, MASK where the loop decodes, padding).
    valid: bool `[B, T]` key mask (False on padding).
    positions: int32 `[B, T]` RoPE positions (0 at each row's first real token).
    prompt_region: bool `[B, T]` the prompt's tokens (classifier-free guidance masks them).
    answer_offset: int32 `[B]` canvas index of each row's first answer token.
    start: static int, sequence index of the canvas.
    length: static int, canvas positions (a multiple of the block length).
    """

    tokens: jax.Array
    valid: jax.Array
    positions: jax.Array
    prompt_region: jax.Array
    answer_offset: jax.Array
    start: int = struct.field(pytree_node=False, default=0)
    length: int = struct.field(pytree_node=False, default=0)


def canvas_length(cfg: ModelConfig, gen: GenerateConfig) -> int:
    """Static canvas length: G, or G + Lb for block-causal models (module doc)."""
    return gen.gen_length + (gen.block_length if cfg.block_causal else 0)


def canvas_start(cfg: ModelConfig, gen: GenerateConfig, prompt_width: int) -> int:
    """Static sequence index of the canvas for a padded prompt width P."""
    if cfg.block_causal:
        return prompt_width // gen.block_length * gen.block_length
    return prompt_width


def max_position_needed(cfg: ModelConfig, gen: GenerateConfig, prompt_width: int) -> int:
    """Positions the decode uses for prompts of up to `prompt_width` tokens (SDAR's canvas
    rounds prompt + answer up to whole blocks)."""
    total = prompt_width + gen.gen_length
    if cfg.block_causal:
        return -(-total // gen.block_length) * gen.block_length
    return total


def make_layout(cfg: ModelConfig, gen: GenerateConfig, prompt: jax.Array,
                prompt_valid: jax.Array) -> SequenceLayout:
    """The loop's sequence for prompts `[B, P]` (`prompt_valid [B, P]`, False on padding)."""
    b, p = prompt.shape
    mask_id, g = cfg.mask_token_id, gen.gen_length
    if not cfg.block_causal:
        tokens = jnp.concatenate([prompt, jnp.full((b, g), mask_id, jnp.int32)], axis=1)
        valid = jnp.concatenate([prompt_valid, jnp.ones((b, g), bool)], axis=1)
        region = jnp.concatenate([prompt_valid, jnp.zeros((b, g), bool)], axis=1)
        positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
        return SequenceLayout(tokens, valid, positions, region, jnp.zeros((b,), jnp.int32),
                              start=p, length=g)
    lb = gen.block_length
    start, length = canvas_start(cfg, gen, p), canvas_length(cfg, gen)
    n_real = jnp.sum(prompt_valid, axis=1, dtype=jnp.int32)              # p_r  [B]
    # the q-th real token of each row (any padding pattern): valid indices in order
    order = jnp.argsort(~prompt_valid, axis=1, stable=True).astype(jnp.int32)
    offset = start - n_real // lb * lb                                     # off_r [B]
    pos = jnp.arange(start + length, dtype=jnp.int32)[None, :] - offset[:, None]   # [B, T]
    is_prompt = (pos >= 0) & (pos < n_real[:, None])
    src = jnp.take_along_axis(order, jnp.clip(pos, 0, p - 1), axis=1)
    prompt_tok = jnp.take_along_axis(prompt.astype(jnp.int32), src, axis=1)
    canvas_end = -(-(n_real + g) // lb) * lb                               # [B] positions
    decoded = (pos >= n_real[:, None]) & (pos < canvas_end[:, None])
    tokens = jnp.where(is_prompt, prompt_tok, jnp.where(decoded, mask_id, cfg.pad_token_id))
    return SequenceLayout(tokens=tokens.astype(jnp.int32), valid=is_prompt | decoded,
                          positions=jnp.maximum(pos, 0), prompt_region=is_prompt,
                          answer_offset=n_real % lb, start=start, length=length)


def answer_of(canvas: jax.Array, layout: SequenceLayout, gen_length: int) -> jax.Array:
    """Each row's answer `[B, G]` from a per-canvas-position array `[B, C]`."""
    idx = layout.answer_offset[:, None] + jnp.arange(gen_length, dtype=jnp.int32)[None, :]
    return jnp.take_along_axis(canvas, idx, axis=1)


def canvas_config(cfg: ModelConfig, gen: GenerateConfig) -> GenerateConfig:
    """The GenerateConfig the loop runs: `gen_length` = the canvas length, the same steps per
    block (block-causal: one more block, SDAR giving every block, the partial first one
    included, the same number of steps)."""
    length = canvas_length(cfg, gen)
    if length == gen.gen_length:
        return gen
    blocks = length // gen.block_length
    return dataclasses.replace(gen, gen_length=length, steps=gen.steps_per_block * blocks)


__all__ = ["SequenceLayout", "answer_of", "canvas_config", "canvas_length", "canvas_start",
           "make_layout", "max_position_needed"]
