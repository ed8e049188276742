"""The guarantee README states: in float32 an answer does not depend on the batch it was
decoded in (its neighbours, their number, its row), at a fixed padded width. A hypothesis property
test over random prompts, batch compositions, orders and controllers; shapes are drawn from
a few buckets so that the decode compiles a bounded number of times."""

from __future__ import annotations

import jax
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from controllers import make_controller
from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.decode import generate
from dllm_jax.models import init_params
from dllm_jax.session import left_pad

CFG = ModelConfig.tiny("llada", vocab_size=48, mask_token_id=47, eos_token_id=1, pad_token_id=0)
PARAMS = init_params(CFG, jax.random.key(7), std=0.5)
GEN = GenerateConfig(gen_length=8, block_length=4, steps=8)
CONTROLLERS = {"low_confidence": {}, "threshold": {"threshold": 0.6}, "factor": {"factor": 1.0},
               "entropy": {}, "r2": {"threshold": 0.7}, "ce": {}}

prompt = st.lists(st.integers(2, 46), min_size=1, max_size=6)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(prompts=st.lists(prompt, min_size=2, max_size=4), name=st.sampled_from(sorted(CONTROLLERS)),
       order=st.randoms(use_true_random=False))
def test_answers_do_not_depend_on_the_batch(prompts, name, order) -> None:
    ctrl = make_controller(name, **CONTROLLERS[name])
    rows = list(range(len(prompts)))
    order.shuffle(rows)
    shuffled = [prompts[i] for i in rows]
    ids, valid = left_pad(shuffled, CFG.pad_token_id, width=6, rows=4)    # [4, 6]
    batch = generate(PARAMS, CFG, ids, GEN, ctrl, prompt_valid=valid)
    for r, i in enumerate(rows):
        alone_ids, alone_valid = left_pad([prompts[i]], CFG.pad_token_id, width=6, rows=1)
        alone = generate(PARAMS, CFG, alone_ids, GEN, ctrl, prompt_valid=alone_valid)
        np.testing.assert_array_equal(np.asarray(batch.tokens[r]), np.asarray(alone.tokens[0]))
        assert int(batch.stats.nfe[r]) == int(alone.stats.nfe[0])
