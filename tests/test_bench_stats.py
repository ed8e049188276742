"""dllm_jax.bench.stats: Wilson intervals against published values, content-token counting on
hand-made answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dllm_jax.bench.stats import (
    Z95, content_fraction, content_token_counts, content_tokens, content_tokens_per_forward, wilson_interval,
)

EOS = 1

# 95 % Wilson score intervals (no continuity correction), 4 decimals. 81/263, 15/148, 0/20,
# 1/29 and 29/29: Newcombe (1998), "Two-sided confidence intervals for the single proportion",
# Stat. Med. 17:857-872, Table I, method 3. 0/10, 5/10 and 10/10: the same formula as commonly
# tabulated. Tolerance: half a unit of the 4th decimal (5e-5).
PUBLISHED = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0000),
    (0, 10, 0.0000, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0000),
]


@pytest.mark.parametrize("s,n,lo,hi", PUBLISHED)
def test_wilson_published_values(s, n, lo, hi):
    low, high = wilson_interval(s, n)
    assert abs(low - lo) <= 5e-5 and abs(high - hi) <= 5e-5, (low, high)


def test_wilson_properties():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    # symmetric under successes <-> failures
    for s, n in ((3, 17), (0, 5), (250, 500), (499, 500)):
        lo, hi = wilson_interval(s, n)
        lo2, hi2 = wilson_interval(n - s, n)
        assert lo == pytest.approx(1 - hi2, abs=1e-12) and hi == pytest.approx(1 - lo2, abs=1e-12)
        assert 0.0 <= lo <= s / n <= hi <= 1.0
    # wider for a larger z, narrower for more trials at the same proportion
    a, b = wilson_interval(30, 100, z=1.0), wilson_interval(30, 100)
    assert b[0] < a[0] and a[1] < b[1]
    c = wilson_interval(300, 1000)
    assert b[1] - b[0] > c[1] - c[0]
    assert Z95 == pytest.approx(1.959964, abs=1e-6)
    assert wilson_interval(np.int64(5), np.int64(10)) == wilson_interval(5, 10)


def test_wilson_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for n in (1, 2, 7, 50, 263, 1000):
        for s in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ci = stats.binomtest(s, n).proportion_ci(0.95, method="wilson")
            lo, hi = wilson_interval(s, n)
            assert abs(lo - ci.low) < 1e-6 and abs(hi - ci.high) < 1e-6, (s, n)


def test_wilson_errors():
    with pytest.raises(ValueError, match="at least one trial"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes must lie in"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="successes must lie in"):
        wilson_interval(-1, 10)
    with pytest.raises(ValueError, match="z must be"):
        wilson_interval(1, 10, z=0.0)
    with pytest.raises(ValueError, match="z must be"):
        wilson_interval(1, 10, z=math.nan)
    with pytest.raises(TypeError, match="integer"):
        wilson_interval(0.5, 10)


def test_content_tokens_hand_made():
    assert content_tokens([7, 8, 9, EOS, EOS, EOS], EOS) == 4  # 3 answer tokens + the closing EOS
    assert content_tokens([EOS, EOS, EOS], EOS) == 1  # an empty answer still commits its EOS
    assert content_tokens([7, 8, 9, 10], EOS) == 4  # no EOS: every position is content
    assert content_tokens([7, EOS, 8, EOS], EOS) == 2  # only the first EOS counts
    assert content_tokens([5, 6, 2, 2], 2) == 3  # eos_id is a parameter
    assert content_tokens(np.array([], dtype=np.int32), EOS) == 0
    with pytest.raises(ValueError, match="one answer"):
        content_tokens([[1, 2]], EOS)


def test_content_batch_per_forward_and_fraction():
    ids = np.array([
        [7, 8, EOS, EOS],   # 3
        [7, 8, 9, 10],      # 4 (no EOS)
        [EOS, EOS, EOS, EOS],  # 1
    ])
    counts = content_token_counts(ids, EOS)
    assert counts.tolist() == [3, 4, 1] and counts.dtype == np.int64
    assert counts.tolist() == [content_tokens(r, EOS) for r in ids]
    assert content_tokens_per_forward(ids, [2, 4, 2], EOS) == pytest.approx(8 / 8)
    assert content_tokens_per_forward(ids, np.array([1, 1, 2]), EOS) == pytest.approx(8 / 4)
    assert content_fraction(ids, EOS) == pytest.approx((3 / 4 + 4 / 4 + 1 / 4) / 3)
    with pytest.raises(ValueError, match="nfe has 2 entries for 3 answers"):
        content_tokens_per_forward(ids, [1, 2], EOS)
    with pytest.raises(ValueError, match="at least one forward"):
        content_tokens_per_forward(ids, [1, 0, 2], EOS)
    with pytest.raises(ValueError, match="at least one answer"):
        content_tokens_per_forward(np.zeros((0, 4), dtype=np.int64), [], EOS)
    with pytest.raises(ValueError, match=r"shape \[B, L\]"):
        content_token_counts([1, 2, 3], EOS)
