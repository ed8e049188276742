"""SDAR (block-causal) decoding: blocks aligned to absolute positions as in SDAR's own
`block_diffusion_generate`, checked token for token (and forward for forward) against the
independent reference `tests/reference_sdar.py` for every prompt length 1 .. 2 x block in
one left-padded batch, uncached and with the exact incremental cache; and the exact cache
against a brute-force recomputation. float32, greedy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controllers import applicable_options, make_controller
from dllm_jax import block_causal_cache as BCC
from dllm_jax import sequence_layout as L
from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.decode import GenerateError, generate
from dllm_jax.models import apply, apply_refresh, init_params
from tests.reference_sdar import sdar_generate

LB = 4
CFG = ModelConfig.tiny("sdar", vocab_size=64, mask_token_id=63, block_size=LB)
PARAMS = init_params(CFG, jax.random.key(7), std=0.5)   # peaked logits: no ties
LENGTHS = list(range(1, 2 * LB + 1))                     # every prompt length 1 .. 2B
RNG = np.random.default_rng(0)
ROWS = [RNG.integers(1, 60, size=n).astype(np.int32) for n in LENGTHS]


def _left_padded(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    prompt = np.zeros((len(rows), width), np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        prompt[i, width - len(r):], valid[i, width - len(r):] = r, True
    return prompt, valid


@functools.lru_cache(maxsize=None)
def _forward(block: int):
    cfg = CFG.replace(block_size=block)            # the mask's blocks are the decode's
    return jax.jit(functools.partial(apply, PARAMS, cfg))


def _model_fn(block: int):
    fwd = _forward(block)

    def fn(tokens: np.ndarray) -> np.ndarray:
        logits = np.asarray(fwd(np.asarray(tokens, np.int32)), np.float64)
        logits[..., CFG.mask_token_id] = -1e9      # MASK never a candidate, as in generate
        return logits
    return fn


@pytest.mark.parametrize("controller,remasking", [
    ("low_confidence", "low_confidence_static"), ("low_confidence_dynamic",
                                                  "low_confidence_dynamic")])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_every_prompt_length_matches_reference(controller: str, remasking: str,
                                               cache: str) -> None:
    g, steps_per_block = 8, 2                          # 2 commits per step of a full block
    gen = GenerateConfig(gen_length=g, block_length=LB, steps=steps_per_block * g // LB,
                         cache=cache)
    ctrl = make_controller(controller, **applicable_options(controller, threshold=0.3))
    prompt, valid = _left_padded(ROWS)
    out = generate(PARAMS, CFG, prompt, gen, ctrl, prompt_valid=valid)
    got, nfe = np.asarray(out.tokens), np.asarray(out.stats.nfe)
    for i, row in enumerate(ROWS):
        want, want_nfe = sdar_generate(_model_fn(LB), row, CFG.mask_token_id, g, LB,
                                       steps_per_block, remasking, threshold=0.3)
        np.testing.assert_array_equal(got[i], want, err_msg=f"prompt length {len(row)}")
        assert nfe[i] == want_nfe, (len(row), nfe[i], want_nfe)
    fix = np.asarray(out.stats.fix_step)
    assert (fix >= 0).all()                            # every answer position was decoded


@pytest.mark.parametrize("width", [5, 8])
def test_unpadded_prompt_and_prefix_cache(width: int) -> None:
    """One unpadded row (P % B != 0 and == 0): uncached, prefix and dual agree with the
    reference (decode block 8 on the block-4 model: the mask follows the decode)."""
    row = ROWS[width - 1]
    gen = dict(gen_length=16, block_length=8, steps=8)
    want, _ = sdar_generate(_model_fn(8), row, CFG.mask_token_id, 16, 8, 4)
    for cache in ("none", "prefix", "dual"):
        out = generate(PARAMS, CFG, row, GenerateConfig(**gen, cache=cache),
                       make_controller("low_confidence"))
        np.testing.assert_array_equal(np.asarray(out.tokens)[0], want, err_msg=cache)


def test_exact_cache_equals_brute_force() -> None:
    """The cache after the second block's first step holds exactly the keys/values a full
    forward computes for the prompt's blocks and the first decoded block, and the step's
    logits are the full forward's."""
    gen = GenerateConfig(gen_length=8, block_length=LB, steps=4, cache="dual")
    prompt, valid = _left_padded([ROWS[5], ROWS[2]])           # lengths 6 and 3
    lay = L.make_layout(CFG, gen, jnp.asarray(prompt), jnp.asarray(valid))
    tokens = np.asarray(lay.tokens).copy()
    block0 = slice(lay.start, lay.start + LB)
    fill = RNG.integers(1, 60, size=tokens[:, block0].shape)
    tokens[:, block0] = np.where(tokens[:, block0] == CFG.mask_token_id, fill,
                                 tokens[:, block0])               # block 0 decoded
    tokens = jnp.asarray(tokens)
    cache = BCC.prefill(PARAMS, CFG, gen, tokens, lay.positions, lay.valid, lay.start, None)
    start = jnp.int32(lay.start + LB)
    logits, cache = BCC.block_logits(PARAMS, CFG, gen, tokens, lay.positions, lay.valid,
                                     cache, start, jnp.int32(1), jnp.int32(0), None)
    qidx = jnp.broadcast_to(start + jnp.arange(LB), (2, LB))
    full, kv = apply_refresh(PARAMS, CFG, tokens, lay.positions, lay.valid, qidx)
    np.testing.assert_allclose(logits, full, atol=1e-4)
    upto = lay.start + LB
    keep = np.asarray(lay.valid)[None, :, :upto, None, None]
    for got, ref in ((cache.k, kv.k), (cache.v, kv.v)):
        np.testing.assert_allclose(np.where(keep, got[:, :, :upto], 0),
                                   np.where(keep, ref[:, :, :upto], 0), atol=1e-5)


def test_refresh_every_refused_and_canvas_length_checked() -> None:
    ctrl = make_controller("low_confidence")
    with pytest.raises(GenerateError, match="refresh-every"):
        generate(PARAMS, CFG, ROWS[4], GenerateConfig(gen_length=8, block_length=LB, steps=8,
                                                      cache="dual", refresh_every=2), ctrl)
    short = CFG.replace(max_position=14)        # 5 + 8 = 13 fits, its 4 whole blocks (16) not
    with pytest.raises(GenerateError, match="rounded up to 16"):
        generate(PARAMS, short, ROWS[4], GenerateConfig(gen_length=8, block_length=LB, steps=8),
                 ctrl)
