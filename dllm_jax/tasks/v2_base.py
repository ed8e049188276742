"""Shared pieces of the v2 tasks (long answers): the split rule, the v2 base class, the extra
tokens and helpers used by several families.

Split (disjoint by instance AND by answer)
------------------------------------------
:func:`split_of_v2` puts an instance in 'train' or 'test' (or in neither) from two salted
SHA-256 buckets, one of the prompt and one of the reference answer, each 'test' for
``TEST_PERCENT`` % of the hash space:

* tasks whose answer is a function of the prompt (``unique_answer=True``): the answer bucket
  alone decides. Two instances with the same answer text fall in the same split, and so do two
  with the same prompt (same prompt => same answer).
* tasks with several valid answers, whose reference answer is drawn at random
  (``unique_answer=False``): the instance is in split ``s`` only if BOTH buckets say ``s``;
  otherwise it belongs to no split and is never generated. A test prompt can then never be a
  train prompt, and a test answer never a train answer. About ``(TEST_PERCENT/100)**2`` of the
  draws land in 'test' (4 %), ``(1 - TEST_PERCENT/100)**2`` in 'train' (64 %).

Tokens
------
The v2 prompts need a keyword per task, a few symbols (``= * - ( ) , ; { } :``) and record
keys that the v1 vocabulary lacks. :data:`V2_TOKENS` lists them; the task vocabulary
(:func:`dllm_jax.tasks.vocab.task_vocabulary`) appends them after every v1 token, so every v1
id (and the bundled model's tokenizer) is unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

from .base import TEST_PERCENT, Instance, Task, split_of

CATEGORIES = ("lists", "reasoning", "puzzles", "text")

#: Prompt keywords of the v2 tasks (one token each), in vocabulary order.
V2_KEYWORDS: tuple[str, ...] = (
    "sort_long:", "merge:", "riffle:", "add_steps:", "mul_steps:", "eval_steps:", "latin9:", "sudoku9:", "path:",
    "record:", "sentences:",
)
#: Symbols used by the v2 answers and prompts (one token each).
V2_SYMBOLS: tuple[str, ...] = ("=", "*", "-", "(", ")", ",", ";", "{", "}", ":")
#: Keys of the record-formatting task (one token each).
RECORD_KEYS: tuple[str, ...] = ("name", "age", "pet", "trait", "score")
#: Every token the v2 tasks add to the task vocabulary, in vocabulary order (after every v1
#: token). APPEND ONLY: a trained v2 model depends on these ids; a new task's keyword goes at
#: the end.
V2_TOKENS: tuple[str, ...] = V2_KEYWORDS + V2_SYMBOLS + RECORD_KEYS


def _test_bucket(key: str) -> bool:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT


def answer_split(task_name: str, answer: str) -> str:
    """'train' or 'test' from a hash of ``(task_name, answer)`` (``TEST_PERCENT`` % test).

    The answer is whitespace-normalised first, so two texts with the same tokens agree."""
    norm = " ".join(answer.split())
    return "test" if _test_bucket(f"{task_name}\nanswer\n{norm}") else "train"


def split_of_v2(task_name: str, prompt: str, answer: str, unique_answer: bool) -> Optional[str]:
    """The split of a v2 instance: 'train', 'test' or None (in no split; never generated).

    Args:
        task_name: the task's registry name (salts both hashes).
        prompt: the prompt text.
        answer: the reference answer text.
        unique_answer: True when the answer is a function of the prompt; then the answer hash
            alone decides. Otherwise the prompt hash (:func:`dllm_jax.tasks.base.split_of`) and
            the answer hash must agree.
    """
    a = answer_split(task_name, answer)
    if unique_answer:
        return a
    return a if split_of(task_name, prompt) == a else None


@dataclass(frozen=True)
class TaskV2(Task):
    """A v2 task: long answers (64-256 tokens at the default difficulty) and the v2 split.

    Attributes:
        category: 'lists' | 'reasoning' | 'puzzles' | 'text' (ParallelBench's three categories
            plus reasoning chains).
        unique_answer: the reference answer is a function of the prompt (one valid answer);
            False for tasks with several valid answers and a random reference.
    """

    category: str = "lists"
    unique_answer: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {self.category!r}.")

    def split_of_instance(self, instance: Instance) -> Optional[str]:
        """'train', 'test' or None (see :func:`split_of_v2`); use it to filter ``_sample``."""
        return split_of_v2(self.name, instance.prompt, instance.answer, self.unique_answer)


# ---------------------------------------------------------------------------- helpers


def count_tokens(text: str) -> int:
    """Tokens of a v2 task text in the task tokenizer: one per word, except that a number has
    one token per digit."""
    return sum(len(w) if w.isdigit() else 1 for w in text.split())


def number_tokens(value: int) -> int:
    """Tokens of a non-negative integer in the task tokenizer (one per digit)."""
    return len(str(int(value)))


def digits_lsb(value: int, width: int) -> list[int]:
    """The ``width`` least significant decimal digits of ``value``, least significant first."""
    s = str(int(value)).rjust(width, "0")
    return [int(c) for c in reversed(s[-width:])]


def column_addition(operands: Sequence[int]) -> tuple[list[str], int]:
    """Column-by-column addition of non-negative integers, least significant column first.

    Returns ``(steps, total)``: one step per column, ``"d1 + d2 + ... + c = t"`` with the
    column's digits (0 for a number with fewer digits), the carry in ``c`` and the column total
    ``t`` (its last digit is the sum's digit, the rest the next carry).
    """
    width = max(len(str(int(v))) for v in operands)
    cols = [digits_lsb(v, width) for v in operands]
    carry = 0
    steps: list[str] = []
    for i in range(width):
        ds = [c[i] for c in cols]
        t = sum(ds) + carry
        steps.append(" + ".join([*map(str, ds), str(carry)]) + f" = {t}")
        carry = t // 10
    return steps, int(sum(int(v) for v in operands))


def column_addition_max_tokens(n_operands: int, width: int) -> int:
    """Upper bound on the tokens of :func:`column_addition`'s steps joined by ``' , '``.

    A column is ``n_operands + 1`` one-digit terms, ``n_operands`` '+', '=' and a total of at
    most two digits (``9 n + (n - 1) <= 89`` for ``n <= 9``)."""
    return width * (2 * n_operands + 4) + (width - 1)
