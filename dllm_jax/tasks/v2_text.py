"""Text writing with long answers (tasks v2): record formatting and multi-sentence writing.

record ('low')::

    record: age = 34 , pet = dog , name = Alice , score = 512 , trait = calm ; pet = cat , ...
      ->  { name : Alice , age : 34 , pet : dog , trait : calm , score : 512 } , { name : ...

  A list of records, each a ``key = value`` list in random key order (records separated by
  ``;``), rewritten as JSON-like objects with the keys in the fixed schema order ``name age pet
  trait score``. 'low' dependency: every answer token is either fixed by the template or a
  copy of the prompt value found by its key, independently of the other answer tokens.

sentences ('high')::

    sentences: a big cat dog fox my near sees the / a boy cow helps king my the under / ...
      ->  the big cat near my fox sees a dog / my boy helps the cow under a king / ...

  One bag of words per sentence (alphabetical, bags separated by ``/``); the answer writes,
  for each bag in order, any grammatical sentence of the words-to-sentence grammar
  (:mod:`dllm_jax.tasks.text`) that uses each of its words once. 'high' dependency: each bag
  has several valid orders (subject and object swap, adjectives and prepositional phrases
  move) whose tokens must agree.

Scoring: record is valid == exact; partial credit is the fraction of agreeing word positions.
sentences is valid iff there are as many sentences as bags and every one is valid for its bag;
partial credit is the fraction of valid sentences (over the larger of both counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Instance, Score, positional_partial, words
from .lists import NAMES
from .text import ADJS, NOUNS, WORDS_TO_SENTENCE, is_sentence
from .v2_base import RECORD_KEYS, TaskV2

SENTENCE_SEP = "/"


@dataclass(frozen=True)
class RecordTask(TaskV2):
    """key = value records -> JSON-like objects in schema order ('low', see module).

    Values: name (a name), age (10..99), pet (a noun), trait (an adjective), score (100..999)."""

    @property
    def _defaults(self) -> dict[str, Any]:
        return {"records": 4, "min_records": 4}

    @staticmethod
    def _check(records: int, min_records: int) -> None:
        if not 1 <= min_records <= records <= 10:
            raise ValueError(f"record: need 1 <= min_records <= records <= 10, got {min_records}, {records}.")

    # value tokens: name 1, age 2, pet 1, trait 1, score 3
    _VALUE_TOKENS = 8

    def max_answer_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        f = len(RECORD_KEYS)
        per = 2 + 2 * f + self._VALUE_TOKENS + (f - 1)  # braces, 'key :', values, commas
        return k["records"] * per + (k["records"] - 1)

    def max_prompt_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        f = len(RECORD_KEYS)
        per = 2 * f + self._VALUE_TOKENS + (f - 1)  # 'key =', values, commas
        return 1 + k["records"] * per + (k["records"] - 1)

    def _sample(self, rng: np.random.Generator, **k: Any) -> Instance:
        self._check(**k)
        n = int(rng.integers(k["min_records"], k["records"] + 1))
        records = []
        for _ in range(n):
            records.append({
                "name": NAMES[int(rng.integers(len(NAMES)))],
                "age": str(int(rng.integers(10, 100))),
                "pet": NOUNS[int(rng.integers(len(NOUNS)))],
                "trait": ADJS[int(rng.integers(len(ADJS)))],
                "score": str(int(rng.integers(100, 1000))),
            })
        shown = []
        for r in records:
            keys = [RECORD_KEYS[int(i)] for i in rng.permutation(len(RECORD_KEYS))]
            shown.append(" , ".join(f"{key} = {r[key]}" for key in keys))
        prompt = f"{self.keyword} " + " ; ".join(shown)
        answer = " , ".join("{ " + " , ".join(f"{key} : {r[key]}" for key in RECORD_KEYS) + " }" for r in records)
        return Instance(self.name, prompt, answer, {"records": tuple(tuple(r[key] for key in RECORD_KEYS) for r in records)})

    def score(self, instance: Instance, output: str) -> Score:
        out, ref = words(output), words(instance.answer)
        if out == ref:
            return Score(True, True, 1.0)
        return Score(False, False, positional_partial(out, ref))


def split_sentences(toks: list[str]) -> list[list[str]]:
    """Word lists between ``/`` separators (an empty text gives one empty sentence)."""
    out: list[list[str]] = [[]]
    for t in toks:
        if t == SENTENCE_SEP:
            out.append([])
        else:
            out[-1].append(t)
    return out


@dataclass(frozen=True)
class SentencesTask(TaskV2):
    """Several bags of words -> one grammatical sentence per bag ('high', see module).

    Each sentence is drawn as in words_to_sentence with the knobs ``max_adjectives``,
    ``min_pps``, ``max_pps`` and ``transitive`` (True, False or None for a coin flip); the
    default is 8 transitive sentences of 8-11 words (one prepositional phrase, at most one
    adjective per noun phrase)."""

    @property
    def _defaults(self) -> dict[str, Any]:
        return {"sentences": 8, "min_sentences": 8, "max_adjectives": 1, "min_pps": 1, "max_pps": 1,
                "transitive": True}

    @staticmethod
    def _v1_knobs(k: dict[str, Any]) -> dict[str, Any]:
        return {"level": "hard", "max_adjectives": k["max_adjectives"], "min_pps": k["min_pps"],
                "max_pps": k["max_pps"], "transitive": k["transitive"]}

    def _check(self, k: dict[str, Any]) -> int:
        if not 1 <= k["min_sentences"] <= k["sentences"] <= 16:
            raise ValueError(f"sentences: need 1 <= min_sentences <= sentences <= 16, got {k['min_sentences']}, {k['sentences']}.")
        # the v1 task validates the sentence knobs and bounds one sentence (transitive=None
        # counts an object)
        return WORDS_TO_SENTENCE.max_answer_tokens(**self._v1_knobs(k))

    def max_answer_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        one = self._check(k)
        return k["sentences"] * one + (k["sentences"] - 1)

    def max_prompt_tokens(self, **difficulty: Any) -> int:
        return 1 + self.max_answer_tokens(**difficulty)

    def _sample(self, rng: np.random.Generator, **k: Any) -> Instance:
        self._check(k)
        n = int(rng.integers(k["min_sentences"], k["sentences"] + 1))
        v1 = WORDS_TO_SENTENCE.difficulty(**self._v1_knobs(k))
        parts = [WORDS_TO_SENTENCE._sample(rng, **v1) for _ in range(n)]
        bags = tuple(tuple(p.meta["bag"]) for p in parts)
        prompt = f"{self.keyword} " + f" {SENTENCE_SEP} ".join(" ".join(b) for b in bags)
        answer = f" {SENTENCE_SEP} ".join(p.answer for p in parts)
        return Instance(self.name, prompt, answer, {"bags": bags})

    def score(self, instance: Instance, output: str) -> Score:
        out = words(output)
        exact = out == words(instance.answer)
        bags = instance.meta["bags"]
        sents = split_sentences(out)
        good = sum(1 for s, b in zip(sents, bags) if sorted(s) == sorted(b) and is_sentence(s))
        valid = len(sents) == len(bags) and good == len(bags)
        return Score(valid, exact, 1.0 if valid else good / max(len(bags), len(sents)))


RECORD = RecordTask(
    name="record", dependency="low", category="text",
    description="'record: age = 34 , name = Alice , ... ; ...' -> '{ name : Alice , age : 34 , ... } , { ... }' (schema key order)",
)
SENTENCES = SentencesTask(
    name="sentences", dependency="high", category="text", unique_answer=False,
    description="'sentences: a big cat dog sees the / ...' (one sorted bag per sentence) -> one grammatical sentence per bag",
)

TEXT_TASKS_V2: dict[str, TaskV2] = {t.name: t for t in (RECORD, SENTENCES)}
