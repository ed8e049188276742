"""4x4 grid puzzles: latin square completion (several answers) and 4x4 sudoku (unique answer).

Grids are written row by row, cells separated by spaces, rows by ``/``, blanks as ``_``::

    latin: 1 2 _ 4 / _ 4 1 _ / 4 _ _ 1 / 2 1 _ _   ->   1 2 3 4 / 3 4 1 2 / 4 3 2 1 / 2 1 4 3

The answer is the full grid: 16 cells + 3 separators = 19 tokens (the prompt has 20).

* latin ('high'): any 4x4 latin square (each row and column a permutation of 1..4) that keeps
  the given cells is correct. Blanks are chosen at random, so some puzzles have one completion
  and others several (``meta['n_solutions']``; knobs ``min_solutions`` / ``max_solutions``
  select them).
* sudoku ('medium'): latin square plus the four 2x2 boxes; puzzles are generated with a unique
  solution (checked against the list of all 288 4x4 sudoku grids), so exact == valid.

Partial credit: the largest fraction of the 19 answer positions (cells and separators) that
agree with some valid completion, over the longer of the output and 19 tokens.

The complete lists of 4x4 latin squares (576) and sudoku grids (288) are enumerated once, so
counting the completions of a puzzle is one vectorised comparison.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np

from .base import Instance, Score, Task, words

SIZE = 4
N_CELLS = SIZE * SIZE
ANSWER_TOKENS = N_CELLS + SIZE - 1  # 16 cells and 3 '/'
BLANK = "_"
ROW_SEP = "/"
_CELL_TOKEN_INDEX = tuple(k + k // SIZE for k in range(N_CELLS))  # cell k -> token index


@lru_cache(maxsize=None)
def all_grids(boxes: bool) -> np.ndarray:
    """Every 4x4 latin square over 1..4 (with the 2x2 box rule when ``boxes``): int8 [G, 16]."""
    perms = list(itertools.permutations(range(1, SIZE + 1)))
    grids: list[list[int]] = []

    def extend(rows: list[tuple[int, ...]]) -> None:
        if len(rows) == SIZE:
            grids.append([v for row in rows for v in row])
            return
        r = len(rows)
        for p in perms:
            if any(p[c] == row[c] for row in rows for c in range(SIZE)):
                continue
            if boxes and r % 2 == 1 and any(set(p[c:c + 2]) & set(rows[r - 1][c:c + 2]) for c in (0, 2)):
                continue
            extend(rows + [p])

    extend([])
    return np.array(grids, dtype=np.int8)


def completions(cells: np.ndarray, boxes: bool) -> np.ndarray:
    """All grids that keep the given cells (``cells`` [16], 0 = blank): int8 [K, 16]."""
    grids = all_grids(boxes)
    given = cells > 0
    return grids[np.all(grids[:, given] == cells[given], axis=1)]


def format_grid(cells: np.ndarray) -> str:
    """Cells [16] (0 = blank) as 'a b c d / ...'."""
    toks = [BLANK if v == 0 else str(int(v)) for v in cells]
    return f" {ROW_SEP} ".join(" ".join(toks[r * SIZE:(r + 1) * SIZE]) for r in range(SIZE))


def parse_grid(output: str) -> Optional[np.ndarray]:
    """Cells [16] of a well-formed full grid (values 1..4, '/' between rows), else None."""
    toks = words(output)
    if len(toks) != ANSWER_TOKENS:
        return None
    cells = []
    for i, t in enumerate(toks):
        if i % (SIZE + 1) == SIZE:
            if t != ROW_SEP:
                return None
        elif t in ("1", "2", "3", "4"):
            cells.append(int(t))
        else:
            return None
    return np.array(cells, dtype=np.int8)


def is_valid_grid(cells: np.ndarray, boxes: bool) -> bool:
    """Every row and column (and 2x2 box when ``boxes``) holds 1..4 once."""
    g = np.asarray(cells).reshape(SIZE, SIZE)
    groups = [g[r] for r in range(SIZE)] + [g[:, c] for c in range(SIZE)]
    if boxes:
        groups += [g[r:r + 2, c:c + 2].ravel() for r in (0, 2) for c in (0, 2)]
    return all(sorted(int(v) for v in grp) == [1, 2, 3, 4] for grp in groups)


@dataclass(frozen=True)
class GridTask(Task):
    """Latin square (``boxes=False``) or sudoku (``boxes=True``) completion."""

    boxes: bool = False

    @property
    def _defaults(self) -> dict[str, Any]:
        if self.boxes:
            return {"blanks": 12}
        return {"blanks": 10, "min_solutions": 1, "max_solutions": None}

    def max_answer_tokens(self, **difficulty: Any) -> int:
        self.difficulty(**difficulty)
        return ANSWER_TOKENS

    def max_prompt_tokens(self, **difficulty: Any) -> int:
        self.difficulty(**difficulty)
        return 1 + ANSWER_TOKENS

    def _sample(self, rng: np.random.Generator, **k: Any) -> Instance:
        blanks = int(k["blanks"])
        max_blanks = 12 if self.boxes else N_CELLS
        if not 1 <= blanks <= max_blanks:
            raise ValueError(f"{self.name}: blanks must be in 1..{max_blanks}, got {blanks}.")
        lo = 1 if self.boxes else int(k["min_solutions"])
        hi = 1 if self.boxes else k["max_solutions"]
        if hi is not None and hi < lo:
            raise ValueError(f"{self.name}: max_solutions {hi} < min_solutions {lo}.")
        grids = all_grids(self.boxes)
        for _ in range(10000):
            solution = grids[int(rng.integers(len(grids)))]
            cells = solution.copy()
            cells[rng.choice(N_CELLS, size=blanks, replace=False)] = 0
            n_sol = len(completions(cells, self.boxes))
            if n_sol >= lo and (hi is None or n_sol <= hi):
                prompt = f"{self.keyword} {format_grid(cells)}"
                meta = {"cells": tuple(int(v) for v in cells), "n_solutions": n_sol}
                return Instance(self.name, prompt, format_grid(solution), meta)
        raise ValueError(
            f"{self.name}: no puzzle with {blanks} blanks and {lo}..{hi} solutions found in 10000 draws; "
            "change blanks or the solution bounds."
        )

    def score(self, instance: Instance, output: str) -> Score:
        exact = words(output) == words(instance.answer)
        cells = np.array(instance.meta["cells"], dtype=np.int8)
        grid = parse_grid(output)
        given = cells > 0
        if grid is not None and np.array_equal(grid[given], cells[given]) and is_valid_grid(grid, self.boxes):
            return Score(True, exact, 1.0)
        toks = words(output)
        got = np.array(
            [int(toks[i]) if i < len(toks) and toks[i] in ("1", "2", "3", "4") else -1 for i in _CELL_TOKEN_INDEX],
            dtype=np.int8,
        )
        seps = sum(1 for i in range(SIZE, ANSWER_TOKENS, SIZE + 1) if i < len(toks) and toks[i] == ROW_SEP)
        sols = completions(cells, self.boxes)
        best = int((sols == got[None, :]).sum(axis=1).max()) if len(sols) else 0
        return Score(False, exact, (best + seps) / max(ANSWER_TOKENS, len(toks)))


LATIN = GridTask(
    name="latin",
    dependency="high",
    description="'latin: 1 2 _ 4 / ...' (4 rows, '_' blank) -> any full 4x4 latin square keeping the given cells",
    boxes=False,
)
SUDOKU = GridTask(
    name="sudoku",
    dependency="medium",
    description="'sudoku: 1 _ _ 4 / ...' -> the unique full 4x4 sudoku (2x2 boxes) keeping the given cells",
    boxes=True,
)
