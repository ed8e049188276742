"""Statistics for the quality benchmark: Wilson score intervals and content-token counts.

Content tokens: a decoded answer is a fixed number of positions ``L`` (the generation length)
of which only the part up to the first EOS carries the answer; the rest is EOS padding that a
denoiser commits almost for free. ``content_tokens`` counts the positions up to AND including
the first EOS (the EOS that ends the answer is content: placing it is part of the answer), or
all ``L`` positions when the answer has no EOS. Tokens per forward computed on content tokens
do not reward a controller for committing padding.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np

#: The 97.5 % quantile of the standard normal distribution (two-sided 95 % interval).
Z95 = 1.959964

ArrayLike = Union[Sequence[int], np.ndarray]


def _as_count(x: object, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, got {type(x).__name__}.")
    return int(x)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion.

    Args:
        successes: number of successes (an int in ``0..n``).
        n: number of trials (an int > 0).
        z: the standard normal quantile of the interval (1.959964 for 95 %).
    Returns:
        ``(low, high)`` as fractions in [0, 1] (not percent); ``low == 0`` when
        ``successes == 0`` and ``high == 1`` when ``successes == n``.
    Raises:
        ValueError: ``n`` is 0 or negative, ``successes`` is outside ``0..n`` or ``z`` is not
            positive.
        TypeError: a non-integer count.
    """
    s, n = _as_count(successes, "successes"), _as_count(n, "n")
    if n <= 0:
        raise ValueError(f"wilson_interval needs at least one trial, got n = {n}.")
    if not 0 <= s <= n:
        raise ValueError(f"successes must lie in 0..n = 0..{n}, got {s}.")
    if not (isinstance(z, (int, float, np.floating)) and math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a positive finite number, got {z!r}.")
    p = s / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    low = 0.0 if s == 0 else max(0.0, center - half)
    high = 1.0 if s == n else min(1.0, center + half)
    return low, high


def _eos_positions(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Per row, the number of content positions of ``ids`` [B, L]."""
    is_eos = ids == eos_id
    first = np.argmax(is_eos, axis=1)
    has = is_eos.any(axis=1)
    return np.where(has, first + 1, ids.shape[1]).astype(np.int64)


def content_tokens(answer_ids: ArrayLike, eos_id: int) -> int:
    """Content tokens of one decoded answer: positions up to and including the first EOS.

    Args:
        answer_ids: the answer's token ids, shape ``[L]`` (the generated positions only, no
            prompt).
        eos_id: the EOS token id.
    Returns:
        A count of positions in ``1..L`` (``L`` when there is no EOS; 0 for an empty answer).
    """
    ids = np.asarray(answer_ids)
    if ids.ndim != 1:
        raise ValueError(f"answer_ids must be one answer of shape [L], got shape {ids.shape}.")
    if ids.size == 0:
        return 0
    return int(_eos_positions(ids[None, :], int(eos_id))[0])


def content_token_counts(answer_ids: ArrayLike, eos_id: int) -> np.ndarray:
    """Content tokens of each answer of a batch ``[B, L]``: int64 array ``[B]`` (positions)."""
    ids = np.asarray(answer_ids)
    if ids.ndim != 2:
        raise ValueError(f"answer_ids must be a batch of shape [B, L], got shape {ids.shape}.")
    if ids.shape[1] == 0:
        return np.zeros(ids.shape[0], dtype=np.int64)
    return _eos_positions(ids, int(eos_id))


def content_tokens_per_forward(answer_ids: ArrayLike, nfe: ArrayLike, eos_id: int) -> float:
    """Content tokens per forward pass over a batch: ``sum(content) / sum(nfe)``.

    Args:
        answer_ids: decoded answers, int ``[B, L]``.
        nfe: forward passes (model evaluations) spent on each answer, ``[B]``, each > 0.
        eos_id: the EOS token id.
    Returns:
        Tokens per forward (a ratio of totals, so long answers weigh more than short ones).
    Raises:
        ValueError: shapes disagree, the batch is empty, or an NFE is not positive.
    """
    counts = content_token_counts(answer_ids, eos_id)
    f = np.asarray(nfe, dtype=np.float64).reshape(-1)
    if f.shape[0] != counts.shape[0]:
        raise ValueError(f"nfe has {f.shape[0]} entries for {counts.shape[0]} answers.")
    if counts.shape[0] == 0:
        raise ValueError("content_tokens_per_forward needs at least one answer.")
    if not np.all(f > 0):
        raise ValueError("every answer needs at least one forward pass (nfe > 0).")
    return float(counts.sum() / f.sum())


def content_fraction(answer_ids: ArrayLike, eos_id: int) -> float:
    """Mean over answers of ``content_tokens / L`` for a batch ``[B, L]``: the share of the
    generated positions that are content, in [0, 1]."""
    ids = np.asarray(answer_ids)
    counts = content_token_counts(ids, eos_id)
    if counts.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError("content_fraction needs at least one answer of at least one position.")
    return float(np.mean(counts / ids.shape[1]))


__all__ = [
    "Z95", "wilson_interval", "content_tokens", "content_token_counts", "content_tokens_per_forward",
    "content_fraction",
]
