"""Our cached decode (`GenerateConfig(cache='prefix' | 'dual')`) gives, token for token, the
tokens of Fast-dLLM's cached decodes (`generate_with_prefix_cache` / `generate_with_dual_cache`)
on the same weights, float32, greedy, with the same number of batched forwards.

Reference: `tests/reference_cached.py` (an independent torch re-implementation of Fast-dLLM's
two cached loops and of its model's cache handling, on top of `tests/torch_llada.py`). The
torch weights are mapped to our params layout by HF name here (`_params_from_torch`).
The MASK logit is -inf in the reference, since our decode never proposes MASK.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from controllers import make_controller
from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.decode import generate
from dllm_jax.models import apply, default_positions

try:  # tests/ as a package or as pytest's rootdir-inserted path
    from tests import reference_decoders as ref
    from tests.reference_cached import CachedTorchLLaDA, fastdllm_generate_cached
    from tests.torch_llada import TorchLLaDAConfig
except ImportError:  # pragma: no cover
    import reference_decoders as ref
    from reference_cached import CachedTorchLLaDA, fastdllm_generate_cached
    from torch_llada import TorchLLaDAConfig

TC = TorchLLaDAConfig(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=96,
                      vocab_size=96, rope_theta=10000.0, max_sequence_length=128,
                      mask_token_id=95, eos_token_id=2, pad_token_id=0)
MASK = TC.mask_token_id
torch.set_num_threads(1)  # 2 shared cores: torch's thread pool would fight XLA's
PROMPT = np.array([[7, 12, 30, 4, 9, 51], [8, 8, 40, 3, 61, 17]], np.int64)


def _params_from_torch(model: torch.nn.Module, cfg: ModelConfig) -> dict:
    """HF LLaDA state_dict -> our params (Linear weights transposed, layers stacked)."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    blk = "model.transformer.blocks.{}.{}.weight"

    def stack(name: str, transpose: bool) -> jnp.ndarray:
        ws = [sd.pop(blk.format(i, name)) for i in range(cfg.num_layers)]
        return jnp.asarray(np.stack([w.T if transpose else w for w in ws]))

    layers = {ours: stack(theirs, t) for ours, theirs, t in [
        ("attn_norm", "attn_norm", False), ("q_proj", "q_proj", True), ("k_proj", "k_proj", True),
        ("v_proj", "v_proj", True), ("o_proj", "attn_out", True), ("mlp_norm", "ff_norm", False),
        ("gate_proj", "ff_proj", True), ("up_proj", "up_proj", True),
        ("down_proj", "ff_out", True)]}
    params = {"embed": jnp.asarray(sd.pop("model.transformer.wte.weight")), "layers": layers,
              "final_norm": jnp.asarray(sd.pop("model.transformer.ln_f.weight")),
              "lm_head": jnp.asarray(sd.pop("model.transformer.ff_out.weight").T)}
    assert not sd, f"unmapped tensors: {sorted(sd)}"
    return params


@functools.lru_cache(maxsize=None)
def _models() -> tuple[CachedTorchLLaDA, ModelConfig, dict]:
    torch.manual_seed(0)
    # std 0.5: peaked, varied logits, so no two confidences tie and float noise cannot flip
    # an argmax or a threshold decision.
    tm = CachedTorchLLaDA(TC).randomize(seed=11, std=0.5).eval()
    cfg = ModelConfig.from_hf_config(TC.to_hf_dict())
    assert (cfg.num_kv_heads, cfg.mask_token_id, cfg.tie_embeddings) == (2, MASK, False)
    return tm, cfg, _params_from_torch(tm, cfg)


def _controller(kind: str, value: float | None):
    return make_controller(kind) if value is None else make_controller(kind, **{kind: value})


def _ref_kwargs(kind: str, value: float | None) -> dict:
    return {} if kind == "low_confidence" else {kind: value}


# ------------------------------------------------------------------ the reference model itself
@torch.no_grad()
def test_reference_model_and_weight_map() -> None:
    """The torch reference, its cached forward on a fresh cache, and our forward agree."""
    tm, cfg, params = _models()
    rng = np.random.default_rng(0)
    x = np.concatenate([PROMPT, rng.integers(3, 90, (2, 18))], 1)
    x[:, 14:] = MASK
    full = tm(torch.from_numpy(x)).numpy()
    full2, past = tm.forward_cache(torch.from_numpy(x))
    np.testing.assert_array_equal(full2.numpy(), full)
    ours = np.asarray(apply(params, cfg, jnp.asarray(x, jnp.int32),
                            default_positions(jnp.ones(x.shape, bool)), jnp.ones(x.shape, bool)))
    np.testing.assert_allclose(ours, full, atol=1e-4, rtol=0)
    start, end = 14, 22
    prefix = [(k[:, :, :start], v[:, :, :start]) for k, v in past]
    got, _ = tm.forward_cache(torch.from_numpy(x[:, start:]), prefix)
    np.testing.assert_allclose(got.numpy(), full[:, start:], atol=1e-4, rtol=0)
    replace = torch.zeros(x.shape, dtype=torch.bool)
    replace[:, start:end] = True
    stale = [(k.clone(), v.clone()) for k, v in past]
    for k, v in stale:  # the block's cached entries must not matter: they are replaced
        k[:, :, start:end] = 9.0
        v[:, :, start:end] = -9.0
    got, _ = tm.forward_cache(torch.from_numpy(x[:, start:end]), stale, replace)
    np.testing.assert_allclose(got.numpy(), full[:, start:end], atol=1e-4, rtol=0)


# ------------------------------------------------------------------ decode parity
CONTROLLERS = [("low_confidence", None), ("threshold", 0.9), ("threshold", 0.5),
               ("factor", 1.0)]
GEN = dict(gen_length=24, block_length=8)


def _run_both(mode: str, kind: str, value: float | None, steps: int):
    tm, cfg, params = _models()
    trace: list = []
    want, nfe = fastdllm_generate_cached(tm, PROMPT, mode=mode, steps=steps, mask_id=MASK,
                                         suppress_token_ids=(MASK,), trace=trace,
                                         **GEN, **_ref_kwargs(kind, value))
    gen = GenerateConfig(steps=steps, cache=mode, **GEN)
    out = generate(params, cfg, PROMPT.astype(np.int32), gen, _controller(kind, value))
    return want, nfe, trace, np.asarray(out.tokens), out


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("kind,value", CONTROLLERS)
def test_cached_decode_matches_fastdllm(mode: str, kind: str, value: float | None) -> None:
    steps = 12 if kind == "low_confidence" else 24  # fixed schedule: 2 tokens per step
    want, nfe, trace, got, out = _run_both(mode, kind, value, steps)
    assert not (want == MASK).any()
    np.testing.assert_array_equal(got, want)
    assert int(out.stats.steps) == nfe  # same number of batched forwards
    assert sum(t[2] == "refresh" for t in trace) == GEN["gen_length"] // GEN["block_length"]
    assert nfe > 3 * 2, "the test should exercise cached steps"


def test_cached_fixed_schedule_with_more_steps_than_tokens() -> None:
    """16 steps for 8 tokens per block: both stop a block once it has no MASK (after 8)."""
    want, nfe, _, got, out = _run_both("dual", "low_confidence", None, steps=48)
    np.testing.assert_array_equal(got, want)
    assert int(out.stats.steps) == nfe == 24


def test_cache_changes_tokens() -> None:
    """The parity above is not vacuous: with these weights the approximate caches give tokens
    different from the uncached decode (so a decode that ignored the cache, or refreshed it
    every step, would fail the parity tests)."""
    tm, cfg, params = _models()

    def fn(tokens: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            lg = tm(torch.from_numpy(np.asarray(tokens, np.int64))).double().numpy()
        lg[..., MASK] = -np.inf
        return lg

    for mode in ("prefix", "dual"):
        differs = []
        for kind, value in CONTROLLERS:
            steps = 12 if kind == "low_confidence" else 24
            uncached, _ = ref.fastdllm_generate(fn, PROMPT, steps=steps, mask_id=MASK, **GEN,
                                                **_ref_kwargs(kind, value))
            cached, _ = fastdllm_generate_cached(tm, PROMPT, mode=mode, steps=steps,
                                                 mask_id=MASK, suppress_token_ids=(MASK,),
                                                 **GEN, **_ref_kwargs(kind, value))
            differs.append(bool((uncached != cached).any()))
        assert any(differs), f"{mode}: the cache never changed a token; pick other weights"
