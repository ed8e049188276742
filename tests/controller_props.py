"""Shared checks for the controllers of issue 6 (CE, TSPD, R2): a tiny random model, prompts,
and the decode properties every controller must keep (ends within max steps, never rewrites
a committed token, at least one commit per unfinished row per step, batch == rows alone,
one compile per shapes)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.decode import _generate_jit, generate
from dllm_jax.models import init_params

CFG = ModelConfig.tiny("llada", vocab_size=64, mask_token_id=63)
PARAMS = {"peaked": init_params(CFG, jax.random.key(0), std=0.6),
          "flat": init_params(CFG, jax.random.key(1), std=0.002)}
GEN = GenerateConfig(gen_length=16, block_length=8, steps=8, trace=True)


def prompts() -> tuple[np.ndarray, np.ndarray]:
    prompt = np.array([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13], [0, 0, 0, 0, 14]], np.int32)
    return prompt, np.arange(5)[None, :] >= np.array([[0], [2], [4]])


def check_decode_properties(ctrl: Any, kind: str = "peaked", gen: GenerateConfig = GEN,
                            min_one: bool = True) -> Any:
    """Decode the three prompts and assert the properties; returns the output.

    min_one: also require >= 1 commit per unfinished row per step (Dream's time-grid orders
    may commit nothing in a step, as the original does; their grid ends the block).
    """
    prompt, valid = prompts()
    out = generate(PARAMS[kind], CFG, prompt, gen, ctrl, prompt_valid=valid)
    tokens, st = np.asarray(out.tokens), out.stats
    steps = int(st.steps)
    assert steps <= gen.max_steps
    assert not (tokens == CFG.mask_token_id).any(), "decode ended with MASKs left"
    fix = np.asarray(st.fix_step)
    assert (fix >= 0).all() and (fix < steps).all()
    tr = {k: np.asarray(v) for k, v in st.trace.items()}
    blocks = tr["block"][:steps]
    for b in range(tokens.shape[0]):
        for j in range(gen.gen_length):
            s = fix[b, j]
            blk, off = divmod(j, gen.block_length)
            assert blocks[s] == blk
            assert tr["commit"][s, b, off] and tr["candidate"][s, b, off] == tokens[b, j]
            later = blocks[s + 1:steps] == blk
            assert not tr["masked"][s + 1:steps][later, b, off].any()
            assert not tr["commit"][s + 1:steps][later, b, off].any()
    # >= 1 commit in every step of every row that still had a MASK in the active block.
    active = tr["masked"][:steps].any(-1)                                   # [S, B]
    if min_one:
        assert (tr["commit"][:steps].any(-1) | ~active).all()
    np.testing.assert_array_equal(np.asarray(st.nfe), active.sum(0))
    return out


def check_batch_equals_rows(ctrl: Any, gen: GenerateConfig = GEN) -> None:
    prompt, valid = prompts()
    batch = generate(PARAMS["peaked"], CFG, prompt, gen, ctrl, prompt_valid=valid)
    for b in range(prompt.shape[0]):
        alone = generate(PARAMS["peaked"], CFG, prompt[b, valid[b]][None], gen, ctrl)
        np.testing.assert_array_equal(np.asarray(batch.tokens[b]), np.asarray(alone.tokens[0]))
        assert int(batch.stats.nfe[b]) == int(alone.stats.nfe[0])


def check_compiles_once(ctrl: Any, other: Any = None) -> None:
    """After a first decode, decodes of new prompts of the same shapes (the last with `other`,
    a controller with the same static settings but other leaf values, if given) add no
    compiled program."""
    gen = GenerateConfig(gen_length=16, block_length=8, steps=16)
    rng = np.random.default_rng(0)
    generate(PARAMS["peaked"], CFG, rng.integers(2, 60, size=(2, 6)), gen, ctrl)
    before = _generate_jit._cache_size()
    for c in (ctrl, ctrl if other is None else other):
        generate(PARAMS["peaked"], CFG, rng.integers(2, 60, size=(2, 6)), gen, c)
    assert _generate_jit._cache_size() == before
