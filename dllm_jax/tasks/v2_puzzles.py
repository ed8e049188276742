"""Puzzles with long answers (tasks v2): 9x9 latin squares and sudoku with few blanks, and
single-source shortest paths on a small weighted graph.

Grids are written row by row as in the v1 puzzles (cells separated by spaces, rows by ``/``,
blanks as ``_``); the answer is the full grid: 81 cells + 8 separators = 89 tokens::

    sudoku9: 5 3 _ 6 7 8 9 1 2 / 6 _ 2 1 9 5 3 4 8 / ...   ->   5 3 4 6 7 8 9 1 2 / ...

* latin9 ('high'): any 9x9 latin square (each row and column a permutation of 1..9) that
  keeps the given cells is correct. Every puzzle has at least two completions: its blanks
  always include an *intercalate* of the hidden square (a 2x2 sub-square ``a b / b a`` on two
  rows and two columns), which can be swapped, plus random other cells. The tokens of the
  swappable cells must agree with each other, so per-position marginals mix the completions.
* sudoku9 ('medium'): latin square plus the nine 3x3 boxes; puzzles are generated with a
  unique solution (checked by the solver), so exact == valid. Each blank depends on its row,
  column and box, and (through other blanks) on the rest of the grid.

Full grids are drawn by a randomised backtracking search (most-constrained cell first, values
in random order), so there is no small set of answers to memorise.

Shortest paths::

    path: Alice Eve | Alice Bob 4 , Bob Eve 2 , Alice Carol 1 , Carol Eve 7
      ->  Alice 0 , Carol 1 Alice , Bob 4 Alice , Eve 6 Bob | Alice Bob Eve

The prompt names a source and a target, then lists undirected weighted edges ``u v w`` in
random order. The answer lists every node as Dijkstra settles it: by increasing distance from
the source, ties in A-Z order, each as ``node distance predecessor`` (the source as
``source 0``), then ``|`` and the shortest path from the source to the target. Graphs are
connected and drawn so that every shortest path is unique (one predecessor per node), so the
answer is unique: 'medium' dependency (one answer, but every entry depends on the distances of
the entries before it and the order is a global property of all distances).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .base import Instance, Score, positional_partial, words
from .lists import NAMES
from .v2_base import TaskV2, number_tokens

BLANK = "_"
ROW_SEP = "/"


# ---------------------------------------------------------------------------- grid solver


def solve_grid(
    cells: Sequence[int], n: int, box: Optional[tuple[int, int]], limit: int,
    rng: Optional[np.random.Generator] = None,
) -> list[tuple[int, ...]]:
    """Up to ``limit`` completions of an n x n grid (row-major ``cells``, 0 = blank).

    Rows and columns must hold 1..n once; with ``box = (h, w)`` so must every h x w box. With
    ``rng`` the search tries values in random order (to draw random full grids). Returns full
    grids as tuples of n*n ints; [] when the givens conflict or there is no completion.
    """
    full = (1 << n) - 1
    grid = [int(v) for v in cells]
    rows, cols, boxes = [0] * n, [0] * n, [0] * n
    bh, bw = box if box else (n, n)
    per_row = n // bw
    cell_box = [((i // n) // bh) * per_row + (i % n) // bw for i in range(n * n)] if box else [0] * (n * n)
    for i, v in enumerate(grid):
        if v:
            bit = 1 << (v - 1)
            r, c, b = i // n, i % n, cell_box[i]
            if rows[r] & bit or cols[c] & bit or (box and boxes[b] & bit):
                return []
            rows[r] |= bit
            cols[c] |= bit
            if box:
                boxes[b] |= bit
    empties = [i for i, v in enumerate(grid) if v == 0]
    sols: list[tuple[int, ...]] = []

    def free(i: int) -> int:
        used = rows[i // n] | cols[i % n]
        if box:
            used |= boxes[cell_box[i]]
        return full & ~used

    def rec() -> bool:
        if not empties:
            sols.append(tuple(grid))
            return len(sols) >= limit
        best_k, best_m, best_c = -1, 0, n + 1
        for k, i in enumerate(empties):
            m = free(i)
            cnt = m.bit_count()
            if cnt < best_c:
                best_k, best_m, best_c = k, m, cnt
                if cnt <= 1:
                    break
        if best_c == 0:
            return False
        i = empties[best_k]
        empties[best_k] = empties[-1]
        empties.pop()
        vals = [v for v in range(1, n + 1) if best_m >> (v - 1) & 1]
        if rng is not None and len(vals) > 1:
            vals = [vals[j] for j in rng.permutation(len(vals))]
        r, c, b = i // n, i % n, cell_box[i]
        done = False
        for v in vals:
            bit = 1 << (v - 1)
            grid[i] = v
            rows[r] |= bit
            cols[c] |= bit
            if box:
                boxes[b] |= bit
            done = rec()
            rows[r] &= ~bit
            cols[c] &= ~bit
            if box:
                boxes[b] &= ~bit
            grid[i] = 0
            if done:
                break
        empties.append(i)
        empties[best_k], empties[-1] = empties[-1], empties[best_k]
        return done

    rec()
    return sols


def format_grid(cells: Sequence[int], n: int) -> str:
    """Cells (row-major, 0 = blank) as 'a b ... / ...'."""
    toks = [BLANK if v == 0 else str(int(v)) for v in cells]
    return f" {ROW_SEP} ".join(" ".join(toks[r * n:(r + 1) * n]) for r in range(n))


def parse_grid(output: str, n: int) -> Optional[tuple[int, ...]]:
    """Cells of a well-formed full n x n grid (values 1..n, '/' between rows), else None."""
    toks = words(output)
    if len(toks) != n * n + n - 1:
        return None
    values = {str(v): v for v in range(1, n + 1)}
    cells: list[int] = []
    for i, t in enumerate(toks):
        if i % (n + 1) == n:
            if t != ROW_SEP:
                return None
        elif t in values:
            cells.append(values[t])
        else:
            return None
    return tuple(cells)


def is_valid_grid(cells: Sequence[int], n: int, box: Optional[tuple[int, int]]) -> bool:
    """Every row and column (and box) of a full grid holds 1..n once."""
    g = np.asarray(cells, dtype=np.int64).reshape(n, n)
    want = list(range(1, n + 1))
    groups = [g[r] for r in range(n)] + [g[:, c] for c in range(n)]
    if box:
        h, w = box
        groups += [g[r:r + h, c:c + w].ravel() for r in range(0, n, h) for c in range(0, n, w)]
    return all(sorted(int(v) for v in grp) == want for grp in groups)


def intercalates(grid: Sequence[int], n: int) -> list[tuple[int, int, int, int]]:
    """All (r1, r2, c1, c2), r1 < r2, c1 < c2, with grid[r1][c1] == grid[r2][c2] and
    grid[r1][c2] == grid[r2][c1] (2x2 sub-squares that can be swapped)."""
    g = [list(grid[r * n:(r + 1) * n]) for r in range(n)]
    out = []
    for r1 in range(n):
        for r2 in range(r1 + 1, n):
            a, b = g[r1], g[r2]
            for c1 in range(n):
                for c2 in range(c1 + 1, n):
                    if a[c1] == b[c2] and a[c2] == b[c1]:
                        out.append((r1, r2, c1, c2))
    return out


@dataclass(frozen=True)
class GridTaskV2(TaskV2):
    """Latin square (``box=None``) or sudoku (``box=(3, 3)``) completion on a ``size`` grid."""

    size: int = 9
    box: Optional[tuple[int, int]] = None
    #: completions enumerated for partial credit (latin); partial is exact up to this many.
    partial_cap: int = 64

    @property
    def _defaults(self) -> dict[str, Any]:
        return {"blanks": 24} if self.box else {"blanks": 16}

    @property
    def _answer_tokens(self) -> int:
        return self.size * self.size + self.size - 1

    def _check(self, blanks: int) -> None:
        n2 = self.size * self.size
        lo = 1 if self.box else 4  # a latin puzzle blanks at least one intercalate
        hi = min(n2, 45) if self.box else n2
        if not lo <= blanks <= hi:
            raise ValueError(f"{self.name}: blanks must be in {lo}..{hi}, got {blanks}.")

    def max_answer_tokens(self, **difficulty: Any) -> int:
        self._check(**self.difficulty(**difficulty))
        return self._answer_tokens

    def max_prompt_tokens(self, **difficulty: Any) -> int:
        return 1 + self.max_answer_tokens(**difficulty)

    def _sample(self, rng: np.random.Generator, **k: Any) -> Instance:
        self._check(**k)
        n, blanks = self.size, int(k["blanks"])
        for _ in range(1000):
            solution = solve_grid([0] * (n * n), n, self.box, 1, rng)[0]
            if self.box:
                for _ in range(20):
                    holes = rng.choice(n * n, size=blanks, replace=False)
                    cells = list(solution)
                    for i in holes:
                        cells[int(i)] = 0
                    if len(solve_grid(cells, n, self.box, 2)) == 1:
                        break
                else:
                    continue
            else:
                quads = intercalates(solution, n)
                if not quads:
                    continue
                r1, r2, c1, c2 = quads[int(rng.integers(len(quads)))]
                forced = {r1 * n + c1, r1 * n + c2, r2 * n + c1, r2 * n + c2}
                others = [i for i in range(n * n) if i not in forced]
                extra = rng.choice(len(others), size=blanks - 4, replace=False)
                holes = sorted(forced | {others[int(j)] for j in extra})
                cells = list(solution)
                for i in holes:
                    cells[i] = 0
            prompt = f"{self.keyword} {format_grid(cells, n)}"
            return Instance(self.name, prompt, format_grid(solution, n), {"cells": tuple(cells)})
        raise ValueError(f"{self.name}: no puzzle with {blanks} blanks found in 1000 draws; use fewer blanks.")

    def completions(self, instance: Instance, limit: int) -> list[tuple[int, ...]]:
        """Up to ``limit`` valid completions of the instance's puzzle."""
        return solve_grid(instance.meta["cells"], self.size, self.box, limit)

    def score(self, instance: Instance, output: str) -> Score:
        n = self.size
        toks = words(output)
        exact = toks == words(instance.answer)
        cells = instance.meta["cells"]
        grid = parse_grid(output, n)
        if (grid is not None and all(g == c for g, c in zip(grid, cells) if c)
                and is_valid_grid(grid, n, self.box)):
            return Score(True, exact, 1.0)
        sols = [parse_grid(instance.answer, n)] if self.box else self.completions(instance, self.partial_cap)
        best = max(positional_partial(toks, words(format_grid(s, n))) for s in sols)
        return Score(False, exact, best)


LATIN9 = GridTaskV2(
    name="latin9", dependency="high", category="puzzles", unique_answer=False, size=9, box=None,
    description="'latin9: 1 2 _ ... / ...' (9 rows, '_' blank) -> any full 9x9 latin square keeping the given cells",
)
SUDOKU9 = GridTaskV2(
    name="sudoku9", dependency="medium", category="puzzles", unique_answer=True, size=9, box=(3, 3),
    description="'sudoku9: 5 3 _ ... / ...' -> the unique full 9x9 sudoku (3x3 boxes) keeping the given cells",
)


# ---------------------------------------------------------------------------- shortest paths


def dijkstra(n: int, edges: Sequence[tuple[int, int, int]], source: int) -> tuple[list[int], list[list[int]]]:
    """Distances from ``source`` and, per node, every predecessor on a shortest path.

    ``edges`` are undirected ``(u, v, w)`` with ``w > 0`` over nodes ``0..n-1``; unreachable
    nodes keep distance -1."""
    adj: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for u, v, w in edges:
        adj[u].append((v, w))
        adj[v].append((u, w))
    dist = [-1] * n
    heap = [(0, source)]
    best = {source: 0}
    while heap:
        d, u = heapq.heappop(heap)
        if dist[u] >= 0:
            continue
        dist[u] = d
        for v, w in adj[u]:
            if dist[v] < 0 and d + w < best.get(v, 1 << 60):
                best[v] = d + w
                heapq.heappush(heap, (d + w, v))
    preds = [[u for u, w in adj[v] if dist[u] >= 0 and dist[u] + w == dist[v]] if v != source else []
             for v in range(n)]
    return dist, preds


@dataclass(frozen=True)
class PathTask(TaskV2):
    """Single-source shortest paths, written as Dijkstra's settling order ('medium', see module).

    Nodes are ``nodes`` distinct names; the graph is a random spanning tree plus
    ``extra_edges`` random edges, weights uniform in ``1..max_weight``; graphs with a distance
    above ``max_distance`` or a tie between shortest paths are redrawn."""

    @property
    def _defaults(self) -> dict[str, Any]:
        return {"nodes": 16, "extra_edges": 8, "max_weight": 9, "max_distance": 99}

    @staticmethod
    def _check(nodes: int, extra_edges: int, max_weight: int, max_distance: int) -> None:
        if not 3 <= nodes <= len(NAMES):
            raise ValueError(f"path: nodes must be in 3..{len(NAMES)}, got {nodes}.")
        if not 0 <= extra_edges <= nodes * (nodes - 1) // 2 - (nodes - 1):
            raise ValueError(f"path: extra_edges must be in 0..{nodes * (nodes - 1) // 2 - (nodes - 1)}, got {extra_edges}.")
        if not 1 <= max_weight <= 99:
            raise ValueError(f"path: max_weight must be in 1..99, got {max_weight}.")
        if max_distance < max_weight:
            raise ValueError(f"path: max_distance must be >= max_weight, got {max_distance} < {max_weight}.")

    def max_answer_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        n = k["nodes"]
        d = number_tokens(min(k["max_distance"], (n - 1) * k["max_weight"]))
        return 2 + (n - 1) * (1 + d + 1) + (n - 1) + 1 + n

    def max_prompt_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        e = k["nodes"] - 1 + k["extra_edges"]
        return 4 + e * (2 + number_tokens(k["max_weight"])) + (e - 1)

    def _sample(self, rng: np.random.Generator, **k: Any) -> Instance:
        self._check(**k)
        n = k["nodes"]
        for _ in range(10000):
            names = sorted(NAMES[int(i)] for i in rng.choice(len(NAMES), size=n, replace=False))
            order = rng.permutation(n)
            pairs = {tuple(sorted((int(order[i]), int(order[int(rng.integers(i))])))) for i in range(1, n)}
            while len(pairs) < n - 1 + k["extra_edges"]:
                u, v = (int(x) for x in rng.choice(n, size=2, replace=False))
                pairs.add((min(u, v), max(u, v)))
            edges = [(u, v, int(rng.integers(1, k["max_weight"] + 1))) for u, v in sorted(pairs)]
            source, target = (int(x) for x in rng.choice(n, size=2, replace=False))
            dist, preds = dijkstra(n, edges, source)
            if max(dist) > k["max_distance"] or any(len(p) != 1 for v, p in enumerate(preds) if v != source):
                continue
            entries = []
            for v in sorted(range(n), key=lambda x: (dist[x], names[x])):
                entries.append(f"{names[v]} 0" if v == source else f"{names[v]} {dist[v]} {names[preds[v][0]]}")
            path = [target]
            while path[-1] != source:
                path.append(preds[path[-1]][0])
            shown = [edges[int(i)] for i in rng.permutation(len(edges))]
            shown = [(u, v, w) if rng.integers(2) else (v, u, w) for u, v, w in shown]
            prompt = (f"{self.keyword} {names[source]} {names[target]} | "
                      + " , ".join(f"{names[u]} {names[v]} {w}" for u, v, w in shown))
            answer = " , ".join(entries) + " | " + " ".join(names[v] for v in reversed(path))
            meta = {"names": tuple(names), "edges": tuple(edges), "source": source, "target": target}
            return Instance(self.name, prompt, answer, meta)
        raise ValueError(f"path: no graph with unique shortest paths found in 10000 draws at {k}.")

    def score(self, instance: Instance, output: str) -> Score:
        out, ref = words(output), words(instance.answer)
        if out == ref:
            return Score(True, True, 1.0)
        return Score(False, False, positional_partial(out, ref))


PATH = PathTask(
    name="path", dependency="medium", category="puzzles",
    description="'path: Alice Eve | Alice Bob 4 , ...' -> 'Alice 0 , Carol 1 Alice , ... | Alice Bob Eve' (Dijkstra order, then the path)",
)

PUZZLE_TASKS_V2: dict[str, TaskV2] = {t.name: t for t in (LATIN9, SUDOKU9, PATH)}
