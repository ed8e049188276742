"""Cheaper refreshes of the approximate (Fast-dLLM) cache (issue 14, item 3).

`refresh_scope="answer"`: a block-start refresh after the decode's first recomputes only the
answer, attending to the prompt's keys/values kept from the first forward. Checked against an
independent frozen-prompt forward written here from the layer pieces (its own attention).
`refresh_blocks=k`: only every k-th block start refreshes (the schedule is checked directly).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controllers import make_controller
from dllm_jax import decode_step as DS
from dllm_jax.cache import needs_refresh
from dllm_jax.config import ConfigError, GenerateConfig, ModelConfig
from dllm_jax.decode import GenerateError, generate
from dllm_jax.models import apply_refresh, default_positions, init_params
from dllm_jax.models.layers import attention_out_and_mlp, lm_logits, project_qkv, rope_tables

CFGS = {
    "llada": ModelConfig.tiny("llada", vocab_size=64, mask_token_id=63),
    "dream": ModelConfig.tiny("dream", vocab_size=64, mask_token_id=63),
}
PARAMS = {k: init_params(c, jax.random.key(3), std=0.5) for k, c in CFGS.items()}
PROMPT = np.array([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]], np.int32)
G, LB = 16, 4


def _reference(cfg: ModelConfig, params, tokens1, tokens2, valid, pos, frozen: int):
    """Layer by layer over `tokens2`, the keys/values of sequence indices < `frozen` taken
    from a forward over `tokens1`: hidden states `[B, T, D]` and per-layer (k, v)."""
    cos, sin = rope_tables(pos, cfg.head_dim, cfg.rope_theta)
    layers = params["layers"]
    n = cfg.num_layers
    keep = (jnp.arange(tokens1.shape[1]) < frozen)[None, :, None, None]

    def attention(q, k, v):
        rep = cfg.num_heads // cfg.num_kv_heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
        s = jnp.where(valid[:, None, None, :], s, -1e30)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

    def run(tokens, frozen_kv):
        x = params["embed"][tokens]
        kvs = []
        for i in range(n):
            lp = jax.tree.map(lambda a, i=i: a[i], layers)
            q, k, v = project_qkv(cfg, lp, x, cos, sin)
            if frozen_kv is not None:
                k = jnp.where(keep, frozen_kv[i][0], k)
                v = jnp.where(keep, frozen_kv[i][1], v)
            kvs.append((k, v))
            x = attention_out_and_mlp(cfg, lp, x, attention(q, k, v))
        return x, kvs

    _, first = run(tokens1, None)
    return run(tokens2, first)


@pytest.mark.parametrize("arch", list(CFGS))
def test_answer_refresh_equals_a_frozen_prompt_forward(arch: str) -> None:
    cfg, params = CFGS[arch], PARAMS[arch]
    rng = np.random.default_rng(1)
    p = PROMPT.shape[1]
    ans1 = np.full((2, G), cfg.mask_token_id, np.int32)
    ans1[:, :3] = rng.integers(1, 60, size=(2, 3))
    ans2 = ans1.copy()
    ans2[:, :LB] = rng.integers(1, 60, size=(2, LB))     # the first block decoded since
    tokens1 = jnp.asarray(np.concatenate([PROMPT, ans1], 1))
    tokens2 = jnp.asarray(np.concatenate([PROMPT, ans2], 1))
    valid = jnp.asarray(np.concatenate([PROMPT > 0, np.ones((2, G), bool)], 1))
    pos = default_positions(valid)
    start = p + LB                                       # the second block starts
    qidx = jnp.broadcast_to(start + jnp.arange(LB), (2, LB))
    _, cache = apply_refresh(params, cfg, tokens1, pos, valid, qidx)   # the first refresh
    gen = GenerateConfig(gen_length=G, block_length=LB, steps=G, cache="dual",
                         refresh_scope="answer")
    got_logits, got = jax.jit(lambda c: DS.answer_refresh(
        params, cfg, gen, DS.Sequence(tokens2, pos, valid), c, jnp.int32(p),
        jnp.int32(start), None))(cache)

    shift = 1 if cfg.logits_shift else 0
    x, kvs = _reference(cfg, params, tokens1, tokens2, valid, pos, p - shift)
    want_logits = lm_logits(cfg, params, x[:, start - shift:start - shift + LB])
    # float32, different summation order: 1e-4 absolute on logits of order 10
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=1e-4)
    for i, (k, v) in enumerate(kvs):
        np.testing.assert_allclose(np.asarray(got.k[i]), np.asarray(k), atol=1e-4)
        np.testing.assert_allclose(np.asarray(got.v[i]), np.asarray(v), atol=1e-4)
    # the prompt's entries are exactly the first forward's
    np.testing.assert_array_equal(np.asarray(got.k[:, :, :p - shift]),
                                  np.asarray(cache.k[:, :, :p - shift]))
    # and they are stale: a full refresh would have changed them (the test can fail)
    _, full = apply_refresh(params, cfg, tokens2, pos, valid, qidx)
    assert float(jnp.max(jnp.abs(full.k[1:, :, :p - shift] - got.k[1:, :, :p - shift]))) > 1e-3


def test_refresh_blocks_schedule() -> None:
    """k = 2: block starts of blocks 0, 2, 4 refresh, 1 and 3 do not; the decode's first step
    always does (its cache is empty); steps inside a block never do."""
    got = {(blk, bs, first): bool(needs_refresh(jnp.int32(bs), 0, jnp.int32(blk), 2, first))
           for blk in range(5) for bs in range(3) for first in (False, True)}
    for (blk, bs, first), r in got.items():
        assert r == (bs == 0 and (blk % 2 == 0 or first)), (blk, bs, first)
    assert bool(needs_refresh(jnp.int32(0), 0, jnp.int32(3), 1)) is True


@pytest.mark.parametrize("option", [{"refresh_scope": "answer"}, {"refresh_blocks": 2}])
def test_generate_with_cheaper_refresh(option: dict) -> None:
    """Decodes to the end; the first block (before any cheaper refresh can differ) equals the
    full-refresh decode's, and a one-block decode equals it entirely."""
    cfg, params = CFGS["llada"], PARAMS["llada"]
    ctrl = make_controller("threshold", threshold=0.5)
    full = generate(params, cfg, PROMPT, GenerateConfig(G, LB, G, cache="dual"), ctrl,
                    prompt_valid=PROMPT > 0)
    cheap = generate(params, cfg, PROMPT, GenerateConfig(G, LB, G, cache="dual", **option),
                     ctrl, prompt_valid=PROMPT > 0)
    assert not np.any(np.asarray(cheap.tokens) == cfg.mask_token_id)
    np.testing.assert_array_equal(np.asarray(cheap.tokens)[:, :LB],   # tokens: the answer
                                  np.asarray(full.tokens)[:, :LB])
    one = GenerateConfig(LB, LB, LB, cache="dual")
    np.testing.assert_array_equal(
        np.asarray(generate(params, cfg, PROMPT, dataclasses.replace(one, **option), ctrl,
                            prompt_valid=PROMPT > 0).tokens),
        np.asarray(generate(params, cfg, PROMPT, one, ctrl, prompt_valid=PROMPT > 0).tokens))


def test_cheaper_refresh_errors() -> None:
    with pytest.raises(ConfigError, match="cache"):
        GenerateConfig(G, LB, G, refresh_scope="answer")
    with pytest.raises(ConfigError, match="refresh_blocks must be >= 1"):
        GenerateConfig(G, LB, G, cache="dual", refresh_blocks=0)
    with pytest.raises(ConfigError, match="use one of them"):
        GenerateConfig(G, LB, G, cache="dual", refresh_blocks=2, refresh_every=2)
    sdar = ModelConfig.tiny("sdar", vocab_size=64, mask_token_id=63, block_size=4)
    with pytest.raises(GenerateError, match="exact"):
        generate(init_params(sdar, jax.random.key(0)), sdar, PROMPT[1:],
                 GenerateConfig(G, LB, G, cache="dual", refresh_blocks=2),
                 make_controller("low_confidence"))


def test_cli_flags(tmp_path, capsys) -> None:
    from dllm_jax.cli import main

    rc = main(["generate", "sort: 3 1 2", "--refresh-blocks", "0", "--cache", "dual"])
    assert rc != 0
    assert "--refresh-blocks" in capsys.readouterr().err
    rc = main(["generate", "sort: 3 1 2", "--refresh-scope", "answer"])
    err = capsys.readouterr().err
    assert rc != 0 and "--cache" in err and "Traceback" not in err
