"""Shared pieces of the dependency tasks: instances, scores, the Task base class and splits.

Every task family is a frozen dataclass deriving from :class:`Task`. A family implements

* ``_defaults`` (its difficulty knobs and their default values),
* ``_sample(rng, **difficulty) -> Instance`` (one random instance),
* ``score(instance, output) -> Score`` (an exact scorer),
* ``max_answer_tokens(**difficulty)`` and ``max_prompt_tokens(**difficulty)`` (bounds, in
  tokens of the task tokenizer of :mod:`dllm_jax.tasks.vocab`).

:meth:`Task.generate` turns ``_sample`` into a deterministic, de-duplicated list of instances
of one split. The split of an instance is a pure function of ``(task name, prompt)`` (a hash),
so the train and test splits are disjoint by construction, whatever the seeds.

Outputs are compared token by token after whitespace normalisation: ``output.split()``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Any, Mapping, Sequence, Union

import numpy as np

DEPENDENCY_LEVELS = ("low", "medium", "high")
SPLITS = ("train", "test")
#: Percentage of the prompt space that belongs to the test split.
TEST_PERCENT = 20

RngOrSeed = Union[int, np.random.Generator]


@dataclass(frozen=True)
class Instance:
    """One task instance.

    Attributes:
        task: the task name.
        prompt: the prompt text (tokens separated by single spaces).
        answer: one reference answer (tokens separated by single spaces).
        meta: whatever the scorer needs (plain Python values; tuples for sequences).
    """

    task: str
    prompt: str
    answer: str
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Score:
    """The score of one output.

    Attributes:
        valid: the output is a correct answer (any correct answer for multi-answer tasks).
        exact: the output equals the reference answer (after whitespace normalisation).
        partial: fraction of the answer that is right, in [0, 1]; defined per task, and 1.0
            whenever ``valid`` is True.
    """

    valid: bool
    exact: bool
    partial: float


def split_of(task_name: str, prompt: str) -> str:
    """'train' or 'test': a hash of ``(task_name, prompt)`` decides (TEST_PERCENT % test)."""
    digest = hashlib.sha256(f"{task_name}\n{prompt}".encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def make_rng(rng_or_seed: RngOrSeed) -> np.random.Generator:
    """A numpy Generator from an int seed (or the Generator itself)."""
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (int, np.integer)) and not isinstance(rng_or_seed, bool):
        return np.random.default_rng(int(rng_or_seed))
    raise TypeError(f"rng_or_seed must be an int seed or a numpy Generator, got {type(rng_or_seed).__name__}.")


def words(text: str) -> list[str]:
    """Whitespace-normalised tokens of a text."""
    return text.split()


def positional_partial(out: Sequence[str], ref: Sequence[str]) -> float:
    """Fraction of positions where ``out`` and ``ref`` agree, over the longer of the two."""
    n = max(len(out), len(ref))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(out, ref)) / n


def multiset_overlap(out: Sequence[str], ref: Sequence[str]) -> float:
    """Size of the multiset intersection of ``out`` and ``ref`` over the longer of the two."""
    n = max(len(out), len(ref))
    if n == 0:
        return 1.0
    counts: dict[str, int] = {}
    for t in ref:
        counts[t] = counts.get(t, 0) + 1
    hit = 0
    for t in out:
        if counts.get(t, 0) > 0:
            counts[t] -= 1
            hit += 1
    return hit / n


@dataclass(frozen=True)
class Task:
    """A task family: a seeded generator and an exact scorer.

    Attributes:
        name: registry name (also the prompt keyword, followed by ':').
        dependency: 'low' | 'medium' | 'high': how strongly the answer tokens depend on each
            other (high: several valid answers whose tokens must agree, so the per-position
            marginals mix and parallel decoding breaks them).
        description: one line on the prompt and answer formats.
    """

    name: str
    dependency: str
    description: str = ""

    # ------------------------------------------------------------------ to implement

    @property
    def _defaults(self) -> dict[str, Any]:
        """Difficulty knobs and their default values."""
        raise NotImplementedError

    def _sample(self, rng: np.random.Generator, **difficulty: Any) -> Instance:
        """One random instance (not yet filtered by split)."""
        raise NotImplementedError

    def score(self, instance: Instance, output: str) -> Score:
        """Score a decoded output against ``instance``."""
        raise NotImplementedError

    def max_answer_tokens(self, **difficulty: Any) -> int:
        """Upper bound on the number of tokens of any valid answer at this difficulty."""
        raise NotImplementedError

    def max_prompt_tokens(self, **difficulty: Any) -> int:
        """Upper bound on the number of tokens of any prompt at this difficulty."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    @property
    def keyword(self) -> str:
        """The first prompt token, e.g. 'sort:'."""
        return f"{self.name}:"

    def difficulty(self, **overrides: Any) -> dict[str, Any]:
        """The default difficulty knobs with ``overrides`` applied.

        Raises:
            ValueError: an unknown knob.
        """
        knobs = dict(self._defaults)
        unknown = sorted(set(overrides) - set(knobs))
        if unknown:
            raise ValueError(
                f"Task {self.name!r} has no difficulty knob {', '.join(map(repr, unknown))}; "
                f"valid knobs: {', '.join(sorted(knobs))}."
            )
        knobs.update(overrides)
        return knobs

    def split_of_instance(self, instance: Instance) -> Optional[str]:
        """'train' or 'test' (v1 tasks: :func:`split_of` of the prompt); subclasses may split
        otherwise and answer None for an instance in neither split."""
        return split_of(self.name, instance.prompt)

    def generate(self, rng_or_seed: RngOrSeed, n: int, split: str = "train", **difficulty: Any) -> list[Instance]:
        """``n`` distinct instances of ``split``, deterministic for an int seed.

        Args:
            rng_or_seed: an int seed or a numpy Generator (which is advanced).
            n: number of instances.
            split: 'train' or 'test'; an instance belongs to the split chosen by
                :func:`split_of` of its prompt, so the two splits never share a prompt.
            **difficulty: knobs of this task (see ``difficulty()``).
        Raises:
            ValueError: bad split / knob, or the prompt space of this split is too small for
                ``n`` distinct instances.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}.")
        knobs = self.difficulty(**difficulty)
        rng = make_rng(rng_or_seed)
        out: list[Instance] = []
        seen: set[str] = set()
        budget = 200 * n + 2000
        tries = 0
        while len(out) < n:
            if tries >= budget:
                raise ValueError(
                    f"Task {self.name!r}: found only {len(out)} distinct {split} instances of {n} requested "
                    f"after {tries} draws at difficulty {knobs}; ask for fewer or raise the difficulty."
                )
            tries += 1
            inst = self._sample(rng, **knobs)
            if inst.prompt in seen or self.split_of_instance(inst) != split:
                continue
            seen.add(inst.prompt)
            out.append(inst)
        return out

    def _check_level(self) -> None:
        if self.dependency not in DEPENDENCY_LEVELS:
            raise ValueError(f"dependency must be one of {DEPENDENCY_LEVELS}, got {self.dependency!r}.")

    def __post_init__(self) -> None:
        self._check_level()
