"""Properties of the compiled decode loop that hold for every controller."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controllers import CONTROLLER_NAMES, applicable_options, make_controller
from controllers.baselines import DREAM_ALGS
from dllm_jax.config import ConfigError, GenerateConfig
from dllm_jax.decode import GenerateError, _generate_jit, generate
from tests.controller_props import CFG, GEN, PARAMS, check_decode_properties, prompts

@pytest.mark.parametrize("name", CONTROLLER_NAMES)
@pytest.mark.parametrize("kind", ["peaked", "flat"])
def test_controller_ends_and_never_rewrites(name: str, kind: str) -> None:
    """Ends within max steps, no MASK left, committed tokens never change, NFE = active steps."""
    check_decode_properties(make_controller(name), kind, GEN, min_one=name not in DREAM_ALGS)


@pytest.mark.parametrize("name", ["low_confidence", "threshold", "factor", "entropy"])
def test_batch_equals_rows_alone(name: str) -> None:
    """Padding and other rows never change a row's answer."""
    prompt, valid = prompts()
    ctrl = make_controller(name, **applicable_options(name, threshold=0.3))
    batch = generate(PARAMS["peaked"], CFG, prompt, GEN, ctrl, prompt_valid=valid)
    for b in range(prompt.shape[0]):
        alone = generate(PARAMS["peaked"], CFG, prompt[b, valid[b]][None], GEN, ctrl)
        np.testing.assert_array_equal(np.asarray(batch.tokens[b]), np.asarray(alone.tokens[0]))
        # Rows wait for each other at block ends (lockstep), so compare work, not step ids.
        assert int(batch.stats.nfe[b]) == int(alone.stats.nfe[0])


def test_fixed_schedule_commits_per_step() -> None:
    """LLaDA: a block of 8 MASKs over 4 steps commits exactly 2 per step."""
    gen = GenerateConfig(gen_length=16, block_length=8, steps=8)
    out = generate(PARAMS["peaked"], CFG, np.array([[5, 6, 7]]), gen,
                   make_controller("low_confidence"))
    fix = np.asarray(out.stats.fix_step[0])
    assert int(out.stats.steps) == 8
    np.testing.assert_array_equal(np.bincount(fix, minlength=8), np.full(8, 2))


def test_compiles_once_and_loops_on_device() -> None:
    gen = GenerateConfig(gen_length=16, block_length=8, steps=16)
    ctrl = make_controller("threshold", threshold=0.5)
    before = _generate_jit._cache_size()
    for seed in range(3):
        prompt = np.random.default_rng(seed).integers(2, 60, size=(2, 6))
        generate(PARAMS["peaked"], CFG, prompt, gen, ctrl)
    assert _generate_jit._cache_size() == before + 1
    lowered = _generate_jit.lower(PARAMS["peaked"], jnp.ones((2, 6), jnp.int32),
                                  jnp.ones((2, 6), bool), jax.random.key(0), ctrl,
                                  model_cfg=CFG, gen_cfg=gen)
    assert "stablehlo.while" in lowered.as_text()


def test_sampling_is_seeded() -> None:
    gen = GenerateConfig(gen_length=16, block_length=8, steps=8, temperature=1.0)
    prompt = np.array([[5, 6, 7]])
    run = lambda s: np.asarray(generate(PARAMS["flat"], CFG, prompt, gen,  # noqa: E731
                                        make_controller("random"), key=jax.random.key(s)).tokens)
    np.testing.assert_array_equal(run(1), run(1))
    assert any((run(1) != run(s)).any() for s in range(2, 5))


def test_stop_at_eos_fills_rest() -> None:
    cfg = CFG.replace(eos_token_id=3)
    params = jax.tree_util.tree_map(lambda x: x, PARAMS["peaked"])
    # Make EOS the overwhelming prediction everywhere.
    params["lm_head"] = params["lm_head"].at[:, 3].set(5.0)
    gen = GenerateConfig(gen_length=16, block_length=8, steps=16, stop_at_eos=True)
    out = generate(params, cfg, np.array([[5, 6, 7]]), gen, make_controller("low_confidence"))
    assert (np.asarray(out.tokens) == 3).all()
    assert int(out.stats.steps) < 16


def test_bad_input_messages() -> None:
    ctrl = make_controller("low_confidence")
    with pytest.raises(GenerateError, match="empty"):
        generate(PARAMS["peaked"], CFG, np.zeros((1, 0), np.int32), GEN, ctrl)
    with pytest.raises(GenerateError, match="maximum length"):
        generate(PARAMS["peaked"], CFG, np.ones((1, CFG.max_position), np.int32), GEN, ctrl)
    with pytest.raises(ConfigError, match="multiple of block_length"):
        GenerateConfig(gen_length=20, block_length=8)
    with pytest.raises(ConfigError, match="multiple of the number of blocks"):
        GenerateConfig(gen_length=16, block_length=8, steps=7)
    with pytest.raises(ValueError, match="unknown controller"):
        make_controller("fastest")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
            make_controller("threshold", threshold=bad)
    with pytest.raises(GenerateError, match="not a controller"):
        generate(PARAMS["peaked"], CFG, np.ones((1, 3), np.int32), GEN, object())
