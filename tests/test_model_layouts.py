"""Per-layer (unrolled) and fused params layouts (`models.unstack_layers`) compute the same
function as the stacked `lax.scan` layout, and round-trip through `stack_layers`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controllers import make_controller
from dllm_jax import models as M
from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.decode import generate


@pytest.mark.parametrize("arch", ["llada", "dream", "sdar"])
@pytest.mark.parametrize("fuse", [False, True])
def test_unstacked_layouts_match_stacked(arch: str, fuse: bool) -> None:
    cfg = ModelConfig.tiny(arch, vocab_size=64, mask_token_id=63)
    params = M.init_params(cfg, jax.random.key(0), std=0.3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 60, (2, 24)), jnp.int32)
    per_layer = M.unstack_layers(params, fuse=fuse)
    assert isinstance(per_layer["layers"], list) and len(per_layer["layers"]) == cfg.num_layers
    if fuse:
        assert "qkv_proj" in per_layer["layers"][0] and "gate_up_proj" in per_layer["layers"][0]
    # float32: the unrolled loop sums in the same order up to XLA's fusion choices
    np.testing.assert_allclose(M.apply(per_layer, cfg, tokens), M.apply(params, cfg, tokens),
                               atol=1e-4)
    back = M.stack_layers(per_layer, cfg)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    gen = GenerateConfig(gen_length=16, block_length=8, steps=8, cache="dual")
    ctrl = make_controller("low_confidence")
    want = generate(params, cfg, np.asarray(tokens[:, :8]), gen, ctrl)
    got = generate(per_layer, cfg, np.asarray(tokens[:, :8]), gen, ctrl)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
