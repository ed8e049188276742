"""List operations on short lists of names or numbers ("waiting line" tasks).

Prompt and answer formats (positions are 1-based; lists hold distinct items):

==================  ======================================  ==========================
task                prompt                                  answer
==================  ======================================  ==========================
copy                ``copy: Eve Bob Zoe``                   ``Eve Bob Zoe``
reverse             ``reverse: Eve Bob Zoe``                ``Zoe Bob Eve``
sort                ``sort: 9 41 7``                        ``7 9 41`` (names: A-Z)
insert              ``insert: Ann @ 2 | Eve Bob Zoe``       ``Eve Ann Bob Zoe``
insert_random       ``insert_random: Ann | Eve Bob Zoe``    Ann at any of the 4 places
remove              ``remove: @ 2 | Eve Bob Zoe``           ``Eve Zoe``
remove_random       ``remove_random: Eve Bob Zoe``          any one item removed
replace             ``replace: Ann @ 2 | Eve Bob Zoe``      ``Eve Ann Zoe``
replace_random      ``replace_random: Ann | Eve Bob Zoe``   any one item replaced by Ann
shuffle             ``shuffle: Eve Bob Zoe``                any other order of the items
==================  ======================================  ==========================

Validity of the multi-answer tasks, precisely (``L`` the input list, ``x`` the new item,
which is never in ``L``):

* insert_random: the output equals ``L[:i] + [x] + L[i:]`` for some ``0 <= i <= len(L)``;
* remove_random: the output equals ``L[:i] + L[i+1:]`` for some ``0 <= i < len(L)`` (exactly
  one item deleted, the others kept in their order);
* replace_random: the output equals ``L`` with exactly one item ``L[i]`` replaced by ``x``;
* shuffle: the output is a permutation of the multiset of ``L`` and differs from ``L`` as a
  sequence.

Partial credit: the largest fraction of positions that agree with some valid answer (over the
longer of the output and that answer), so a valid output scores 1.0.

Difficulty knobs: ``min_len`` / ``max_len`` (list length, 2..8), ``items`` ('names' or
'numbers') and ``max_value`` (numbers are drawn from 0..max_value; each number is one token per
digit). Dependency tags: copy, reverse and the *_index edits are 'low' (every answer token is
fixed by the prompt), sort is 'medium' (single answer, but each position depends on the whole
list), the *_random edits and shuffle are 'high' (several answers whose tokens must agree).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np

from .base import Instance, Score, Task, positional_partial, words

#: Names used as list items: single tokens, distinct initials, so A-Z order is unambiguous.
NAMES: tuple[str, ...] = (
    "Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Kevin", "Laura",
    "Mallory", "Nick", "Olivia", "Peggy", "Quinn", "Rupert", "Sybil", "Trent", "Uma", "Victor", "Walter",
    "Zoe",
)

LIST_OPS: dict[str, str] = {
    "copy": "low",
    "reverse": "low",
    "sort": "medium",
    "insert": "low",
    "insert_random": "high",
    "remove": "low",
    "remove_random": "high",
    "replace": "low",
    "replace_random": "high",
    "shuffle": "high",
}

MAX_LIST_LEN = 8
_NEEDS_NEW = ("insert", "insert_random", "replace", "replace_random")
_NEEDS_POS = ("insert", "remove", "replace")


@lru_cache(maxsize=None)
def _permutations(n: int) -> np.ndarray:
    """All permutations of range(n) as an int array [n!, n] (identity first)."""
    return np.array(list(itertools.permutations(range(n))), dtype=np.int64).reshape(-1, n)


def _valid_answers(op: str, items: tuple[str, ...], new: Optional[str], pos: Optional[int]) -> list[tuple[str, ...]]:
    """Every valid answer of a non-shuffle list task (``pos`` 1-based)."""
    L = list(items)
    n = len(L)
    if op == "copy":
        return [tuple(L)]
    if op == "reverse":
        return [tuple(reversed(L))]
    if op == "sort":
        if all(t.isdigit() for t in L):
            return [tuple(sorted(L, key=int))]
        return [tuple(sorted(L))]
    if op == "insert":
        return [tuple(L[: pos - 1] + [new] + L[pos - 1:])]
    if op == "insert_random":
        return [tuple(L[:i] + [new] + L[i:]) for i in range(n + 1)]
    if op == "remove":
        return [tuple(L[: pos - 1] + L[pos:])]
    if op == "remove_random":
        return [tuple(L[:i] + L[i + 1:]) for i in range(n)]
    if op == "replace":
        return [tuple(L[: pos - 1] + [new] + L[pos:])]
    if op == "replace_random":
        return [tuple(L[:i] + [new] + L[i + 1:]) for i in range(n)]
    raise ValueError(f"unknown list op {op!r}")


@dataclass(frozen=True)
class ListTask(Task):
    """One list operation (see the module docstring for the formats)."""

    op: str = "copy"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.op not in LIST_OPS:
            raise ValueError(f"unknown list op {self.op!r}; valid: {', '.join(LIST_OPS)}.")

    @property
    def _defaults(self) -> dict[str, Any]:
        return {"min_len": 3, "max_len": 6, "items": "names", "max_value": 99}

    # ------------------------------------------------------------------ knobs

    def _check(self, min_len: int, max_len: int, items: str, max_value: int) -> None:
        if items not in ("names", "numbers"):
            raise ValueError(f"items must be 'names' or 'numbers', got {items!r}.")
        lo = 3 if self.op == "shuffle" else 2
        if not (lo <= min_len <= max_len <= MAX_LIST_LEN):
            raise ValueError(f"{self.name}: need {lo} <= min_len <= max_len <= {MAX_LIST_LEN}, got {min_len}, {max_len}.")
        pool = len(NAMES) if items == "names" else max_value + 1
        if items == "numbers" and max_value < 1:
            raise ValueError(f"max_value must be >= 1, got {max_value}.")
        if pool < max_len + 1:
            raise ValueError(f"{self.name}: {pool} distinct items cannot fill lists of {max_len} plus a new item.")

    @staticmethod
    def _item_tokens(items: str, max_value: int) -> int:
        return 1 if items == "names" else len(str(max_value))

    def max_answer_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        n = k["max_len"] + (1 if self.op.startswith("insert") else 0)
        return n * self._item_tokens(k["items"], k["max_value"])

    def max_prompt_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        t = self._item_tokens(k["items"], k["max_value"])
        extra = 0
        if self.op in _NEEDS_NEW:
            extra += t + 1  # new item and '|'
        if self.op in _NEEDS_POS:
            extra += 1 + len(str(k["max_len"] + 1)) + (0 if self.op in _NEEDS_NEW else 1)  # '@ p' (+ '|')
        return 1 + k["max_len"] * t + extra

    # ------------------------------------------------------------------ generate

    def _sample(self, rng: np.random.Generator, **k: Any) -> Instance:
        self._check(**k)
        n = int(rng.integers(k["min_len"], k["max_len"] + 1))
        if k["items"] == "names":
            picks = [NAMES[i] for i in rng.choice(len(NAMES), size=n + 1, replace=False)]
        else:
            picks = [str(int(v)) for v in rng.choice(k["max_value"] + 1, size=n + 1, replace=False)]
        L, new = tuple(picks[:n]), picks[n]
        op = self.op
        pos: Optional[int] = None
        if op == "insert":
            pos = int(rng.integers(1, n + 2))
        elif op in ("remove", "replace"):
            pos = int(rng.integers(1, n + 1))
        if op not in _NEEDS_NEW:
            new = None
        body = " ".join(L)
        if op in ("insert", "replace"):
            prompt = f"{self.keyword} {new} @ {pos} | {body}"
        elif op in ("insert_random", "replace_random"):
            prompt = f"{self.keyword} {new} | {body}"
        elif op == "remove":
            prompt = f"{self.keyword} @ {pos} | {body}"
        else:
            prompt = f"{self.keyword} {body}"
        if op == "shuffle":
            perms = _permutations(n)
            perm = perms[int(rng.integers(1, len(perms)))]  # row 0 is the identity
            answer = tuple(L[i] for i in perm)
        else:
            cands = _valid_answers(op, L, new, pos)
            answer = cands[int(rng.integers(len(cands)))]
        return Instance(self.name, prompt, " ".join(answer), {"items": L, "new": new, "pos": pos})

    # ------------------------------------------------------------------ score

    def score(self, instance: Instance, output: str) -> Score:
        out = words(output)
        ref = words(instance.answer)
        exact = out == ref
        L = tuple(instance.meta["items"])
        if self.op == "shuffle":
            valid = sorted(out) == sorted(L) and tuple(out) != L
            if valid:
                return Score(True, exact, 1.0)
            n = len(L)
            perms = _permutations(n)[1:]  # every order but the input one
            index = {t: i for i, t in enumerate(L)}
            o = np.array([index.get(t, -1) for t in out[:n]] + [-2] * max(0, n - len(out)), dtype=np.int64)
            best = int((perms == o[None, :]).sum(axis=1).max())
            return Score(False, exact, best / max(n, len(out)))
        answers = _valid_answers(self.op, L, instance.meta["new"], instance.meta["pos"])
        valid = tuple(out) in answers
        partial = 1.0 if valid else max(positional_partial(out, a) for a in answers)
        return Score(valid, exact, partial)


_DESCRIPTIONS: dict[str, str] = {
    "copy": "'copy: Eve Bob Zoe' -> 'Eve Bob Zoe'",
    "reverse": "'reverse: Eve Bob Zoe' -> 'Zoe Bob Eve'",
    "sort": "'sort: 9 41 7' -> '7 9 41' (names in A-Z order)",
    "insert": "'insert: Ann @ 2 | Eve Bob Zoe' -> 'Eve Ann Bob Zoe' (1-based position)",
    "insert_random": "'insert_random: Ann | Eve Bob Zoe' -> Ann inserted at any place",
    "remove": "'remove: @ 2 | Eve Bob Zoe' -> 'Eve Zoe' (1-based position)",
    "remove_random": "'remove_random: Eve Bob Zoe' -> the list with any one item removed",
    "replace": "'replace: Ann @ 2 | Eve Bob Zoe' -> 'Eve Ann Zoe' (1-based position)",
    "replace_random": "'replace_random: Ann | Eve Bob Zoe' -> any one item replaced by Ann",
    "shuffle": "'shuffle: Eve Bob Zoe' -> any other order of the same items",
}

LIST_TASKS: dict[str, ListTask] = {
    op: ListTask(name=op, dependency=dep, description=_DESCRIPTIONS[op], op=op) for op, dep in LIST_OPS.items()
}
