"""Words to sentence under a tiny context-free grammar (several valid word orders).

Prompt: the bag of words of a sentence in alphabetical order; answer: any grammatical sentence
that uses every word of the bag exactly once (no punctuation)::

    words_to_sentence: a big cat dog sees the   ->   the big cat sees a dog
                                                     (also: a dog sees the big cat, ...)

Grammar (all nouns singular, verbs in the third person; categories are disjoint)::

    S  -> NP VP
    NP -> Det Adj* N PP*
    VP -> Vi PP*  |  Vt NP PP*
    PP -> P NP

Subject and object can swap, determiners and adjectives can move between noun phrases and
prepositional phrases can attach to either noun phrase or to the verb phrase, so most bags
have several valid orders: 'high' dependency.

Difficulty: ``level`` in 'easy' (``Det Adj? N Vi``: 3-4 words), 'medium' (``Det Adj? N Vt Det
Adj? N``: 5-7 words), 'hard' (up to two adjectives per noun phrase, 1-2 prepositional phrases,
transitive or not: up to 19 words); ``max_adjectives``, ``min_pps``, ``max_pps`` and
``transitive`` (True, False, or None for a coin flip) override the level's values.

Scoring: valid iff the output uses exactly the multiset of the bag and parses as S. Partial
credit: ``(overlap + grammatical) / 2`` where ``overlap`` is the multiset overlap with the bag
over the longer of the two and ``grammatical`` is 1 if the output parses as S (else 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .base import Instance, Score, Task, multiset_overlap, words

DETS: tuple[str, ...] = ("the", "a", "every", "some", "this", "my")
ADJS: tuple[str, ...] = ("big", "small", "red", "tall", "green", "young", "dark", "happy", "quiet", "lazy", "brave", "calm")
NOUNS: tuple[str, ...] = ("cat", "dog", "bird", "man", "boy", "girl", "fox", "cow", "king", "horse", "duck", "pig")
VERBS_INTR: tuple[str, ...] = ("sleeps", "runs", "sits", "waits", "smiles", "jumps")
VERBS_TR: tuple[str, ...] = ("sees", "likes", "follows", "finds", "helps", "chases")
PREPS: tuple[str, ...] = ("near", "behind", "with", "under", "beside")
GRAMMAR_WORDS: tuple[str, ...] = DETS + ADJS + NOUNS + VERBS_INTR + VERBS_TR + PREPS

LEVELS: dict[str, dict[str, Any]] = {
    "easy": {"max_adjectives": 1, "min_pps": 0, "max_pps": 0, "transitive": False},
    "medium": {"max_adjectives": 1, "min_pps": 0, "max_pps": 0, "transitive": True},
    "hard": {"max_adjectives": 2, "min_pps": 1, "max_pps": 2, "transitive": None},
}

_DET, _ADJ, _N, _VI, _VT, _P = map(frozenset, (DETS, ADJS, NOUNS, VERBS_INTR, VERBS_TR, PREPS))


class _Parser:
    """Recogniser for the grammar: for each symbol and start index, the set of end indices."""

    def __init__(self, toks: Sequence[str]):
        self.t = list(toks)
        self.n = len(self.t)
        self.memo: dict[tuple[str, int], frozenset[int]] = {}

    def _is(self, i: int, cat: frozenset) -> bool:
        return i < self.n and self.t[i] in cat

    def _pp_closure(self, ends: set[int]) -> frozenset[int]:
        """Ends reachable from ``ends`` by appending zero or more PPs."""
        todo, done = list(ends), set(ends)
        while todo:
            e = todo.pop()
            for e2 in self.pp(e):
                if e2 not in done:
                    done.add(e2)
                    todo.append(e2)
        return frozenset(done)

    def np_(self, i: int) -> frozenset[int]:
        key = ("NP", i)
        if key not in self.memo:
            self.memo[key] = frozenset()  # guards recursion (never hit: PP consumes tokens)
            res: set[int] = set()
            if self._is(i, _DET):
                j = i + 1
                while self._is(j, _ADJ):
                    j += 1
                if self._is(j, _N):
                    res = set(self._pp_closure({j + 1}))
            self.memo[key] = frozenset(res)
        return self.memo[key]

    def pp(self, i: int) -> frozenset[int]:
        key = ("PP", i)
        if key not in self.memo:
            self.memo[key] = self.np_(i + 1) if self._is(i, _P) else frozenset()
        return self.memo[key]

    def vp(self, i: int) -> frozenset[int]:
        if self._is(i, _VI):
            return self._pp_closure({i + 1})
        if self._is(i, _VT):
            return self._pp_closure(set(self.np_(i + 1)))
        return frozenset()

    def sentence(self) -> bool:
        return any(self.n in self.vp(j) for j in self.np_(0))


def is_sentence(toks: Sequence[str]) -> bool:
    """True iff ``toks`` parses as S under the grammar of this module."""
    return _Parser(toks).sentence()


@dataclass(frozen=True)
class WordsToSentenceTask(Task):
    """Bag of words -> any grammatical sentence using each word once."""

    @property
    def _defaults(self) -> dict[str, Any]:
        return {"level": "medium", "max_adjectives": None, "min_pps": None, "max_pps": None, "transitive": None}

    @staticmethod
    def _resolve(k: dict[str, Any]) -> dict[str, Any]:
        level = k["level"]
        if level not in LEVELS:
            raise ValueError(f"words_to_sentence: level must be one of {', '.join(LEVELS)}, got {level!r}.")
        r = dict(LEVELS[level])
        for name in ("max_adjectives", "min_pps", "max_pps"):
            if k[name] is not None:
                r[name] = int(k[name])
        if k["transitive"] is not None:
            r["transitive"] = bool(k["transitive"])
        if not (0 <= r["max_adjectives"] <= 3 and 0 <= r["min_pps"] <= r["max_pps"] <= 3):
            raise ValueError(
                "words_to_sentence: need 0 <= max_adjectives <= 3 and 0 <= min_pps <= max_pps <= 3, "
                f"got {r['max_adjectives']}, {r['min_pps']}, {r['max_pps']}."
            )
        return r

    def max_answer_tokens(self, **difficulty: Any) -> int:
        r = self._resolve(self.difficulty(**difficulty))
        np_len = 2 + r["max_adjectives"]
        obj = 0 if r["transitive"] is False else np_len
        return np_len + 1 + obj + r["max_pps"] * (1 + np_len)

    def max_prompt_tokens(self, **difficulty: Any) -> int:
        return 1 + self.max_answer_tokens(**difficulty)

    @staticmethod
    def _noun_phrase(rng: np.random.Generator, max_adj: int) -> list[str]:
        n_adj = int(rng.integers(0, max_adj + 1))
        adjs = [ADJS[i] for i in rng.choice(len(ADJS), size=n_adj, replace=False)]
        return [DETS[int(rng.integers(len(DETS)))], *adjs, NOUNS[int(rng.integers(len(NOUNS)))]]

    def _sample(self, rng: np.random.Generator, **k: Any) -> Instance:
        r = self._resolve(k)
        transitive = r["transitive"] if r["transitive"] is not None else bool(rng.integers(2))
        subj = self._noun_phrase(rng, r["max_adjectives"])
        obj = self._noun_phrase(rng, r["max_adjectives"]) if transitive else []
        verb = (VERBS_TR if transitive else VERBS_INTR)[int(rng.integers(6))]
        sites: dict[str, list[str]] = {"subj": [], "obj": [], "vp": []}
        choices = ["subj", "obj", "vp"] if transitive else ["subj", "vp"]
        for _ in range(int(rng.integers(r["min_pps"], r["max_pps"] + 1))):
            site = choices[int(rng.integers(len(choices)))]
            sites[site] += [PREPS[int(rng.integers(len(PREPS)))], *self._noun_phrase(rng, r["max_adjectives"])]
        sentence = subj + sites["subj"] + [verb] + obj + sites["obj"] + sites["vp"]
        bag = tuple(sorted(sentence))
        prompt = f"{self.keyword} " + " ".join(bag)
        return Instance(self.name, prompt, " ".join(sentence), {"bag": bag})

    def score(self, instance: Instance, output: str) -> Score:
        out = words(output)
        bag = list(instance.meta["bag"])
        overlap = multiset_overlap(out, bag)
        grammatical = is_sentence(out)
        valid = grammatical and sorted(out) == sorted(bag)
        exact = out == words(instance.answer)
        return Score(valid, exact, 1.0 if valid else (overlap + float(grammatical)) / 2)


WORDS_TO_SENTENCE = WordsToSentenceTask(
    name="words_to_sentence",
    dependency="high",
    description="'words_to_sentence: a big cat dog sees the' (sorted bag) -> any grammatical sentence using each word once",
)

__all__ = ["WORDS_TO_SENTENCE", "WordsToSentenceTask", "is_sentence", "GRAMMAR_WORDS", "LEVELS"]
