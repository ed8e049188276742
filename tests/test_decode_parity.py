"""Greedy float32 decodes equal, token for token, independent re-implementations of the
original algorithms (tests/reference_decoders.py) on the same tiny models."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from controllers import make_controller
from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.decode import generate
from dllm_jax.models import apply, init_params
from tests import reference_decoders as ref

LLADA = ModelConfig.tiny("llada", vocab_size=96, mask_token_id=95, eos_token_id=2,
                         eot_token_id=3)
DREAM = ModelConfig.tiny("dream", vocab_size=96, mask_token_id=95)
# A larger init gives varied, peaked logits, so that no two confidences tie.
P_LLADA = init_params(LLADA, jax.random.key(3), std=0.5)
P_DREAM = init_params(DREAM, jax.random.key(4), std=0.5)
PROMPT = np.array([[7, 12, 30, 4, 9, 51], [8, 8, 40, 2, 61, 17]], np.int32)


def _model_fn(cfg: ModelConfig, params):
    """Full-sequence logits for the references (MASK never a candidate, as in `generate`)."""
    fwd = jax.jit(functools.partial(apply, params, cfg))

    def fn(tokens: np.ndarray) -> np.ndarray:
        logits = np.asarray(fwd(np.asarray(tokens, np.int32)), np.float64)
        logits[..., cfg.mask_token_id] = -1e9  # finite, so that cfg arithmetic stays finite
        return logits

    return fn


def _ours(cfg, params, prompt, gen, ctrl):
    out = generate(params, cfg, prompt, gen, ctrl)
    return np.asarray(out.tokens), out


@pytest.mark.parametrize("gen_length,block_length,steps,cfg_scale", [
    (16, 8, 8, 0.0),      # 2 per step
    (16, 16, 5, 0.0),     # uneven schedule: 4, 3, 3, 3, 3
    (12, 4, 12, 0.0),     # 3 blocks, 1 per step
    (8, 8, 16, 0.0),      # more steps than tokens: LLaDA's zero-commit steps
    (16, 8, 8, 1.5),      # classifier-free guidance
])
def test_llada_low_confidence(gen_length, block_length, steps, cfg_scale):
    want, _ = ref.llada_generate(_model_fn(LLADA, P_LLADA), PROMPT, steps=steps,
                                 gen_length=gen_length, block_length=block_length,
                                 cfg_scale=cfg_scale, mask_id=LLADA.mask_token_id)
    gen = GenerateConfig(gen_length=gen_length, block_length=block_length, steps=steps,
                         cfg_scale=cfg_scale)
    got, out = _ours(LLADA, P_LLADA, PROMPT, gen, make_controller("low_confidence"))
    np.testing.assert_array_equal(got, want)
    assert int(out.stats.steps) <= steps


@pytest.mark.parametrize("logits_eos_inf,conf_eos", [(True, False), (False, True)])
def test_llada_eos_options(logits_eos_inf, conf_eos):
    # Favour EOS / EoT so that the options matter.
    params = dict(P_LLADA, lm_head=P_LLADA["lm_head"].at[:, 2:4].add(0.8))
    want, _ = ref.llada_generate(_model_fn(LLADA, params), PROMPT, steps=8, gen_length=16,
                                 block_length=8, mask_id=LLADA.mask_token_id,
                                 logits_eos_inf=logits_eos_inf,
                                 confidence_eos_eot_inf=conf_eos, eos_id=2, eot_id=3)
    gen = GenerateConfig(gen_length=16, block_length=8, steps=8, logits_eos_inf=logits_eos_inf,
                         confidence_eos_eot_inf=conf_eos)
    got, _ = _ours(LLADA, params, PROMPT, gen, make_controller("low_confidence"))
    np.testing.assert_array_equal(got, want)
    assert np.isin(want, [2, 3]).any(), "the test should exercise EOS/EoT"


@pytest.mark.parametrize("kind,value", [("threshold", 0.9), ("threshold", 0.3),
                                        ("factor", 1.0), ("factor", 3.0)])
def test_fastdllm(kind, value):
    kw = {kind: value}
    want, nfe = ref.fastdllm_generate(_model_fn(LLADA, P_LLADA), PROMPT, steps=16,
                                      gen_length=16, block_length=8,
                                      mask_id=LLADA.mask_token_id, **kw)
    gen = GenerateConfig(gen_length=16, block_length=8, steps=16)
    got, out = _ours(LLADA, P_LLADA, PROMPT, gen, make_controller(kind, **kw))
    np.testing.assert_array_equal(got, want)
    assert int(out.stats.steps) == nfe  # same number of batched forwards


@pytest.mark.parametrize("bound", [0.05, 1.0, 3.0])
def test_entropy_bound(bound):
    want, nfe = ref.fastdllm_generate(_model_fn(LLADA, P_LLADA), PROMPT, steps=16,
                                      gen_length=16, block_length=8,
                                      mask_id=LLADA.mask_token_id, entropy_bound=bound)
    gen = GenerateConfig(gen_length=16, block_length=8, steps=16)
    got, out = _ours(LLADA, P_LLADA, PROMPT, gen, make_controller("entropy_bound",
                                                                  entropy_bound=bound))
    np.testing.assert_array_equal(got, want)
    assert int(out.stats.steps) == nfe
    if bound >= 3.0:
        assert nfe < 16, "a loose bound should commit several tokens per step"


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("steps", [16, 6])
def test_dream_orders(alg, steps):
    prompt = PROMPT[:1]
    want, nfe = ref.dream_generate(_model_fn(DREAM, P_DREAM), prompt, gen_length=16,
                                   steps=steps, alg=alg, mask_id=DREAM.mask_token_id)
    gen = GenerateConfig(gen_length=16, block_length=16, steps=steps)
    got, out = _ours(DREAM, P_DREAM, prompt, gen, make_controller(alg))
    np.testing.assert_array_equal(got, want)
    assert int(out.stats.steps) <= nfe
