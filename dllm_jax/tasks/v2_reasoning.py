"""Reasoning chains written out step by step (tasks v2): column addition, long multiplication
and expression evaluation.

==============  ==================================  =============================================
task            prompt                              answer
==============  ==================================  =============================================
add_steps       ``add_steps: 457 + 968``            ``7 + 8 + 0 = 15 , 5 + 6 + 1 = 12 ,
                                                    4 + 9 + 1 = 14 | 1425``
mul_steps       ``mul_steps: 457 * 68``             ``7 * 8 + 0 = 56 , 5 * 8 + 5 = 45 ,
                                                    4 * 8 + 4 = 36 | 3656 ; 7 * 6 + 0 = 42 ,
                                                    5 * 6 + 4 = 34 , 4 * 6 + 3 = 27 | 2742 ;
                                                    6 + 0 + 0 = 6 , 5 + 2 + 0 = 7 , ... | 31076``
eval_steps      ``eval_steps: ( 3 + 4 ) * 5 - 2``   ``7 * 5 - 2 = 35 - 2 = 33`` (one operation
                                                    reduced per step, any legal order)
==============  ==================================  =============================================

Column steps (add_steps and the last section of mul_steps) run from the least significant
column: ``d1 + d2 + ... + c = t`` lists the column's digits (0 where a number is shorter), the
carry in ``c`` (0 for the first column) and the column total ``t``, whose last digit is the
sum's digit and whose other digit is the next carry, so every carry is written out. After the
columns, ``| S`` gives the result.

mul_steps multiplies ``a`` by each digit ``e`` of ``b`` from the least significant one:
``a_i * e + c = t`` per digit of ``a`` (carry ``c`` in, ``t // 10`` out), ``| p`` the partial
product; sections are separated by ``;`` and the last one adds the partial products shifted by
their place (``p_j * 10**j``) in column steps and ends with ``| a*b``. A one-digit ``b`` has
no addition section.

Dependency levels:

* add_steps, mul_steps: 'medium'. One valid answer, but every step's carry comes from the
  previous step's total, so a token committed before its predecessors must anticipate the
  whole carry chain.
* eval_steps: 'high'. Independent sub-expressions can be reduced in any order, so there are
  several valid chains; once one step reduces one of them, every later expression must agree
  with that choice, and position-wise marginals over the orders mix incompatible expressions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .arithmetic import check_addition_knobs
from .base import Instance, Score, positional_partial, words
from .v2_base import TaskV2, column_addition, column_addition_max_tokens, count_tokens, digits_lsb, number_tokens


def _draw_number(rng: np.random.Generator, min_digits: int, digits: int) -> int:
    d = int(rng.integers(min_digits, digits + 1))
    lo = 0 if d == 1 else 10 ** (d - 1)
    return int(rng.integers(lo, 10 ** d))


def _exact_score(instance: Instance, output: str) -> Score:
    out, ref = words(output), words(instance.answer)
    if out == ref:
        return Score(True, True, 1.0)
    return Score(False, False, positional_partial(out, ref))


# ---------------------------------------------------------------------------- addition


@dataclass(frozen=True)
class AddStepsTask(TaskV2):
    """Column addition of ``operands`` numbers with explicit carries ('medium', see module)."""

    @property
    def _defaults(self) -> dict[str, Any]:
        return {"digits": 10, "min_digits": 10, "operands": 2}

    def _check(self, digits: int, min_digits: int, operands: int) -> None:
        check_addition_knobs(self.name, digits, min_digits, operands)

    def max_answer_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        n, d = k["operands"], k["digits"]
        return column_addition_max_tokens(n, d) + 1 + number_tokens(n * (10 ** d - 1))

    def max_prompt_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        return 1 + k["operands"] * k["digits"] + (k["operands"] - 1)

    def _sample(self, rng: np.random.Generator, **k: Any) -> Instance:
        self._check(**k)
        nums = [_draw_number(rng, k["min_digits"], k["digits"]) for _ in range(k["operands"])]
        steps, total = column_addition(nums)
        prompt = f"{self.keyword} " + " + ".join(map(str, nums))
        return Instance(self.name, prompt, " , ".join(steps) + f" | {total}", {"operands": tuple(nums)})

    def score(self, instance: Instance, output: str) -> Score:
        return _exact_score(instance, output)


# ---------------------------------------------------------------------------- multiplication


def multiplication_steps(a: int, b: int) -> str:
    """The mul_steps answer for ``a * b`` (format in the module docstring)."""
    da = digits_lsb(a, number_tokens(a))
    partials: list[int] = []
    sections: list[str] = []
    for e in digits_lsb(b, number_tokens(b)):
        carry, steps = 0, []
        for d in da:
            t = d * e + carry
            steps.append(f"{d} * {e} + {carry} = {t}")
            carry = t // 10
        p = a * e
        partials.append(p)
        sections.append(" , ".join(steps) + f" | {p}")
    if len(partials) > 1:
        steps, total = column_addition([p * 10 ** j for j, p in enumerate(partials)])
        sections.append(" , ".join(steps) + f" | {total}")
    return " ; ".join(sections)


@dataclass(frozen=True)
class MulStepsTask(TaskV2):
    """Long multiplication ``a * b`` with explicit carries and partial products ('medium')."""

    @property
    def _defaults(self) -> dict[str, Any]:
        return {"digits": 5, "min_digits": 5, "factor_digits": 2, "min_factor_digits": 2}

    @staticmethod
    def _check(digits: int, min_digits: int, factor_digits: int, min_factor_digits: int) -> None:
        if not 1 <= min_digits <= digits <= 12:
            raise ValueError(f"mul_steps: need 1 <= min_digits <= digits <= 12, got {min_digits}, {digits}.")
        if not 1 <= min_factor_digits <= factor_digits <= 4:
            raise ValueError(
                f"mul_steps: need 1 <= min_factor_digits <= factor_digits <= 4, got {min_factor_digits}, {factor_digits}."
            )

    def max_answer_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        na, nb = k["digits"], k["factor_digits"]
        # a digit step 'd * e + c = t' is at most 8 tokens (t <= 89); '| p' adds 1 + (na + 1)
        section = 8 * na + (na - 1) + 1 + (na + 1)
        total = nb * section + (nb - 1)
        if nb > 1:
            width = na + nb  # the last partial, shifted, has at most na + 1 + nb - 1 digits
            total += 1 + column_addition_max_tokens(nb, width) + 1 + (na + nb)
        return total

    def max_prompt_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        return 1 + k["digits"] + 1 + k["factor_digits"]

    def _sample(self, rng: np.random.Generator, **k: Any) -> Instance:
        self._check(**k)
        a = _draw_number(rng, k["min_digits"], k["digits"])
        b = _draw_number(rng, k["min_factor_digits"], k["factor_digits"])
        return Instance(self.name, f"{self.keyword} {a} * {b}", multiplication_steps(a, b), {"a": a, "b": b})

    def score(self, instance: Instance, output: str) -> Score:
        return _exact_score(instance, output)


# ---------------------------------------------------------------------------- expressions

_PREC = {"+": 1, "-": 1, "*": 2}


class Expression:
    """A binary expression tree over non-negative integers, for step-by-step reduction.

    Internal nodes are numbered ``0..m-1`` (node 0 is the root); a *state* is a bitmask of the
    internal nodes already replaced by their values. A node is *ready* when both children are
    leaves or reduced. Rendering keeps the parentheses needed to read the text back as the same
    tree: a child in parentheses when its operator binds less tightly than its parent's, or
    equally tightly on the right (left associativity).
    """

    def __init__(self, ops: list[str], left: list[tuple[str, int]], right: list[tuple[str, int]], leaves: list[int]):
        # children are ('n', internal index) or ('l', leaf index)
        self.ops, self.left, self.right, self.leaves = ops, left, right, leaves
        self.m = len(ops)
        self.value = [0] * self.m
        for i in reversed(range(self.m)):  # children have larger indices than parents
            a, b = self._val(left[i]), self._val(right[i])
            self.value[i] = a + b if ops[i] == "+" else a - b if ops[i] == "-" else a * b
        self.children = [[c[1] for c in (left[i], right[i]) if c[0] == "n"] for i in range(self.m)]
        self.full = (1 << self.m) - 1

    def _val(self, child: tuple[str, int]) -> int:
        return self.value[child[1]] if child[0] == "n" else self.leaves[child[1]]

    @classmethod
    def random(cls, rng: np.random.Generator, m: int, max_leaf: int, max_value: int,
               op_weights: tuple[float, float, float]) -> Optional["Expression"]:
        """A random tree with ``m`` operators whose node values all lie in ``0..max_value``, or
        None when a draw gets stuck. The shape splits the leaf count uniformly; each operator is
        drawn (by ``op_weights`` for + - *) among those keeping its value in range."""
        ops: list[str] = []
        left: list[tuple[str, int]] = []
        right: list[tuple[str, int]] = []
        leaves: list[int] = []
        w = np.asarray(op_weights, dtype=np.float64)

        def build(n_leaves: int) -> Optional[tuple[tuple[str, int], int]]:
            if n_leaves == 1:
                leaves.append(int(rng.integers(1, max_leaf + 1)))
                return ("l", len(leaves) - 1), leaves[-1]
            i = len(ops)
            ops.append("+")
            left.append(("l", -1))
            right.append(("l", -1))
            k = int(rng.integers(1, n_leaves))
            lhs = build(k)
            rhs = build(n_leaves - k) if lhs is not None else None
            if rhs is None:
                return None
            (left[i], a), (right[i], b) = lhs, rhs
            ok = np.array([a + b <= max_value, a >= b, a * b <= max_value], dtype=np.float64) * w
            if ok.sum() <= 0:
                return None
            j = int(rng.choice(3, p=ok / ok.sum()))
            ops[i] = ("+", "-", "*")[j]
            return ("n", i), (a + b, a - b, a * b)[j]

        if build(m + 1) is None:
            return None
        return cls(ops, left, right, leaves)

    def ready(self, state: int) -> list[int]:
        """Internal nodes that can be reduced next, in left-to-right (in-order) order."""
        out: list[int] = []

        def walk(child: tuple[str, int]) -> None:
            if child[0] == "l" or state >> child[1] & 1:
                return
            i = child[1]
            walk(self.left[i])
            if all(state >> c & 1 for c in self.children[i]):
                out.append(i)
            walk(self.right[i])

        walk(("n", 0))
        return out

    def render(self, state: int) -> str:
        """The expression text with the nodes of ``state`` replaced by their values."""

        def r(child: tuple[str, int], parent_op: Optional[str], is_right: bool) -> str:
            if child[0] == "l":
                return str(self.leaves[child[1]])
            i = child[1]
            if state >> i & 1:
                return str(self.value[i])
            s = f"{r(self.left[i], self.ops[i], False)} {self.ops[i]} {r(self.right[i], self.ops[i], True)}"
            if parent_op is not None and (
                _PREC[self.ops[i]] < _PREC[parent_op] or (is_right and _PREC[self.ops[i]] == _PREC[parent_op])
            ):
                s = f"( {s} )"
            return s

        return r(("n", 0), None, False)

    def chain(self, order: list[int]) -> str:
        """The answer for a reduction order (a list of all internal nodes)."""
        state, parts = 0, []
        for i in order:
            state |= 1 << i
            parts.append(self.render(state))
        return " = ".join(parts)

    def longest_answer_tokens(self) -> int:
        """Tokens of the longest valid answer over all reduction orders (exact, by DP)."""
        lengths: dict[int, int] = {}
        best: dict[int, int] = {self.full: 0}

        def length(state: int) -> int:
            if state not in lengths:
                lengths[state] = count_tokens(self.render(state))
            return lengths[state]

        def go(state: int) -> int:
            if state not in best:
                best[state] = max(length(state | 1 << i) + go(state | 1 << i) for i in self.ready(state))
            return best[state]

        return go(0) + (self.m - 1)  # '=' between the m expressions

    def check_chain(self, segments: list[list[str]]) -> int:
        """Number of leading segments that are legal one-operation reductions (m = all legal)."""
        states = {0}
        for k, seg in enumerate(segments):
            nxt = set()
            for s in states:
                for i in self.ready(s):
                    t = s | 1 << i
                    if self.render(t).split() == seg:
                        nxt.add(t)
            if not nxt:
                return k
            states = nxt
        return len(segments)


@dataclass(frozen=True)
class EvalStepsTask(TaskV2):
    """Step-by-step evaluation of an expression over + - * and parentheses ('high', see module).

    Every node value (including the final one) lies in ``0..max_value``; instances whose
    longest valid answer would exceed ``max_tokens`` tokens are redrawn, so
    ``max_answer_tokens`` is a true bound on every valid answer."""

    @property
    def _defaults(self) -> dict[str, Any]:
        return {"ops": 8, "max_leaf": 9, "max_value": 99, "max_tokens": 120, "op_weights": (0.4, 0.3, 0.3)}

    @staticmethod
    def _check(ops: int, max_leaf: int, max_value: int, max_tokens: int, op_weights: tuple[float, ...]) -> None:
        if not 1 <= ops <= 12:
            raise ValueError(f"eval_steps: ops must be in 1..12, got {ops}.")
        if not 1 <= max_leaf <= max_value:
            raise ValueError(f"eval_steps: need 1 <= max_leaf <= max_value, got {max_leaf}, {max_value}.")
        if len(op_weights) != 3 or min(op_weights) < 0 or sum(op_weights) <= 0:
            raise ValueError(f"eval_steps: op_weights must be 3 non-negative weights for + - *, got {op_weights}.")
        if max_tokens < 1:
            raise ValueError(f"eval_steps: max_tokens must be >= 1, got {max_tokens}.")

    def max_answer_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        return int(k["max_tokens"])

    def max_prompt_tokens(self, **difficulty: Any) -> int:
        k = self.difficulty(**difficulty)
        self._check(**k)
        m, leaf = k["ops"], number_tokens(k["max_leaf"])
        return 1 + (m + 1) * leaf + m + 2 * (m - 1)  # parentheses: at most one pair per non-root operator

    def _sample(self, rng: np.random.Generator, **k: Any) -> Instance:
        self._check(**k)
        for _ in range(10000):
            e = Expression.random(rng, k["ops"], k["max_leaf"], k["max_value"], tuple(k["op_weights"]))
            if e is None or e.longest_answer_tokens() > k["max_tokens"]:
                continue
            state, order = 0, []
            for _ in range(e.m):
                ready = e.ready(state)
                i = ready[int(rng.integers(len(ready)))]
                order.append(i)
                state |= 1 << i
            prompt = f"{self.keyword} {e.render(0)}"
            meta = {"ops": tuple(e.ops), "left": tuple(e.left), "right": tuple(e.right), "leaves": tuple(e.leaves),
                    "value": e.value[0]}
            return Instance(self.name, prompt, e.chain(order), meta)
        raise ValueError(f"eval_steps: no expression within the bounds {k} found in 10000 draws; relax them.")

    @staticmethod
    def expression(instance: Instance) -> Expression:
        """The expression tree of an instance."""
        m = instance.meta
        return Expression(list(m["ops"]), list(m["left"]), list(m["right"]), list(m["leaves"]))

    def score(self, instance: Instance, output: str) -> Score:
        out = words(output)
        exact = out == words(instance.answer)
        e = self.expression(instance)
        segments: list[list[str]] = [[]]
        for t in out:
            if t == "=":
                segments.append([])
            else:
                segments[-1].append(t)
        good = e.check_chain(segments[: e.m])
        valid = len(segments) == e.m and good == e.m
        partial = 1.0 if valid else good / max(e.m, len(segments))
        return Score(valid, exact, partial)


ADD_STEPS = AddStepsTask(
    name="add_steps", dependency="medium", category="reasoning",
    description="'add_steps: 457 + 968' -> column steps 'd + d + carry = total' from the right, then '| 1425'",
)
MUL_STEPS = MulStepsTask(
    name="mul_steps", dependency="medium", category="reasoning",
    description="'mul_steps: 457 * 68' -> digit steps per partial product '| p ;', then column addition '| product'",
)
EVAL_STEPS = EvalStepsTask(
    name="eval_steps", dependency="high", category="reasoning", unique_answer=False,
    description="'eval_steps: ( 3 + 4 ) * 5 - 2' -> '7 * 5 - 2 = 35 - 2 = 33' (one operation per step, any legal order)",
)

REASONING_TASKS: dict[str, TaskV2] = {t.name: t for t in (ADD_STEPS, MUL_STEPS, EVAL_STEPS)}
