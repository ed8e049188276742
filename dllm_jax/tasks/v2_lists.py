"""Long list operations (tasks v2): sorting a long list, merging two sorted lists and
riffling two lists together.

==========  ==========================================  ======================================
task        prompt                                      answer
==========  ==========================================  ======================================
sort_long   ``sort_long: 512 108 733 ...`` (30 numbers)  ``108 512 733 ...``
merge       ``merge: 108 512 904 | 230 733``             ``108 230 512 733 904``
riffle      ``riffle: 512 108 904 | 733 230``            any interleaving that keeps each list's
                                                        order, e.g. ``512 733 108 230 904``
==========  ==========================================  ======================================

Numbers are distinct, drawn from ``min_value..max_value`` (default 100..999, so every number
is three tokens: answers of 90 tokens that are all content), and ordered numerically.

Dependency: sort_long and merge are 'medium'. Each has one valid answer, but the number at output position ``i``
is the ``i``-th smallest of the whole input: it depends on every input number, and decoding
positions independently duplicates or drops numbers near equal ranks. (merge is the easier
one: each input list is already sorted, so a position depends on how the two interleave.)
riffle is 'high': any of the C(n, k) interleavings is valid (the reference is a uniform random
one); which list the next number comes from is free, but every number must appear exactly once
and in its list's order, so positions decoded independently duplicate or skip numbers.

Scoring: sort_long and merge are valid == exact (whitespace-normalised); partial credit is the
fraction of agreeing word positions over the longer of output and answer. riffle is valid iff
the output is an interleaving of the two lists; partial credit is the longest prefix of the
output that starts some interleaving, over the longer of output and answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Instance, Score, positional_partial, words
from .v2_base import TaskV2, number_tokens


def _check_values(name: str, min_value: int, max_value: int, count: int) -> None:
    if not 0 <= min_value <= max_value:
        raise ValueError(f"{name}: need 0 <= min_value <= max_value, got {min_value}, {max_value}.")
    if max_value - min_value + 1 < count:
        raise ValueError(f"{name}: {max_value - min_value + 1} distinct values cannot fill {count} numbers.")


def _draw_distinct(rng: np.random.Generator, n: int, min_value: int, max_value: int) -> list[int]:
    return [int(v) + min_value for v in rng.choice(max_value - min_value + 1, size=n, replace=False)]


def _exact_score(instance: Instance, output: str) -> Score:
    out, ref = words(output), words(instance.answer)
    if out == ref:
        return Score(True, True, 1.0)
    return Score(False, False, positional_partial(out, ref))


@dataclass(frozen=True)
class SortLongTask(TaskV2):
    """Sort ``min_len..max_len`` distinct numbers ascending ('medium', see module)."""

    @property
    def _defaults(self) -> dict[str, Any]:
        return {"min_len": 30, "max_len": 30, "min_value": 100, "max_value": 999}

    def _check(self, min_len: int, max_len: int, min_value: int, max_value: int) -> None:
        if not 2 <= min_len <= max_len <= 80:
            raise ValueError(f"sort_long: need 2 <= min_len <= max_len <= 80, got {min_len}, {max_len}.")
        _check_values(self.name, min_value, max_value, max_len)

    def max_answer_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        return k["max_len"] * number_tokens(k["max_value"])

    def max_prompt_tokens(self, **difficulty: Any) -> int:
        return 1 + self.max_answer_tokens(**difficulty)

    def _sample(self, rng: np.random.Generator, **k: Any) -> Instance:
        self._check(**k)
        n = int(rng.integers(k["min_len"], k["max_len"] + 1))
        nums = _draw_distinct(rng, n, k["min_value"], k["max_value"])
        prompt = f"{self.keyword} " + " ".join(map(str, nums))
        return Instance(self.name, prompt, " ".join(map(str, sorted(nums))), {"items": tuple(nums)})

    def score(self, instance: Instance, output: str) -> Score:
        return _exact_score(instance, output)


@dataclass(frozen=True)
class MergeTask(TaskV2):
    """Merge two ascending lists of distinct numbers into one ('medium', see module).

    ``total`` numbers are split into two non-empty lists of at least ``min_part`` each."""

    @property
    def _defaults(self) -> dict[str, Any]:
        return {"total": 30, "min_part": 10, "min_value": 100, "max_value": 999}

    def _check(self, total: int, min_part: int, min_value: int, max_value: int) -> None:
        if not 1 <= min_part <= total // 2 or total > 80:
            raise ValueError(f"{self.name}: need 1 <= min_part <= total / 2 and total <= 80, got {min_part}, {total}.")
        _check_values(self.name, min_value, max_value, total)

    def max_answer_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        return k["total"] * number_tokens(k["max_value"])

    def max_prompt_tokens(self, **difficulty: Any) -> int:
        return 2 + self.max_answer_tokens(**difficulty)  # keyword and '|'

    def _sample(self, rng: np.random.Generator, **k: Any) -> Instance:
        self._check(**k)
        total = k["total"]
        nums = _draw_distinct(rng, total, k["min_value"], k["max_value"])
        a = int(rng.integers(k["min_part"], total - k["min_part"] + 1))
        left, right = sorted(nums[:a]), sorted(nums[a:])
        prompt = f"{self.keyword} " + " ".join(map(str, left)) + " | " + " ".join(map(str, right))
        return Instance(self.name, prompt, " ".join(map(str, sorted(nums))), {"left": tuple(left), "right": tuple(right)})

    def score(self, instance: Instance, output: str) -> Score:
        return _exact_score(instance, output)


@dataclass(frozen=True)
class RiffleTask(TaskV2):
    """Interleave two lists of distinct numbers, keeping each list's order ('high', see module).

    ``total`` numbers are split into two lists of at least ``min_part`` each (in random order)."""

    @property
    def _defaults(self) -> dict[str, Any]:
        return {"total": 30, "min_part": 10, "min_value": 100, "max_value": 999}

    _check = MergeTask._check
    max_answer_tokens = MergeTask.max_answer_tokens
    max_prompt_tokens = MergeTask.max_prompt_tokens

    def _sample(self, rng: np.random.Generator, **k: Any) -> Instance:
        self._check(**k)
        total = k["total"]
        nums = _draw_distinct(rng, total, k["min_value"], k["max_value"])
        a = int(rng.integers(k["min_part"], total - k["min_part"] + 1))
        left, right = nums[:a], nums[a:]
        from_left = np.zeros(total, dtype=bool)
        from_left[rng.choice(total, size=a, replace=False)] = True
        li, ri = iter(left), iter(right)
        answer = [next(li) if f else next(ri) for f in from_left]
        prompt = f"{self.keyword} " + " ".join(map(str, left)) + " | " + " ".join(map(str, right))
        return Instance(self.name, prompt, " ".join(map(str, answer)), {"left": tuple(left), "right": tuple(right)})

    @staticmethod
    def interleaved_prefix(out: list[str], left: tuple[int, ...], right: tuple[int, ...]) -> int:
        """Length of the longest prefix of ``out`` that starts an interleaving of the lists."""
        a, b = [str(v) for v in left], [str(v) for v in right]
        i = j = 0
        for n, t in enumerate(out):
            if i < len(a) and t == a[i]:
                i += 1
            elif j < len(b) and t == b[j]:
                j += 1
            else:
                return n
        return len(out)

    def score(self, instance: Instance, output: str) -> Score:
        out = words(output)
        exact = out == words(instance.answer)
        left, right = instance.meta["left"], instance.meta["right"]
        total = len(left) + len(right)
        good = self.interleaved_prefix(out, left, right)
        valid = len(out) == total and good == total
        return Score(valid, exact, 1.0 if valid else good / max(total, len(out)))


SORT_LONG = SortLongTask(
    name="sort_long", dependency="medium", category="lists",
    description="'sort_long: 512 108 733 ...' (30 numbers) -> the numbers in ascending order",
)
MERGE = MergeTask(
    name="merge", dependency="medium", category="lists",
    description="'merge: 108 512 904 | 230 733' -> '108 230 512 733 904' (two sorted lists merged)",
)

RIFFLE = RiffleTask(
    name="riffle", dependency="high", category="lists", unique_answer=False,
    description="'riffle: 512 108 904 | 733 230' -> any interleaving of the two lists that keeps each one's order",
)

LIST_TASKS_V2: dict[str, TaskV2] = {t.name: t for t in (SORT_LONG, MERGE, RIFFLE)}
