"""XLA attention over query chunks (long prefills and refreshes, `dense.MAX_SCORES`) equals
the one-shot computation: padding keys, block-causal masks, grouped-query heads, and a query
length that is not a multiple of the chunk."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax.attention import attention_mask
from dllm_jax.attention.dense import query_chunk, xla_attention


@pytest.mark.parametrize("tq,max_scores", [(13, 4 * 2 * 16 * 4), (16, 4 * 2 * 16 * 1), (16, 1)])
def test_chunked_equals_one_shot(tq: int, max_scores: int) -> None:
    b, h, hkv, d, tk = 2, 4, 2, 8, 16
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(k1, (b, tq, h, d))
    k = jax.random.normal(k2, (b, tk, hkv, d))
    v = jax.random.normal(k3, (b, tk, hkv, d))
    valid = jnp.asarray(np.arange(tk)[None, :] >= np.array([[0], [3]]))   # row 1 left-padded
    qpos = jnp.broadcast_to(jnp.arange(tk - tq, tk), (b, tq))
    mask = attention_mask(qpos, jnp.broadcast_to(jnp.arange(tk), (b, tk)), valid, 4)
    assert query_chunk(b, h, tq, tk, max_scores) < tq          # the chunked path runs
    want = xla_attention(q, k, v, mask, max_scores=2**40)
    got = jax.jit(lambda *a: xla_attention(*a, max_scores=max_scores))(q, k, v, mask)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)  # float32


def test_query_chunk_bounds() -> None:
    assert query_chunk(1, 32, 16384, 16384, 2**28) == 512
    assert query_chunk(1, 1, 8, 8, 2**28) == 8
    assert query_chunk(64, 32, 8, 2**20, 2**28) == 1
