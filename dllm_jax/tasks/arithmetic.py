"""Multi-digit addition: ``add: 457 + 68`` -> ``525``.

Numbers are written in decimal without leading zeros; the task tokenizer splits a number into
one token per digit (first digit ``4``, then ``##5``, ``##7``), so the answer digits are
separate tokens that depend on each other through the carries ('medium' dependency).

Difficulty knobs: ``digits`` (most digits of an operand), ``min_digits`` (fewest),
``operands`` (how many numbers are added, >= 2). Each operand draws its digit count uniformly
in ``[min_digits, digits]`` and then a uniform number with that many digits.

Scoring: valid == exact == the output is the sum written as one digit string. Partial credit:
fraction of digit places (aligned from the least significant digit) that agree with the sum,
over the longer of the two digit strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Instance, Score, Task, words


def check_addition_knobs(task: str, digits: int, min_digits: int, operands: int) -> None:
    """Raise ValueError unless 1 <= min_digits <= digits <= 18 and 2 <= operands <= 9."""
    if not 1 <= min_digits <= digits <= 18:
        raise ValueError(f"{task}: need 1 <= min_digits <= digits <= 18, got {min_digits}, {digits}.")
    if not 2 <= operands <= 9:
        raise ValueError(f"{task}: operands must be in 2..9, got {operands}.")


@dataclass(frozen=True)
class AdditionTask(Task):
    """Addition of ``operands`` numbers of ``min_digits``..``digits`` digits."""

    @property
    def _defaults(self) -> dict[str, Any]:
        return {"digits": 3, "min_digits": 2, "operands": 2}

    def _check(self, digits: int, min_digits: int, operands: int) -> None:
        check_addition_knobs(self.name, digits, min_digits, operands)

    def max_answer_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        return len(str(k["operands"] * (10 ** k["digits"] - 1)))

    def max_prompt_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        return 1 + k["operands"] * k["digits"] + (k["operands"] - 1)

    def _sample(self, rng: np.random.Generator, **k: Any) -> Instance:
        self._check(**k)
        nums = []
        for _ in range(k["operands"]):
            d = int(rng.integers(k["min_digits"], k["digits"] + 1))
            lo = 0 if d == 1 else 10 ** (d - 1)
            nums.append(int(rng.integers(lo, 10 ** d)))
        prompt = f"{self.keyword} " + " + ".join(str(x) for x in nums)
        return Instance(self.name, prompt, str(sum(nums)), {"operands": tuple(nums)})

    def score(self, instance: Instance, output: str) -> Score:
        out = words(output)
        ref = instance.answer
        exact = out == [ref]
        if exact:
            return Score(True, True, 1.0)
        got = "".join(out)
        n = max(len(got), len(ref))
        hits = sum(a == b for a, b in zip(reversed(got), reversed(ref)))
        return Score(False, False, hits / n if n else 1.0)


ADD = AdditionTask(
    name="add",
    dependency="medium",
    description="'add: 457 + 68' -> '525' (one token per digit; carries tie the answer digits together)",
)
