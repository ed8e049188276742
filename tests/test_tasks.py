"""dllm_jax.tasks: generators, exact scorers (checked against brute force written here) and the
task tokenizer."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from dllm_jax.tasks import TASKS, get_task, split_of, tasks_by_dependency
from dllm_jax.tasks.base import Score
from dllm_jax.tasks.vocab import (
    BOS_ID, EOS_ID, MASK_ID, PAD_ID, UNK_ID, build_task_tokenizer, decode_answer, encode_answer, task_vocabulary,
)

N = 40

# Difficulty settings every task is exercised at (defaults first).
SETTINGS: dict[str, list[dict]] = {name: [{}] for name in TASKS}
for _op in ("copy", "reverse", "sort", "insert", "insert_random", "remove", "remove_random", "replace",
            "replace_random", "shuffle"):
    SETTINGS[_op] += [{"items": "numbers", "max_value": 999, "min_len": 3, "max_len": 8},
                      {"items": "names", "min_len": 3, "max_len": 3}]
SETTINGS["latin"] += [{"blanks": 4}, {"blanks": 12, "min_solutions": 2}, {"blanks": 8, "max_solutions": 1}]
SETTINGS["sudoku"] += [{"blanks": 6}, {"blanks": 9}]
SETTINGS["add"] += [{"digits": 5, "min_digits": 1}, {"digits": 2, "min_digits": 2, "operands": 4}]
SETTINGS["words_to_sentence"] += [{"level": "easy"}, {"level": "hard"}, {"level": "hard", "max_adjectives": 3, "max_pps": 3}]
CASES = [(name, k) for name, ks in SETTINGS.items() for k in ks]


def _ids(case):
    return f"{case[0]}-{case[1]}" if case[1] else case[0]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_task_tokenizer(tmp_path_factory.mktemp("task_tok"))


# ---------------------------------------------------------------------------- registry, generators


def test_registry():
    assert len(TASKS) >= 10
    assert {t.dependency for t in TASKS.values()} == {"low", "medium", "high"}
    assert get_task("sort") is TASKS["sort"]
    with pytest.raises(ValueError, match="valid tasks: .*shuffle"):
        get_task("sorting")
    with pytest.raises(ValueError, match="valid knobs"):
        TASKS["sort"].generate(0, 2, lenght=3)
    with pytest.raises(ValueError, match="split"):
        TASKS["sort"].generate(0, 2, split="dev")
    assert sum(len(tasks_by_dependency(lv)) for lv in ("low", "medium", "high")) == len(TASKS)
    for name, t in TASKS.items():
        assert t.name == name and t.description


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_deterministic_and_splits_disjoint(case):
    name, knobs = case
    task = TASKS[name]
    a = task.generate(7, N, "train", **knobs)
    b = task.generate(7, N, "train", **knobs)
    assert [(i.prompt, i.answer) for i in a] == [(i.prompt, i.answer) for i in b]
    c = task.generate(8, N, "train", **knobs)
    assert [i.prompt for i in a] != [i.prompt for i in c]
    test = task.generate(7, N, "test", **knobs)
    train_prompts = {i.prompt for i in a} | {i.prompt for i in c}
    assert len({i.prompt for i in a}) == N  # distinct within a call
    assert not train_prompts & {i.prompt for i in test}
    assert all(split_of(name, i.prompt) == "train" for i in a + c)
    assert all(split_of(name, i.prompt) == "test" for i in test)
    # a numpy Generator works too, and is advanced
    rng = np.random.default_rng(3)
    assert task.generate(rng, 3, **knobs) != task.generate(rng, 3, **knobs)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_answer_scores_exact(case):
    name, knobs = case
    task = TASKS[name]
    for inst in task.generate(1, N, "test", **knobs):
        assert inst.prompt.startswith(f"{name}: ")
        assert task.score(inst, inst.answer) == Score(True, True, 1.0)
        assert task.score(inst, "  " + inst.answer.replace(" ", "   ") + "\n") == Score(True, True, 1.0)
        for bad in ("", "Bob", inst.answer + " " + inst.answer.split()[-1]):
            s = task.score(inst, bad)
            assert not s.valid and not s.exact and 0.0 <= s.partial < 1.0


# ---------------------------------------------------------------------------- lists

def _parse_list_prompt(prompt):
    """(keyword, new item, 1-based position, list) parsed independently of the library."""
    kw, rest = prompt.split(" ", 1)
    head, sep, body = rest.partition(" | ")
    if not sep:
        head, body = "", rest
    m = re.fullmatch(r"(?:(\S+) )?@ (\d+)", head) if "@" in head else None
    new, pos = (m.group(1), int(m.group(2))) if m else ((head or None), None)
    return kw[:-1], new, pos, body.split()


def _num_key(x):
    return (0, int(x)) if x.isdigit() else (1, x)


DETERMINISTIC = {
    "copy": lambda L, x, p: L,
    "reverse": lambda L, x, p: L[::-1],
    "sort": lambda L, x, p: sorted(L, key=_num_key),
    "insert": lambda L, x, p: L[: p - 1] + [x] + L[p - 1:],
    "remove": lambda L, x, p: L[: p - 1] + L[p:],
    "replace": lambda L, x, p: L[: p - 1] + [x] + L[p:],
}


@pytest.mark.parametrize("op", list(DETERMINISTIC))
@pytest.mark.parametrize("items", ["names", "numbers"])
def test_deterministic_list_tasks(op, items):
    task = TASKS[op]
    for inst in task.generate(2, N, "train", items=items):
        kw, new, pos, L = _parse_list_prompt(inst.prompt)
        assert kw == op and len(set(L)) == len(L)
        ref = DETERMINISTIC[op](L, new, pos)
        assert inst.answer == " ".join(ref)
        out = list(ref)
        i, j = 0, len(out) - 1
        out[i], out[j] = out[j], out[i]  # a swapped pair
        s = task.score(inst, " ".join(out))
        assert not s.valid and not s.exact
        assert s.partial == pytest.approx((len(ref) - 2) / len(ref))
        s = task.score(inst, " ".join(ref[:-1]))  # a missing item
        assert not s.valid and s.partial == pytest.approx((len(ref) - 1) / len(ref))


def test_sort_numbers_numeric_order():
    insts = TASKS["sort"].generate(0, 50, items="numbers", max_value=200)
    mixed = [i for i in insts if len({len(w) for w in i.answer.split()}) > 1]
    assert any(sorted(i.answer.split()) != i.answer.split() for i in mixed)
    for inst in mixed:
        vals = inst.answer.split()
        assert [int(v) for v in vals] == sorted(int(v) for v in vals)
        if sorted(vals) != vals:
            assert not TASKS["sort"].score(inst, " ".join(sorted(vals))).valid  # string order is wrong


@pytest.mark.parametrize("n", [3, 4, 5])
def test_shuffle_accepts_every_other_permutation(n):
    task = TASKS["shuffle"]
    for inst in task.generate(5, 3, min_len=n, max_len=n):
        L = inst.prompt.split()[1:]
        assert sorted(inst.answer.split()) == sorted(L) and inst.answer.split() != L
        for perm in itertools.permutations(L):
            s = task.score(inst, " ".join(perm))
            assert s.valid == (list(perm) != L)
            assert s.partial == 1.0 if s.valid else s.partial == pytest.approx((n - 2) / n)
        dup = [L[0]] + L[:-1]  # an item duplicated, another lost
        s = task.score(inst, " ".join(dup))
        assert not s.valid and 0 < s.partial < 1


def _enumerate(op, L, x):
    """All valid outputs of the *_random list ops, by brute force over candidate edits."""
    n = len(L)
    if op == "insert_random":
        cands = [p for p in itertools.permutations(L + [x])]
        return {c for c in cands if [t for t in c if t != x] == L}
    if op == "remove_random":
        return {c for c in itertools.combinations(L, n - 1)}
    if op == "replace_random":
        return {c for c in itertools.product(*[(t, x) for t in L]) if sum(t == x for t in c) == 1}
    raise AssertionError(op)


@pytest.mark.parametrize("op", ["insert_random", "remove_random", "replace_random"])
def test_random_edits_accept_exactly_the_valid_answers(op):
    task = TASKS[op]
    for inst in task.generate(4, 6, min_len=3, max_len=5, items="numbers", max_value=50):
        _, x, _, L = _parse_list_prompt(inst.prompt)
        valid = _enumerate(op, L, x)
        n_expected = len(L) + 1 if op == "insert_random" else len(L)
        assert len(valid) == n_expected and tuple(inst.answer.split()) in valid
        for ans in valid:
            s = task.score(inst, " ".join(ans))
            assert s.valid and s.partial == 1.0 and s.exact == (" ".join(ans) == inst.answer)
        # every other ordering / edit of the same tokens is rejected
        pool = L + ([x] if x else [])
        m = len(next(iter(valid)))
        for cand in itertools.permutations(pool, m):
            if cand not in valid:
                s = task.score(inst, " ".join(cand))
                assert not s.valid and 0.0 <= s.partial < 1.0
        assert not task.score(inst, " ".join(L)).valid  # no edit at all
        if x is not None:  # two edits
            two = L[:1] + [x] + L[1:2] + [x] + L[2:] if op == "insert_random" else [x, x] + L[2:]
            assert not task.score(inst, " ".join(two)).valid


# ---------------------------------------------------------------------------- puzzles

def _parse_grid(text):
    rows = [r.split() for r in text.split(" / ")]
    assert len(rows) == 4 and all(len(r) == 4 for r in rows)
    return [[0 if v == "_" else int(v) for v in r] for r in rows]


def _solve_all(grid, boxes):
    """All completions by plain backtracking (independent of the library's enumeration)."""
    g = [row[:] for row in grid]
    sols = []

    def ok(r, c, v):
        if v in g[r] or any(g[i][c] == v for i in range(4)):
            return False
        if boxes:
            br, bc = 2 * (r // 2), 2 * (c // 2)
            if any(g[i][j] == v for i in (br, br + 1) for j in (bc, bc + 1)):
                return False
        return True

    def rec(k):
        if k == 16:
            sols.append(tuple(tuple(row) for row in g))
            return
        r, c = divmod(k, 4)
        if g[r][c]:
            return rec(k + 1)
        for v in range(1, 5):
            if ok(r, c, v):
                g[r][c] = v
                rec(k + 1)
                g[r][c] = 0

    rec(0)
    return sols


def _fmt(grid):
    return " / ".join(" ".join(str(v) for v in row) for row in grid)


def test_latin_accepts_every_completion_and_rejects_corruptions():
    task = TASKS["latin"]
    insts = [(i, 10) for i in task.generate(0, 30, blanks=10)]
    insts += [(i, 12) for i in task.generate(1, 10, blanks=12, min_solutions=3)]
    counts = [i.meta["n_solutions"] for i, _ in insts]
    assert max(counts[:30]) > 1 and min(counts[:30]) == 1 and min(counts[30:]) >= 3
    for inst, blanks in insts:
        puzzle = _parse_grid(inst.prompt.split(" ", 1)[1])
        assert sum(v == 0 for row in puzzle for v in row) == blanks
        sols = _solve_all(puzzle, boxes=False)
        assert len(sols) == inst.meta["n_solutions"] >= 1
        assert tuple(tuple(r) for r in _parse_grid(inst.answer)) in sols
        for sol in sols:
            s = task.score(inst, _fmt(sol))
            assert s.valid and s.partial == 1.0 and s.exact == (_fmt(sol) == inst.answer)
        sol = [list(r) for r in sols[0]]
        dup = [r[:] for r in sol]
        dup[0][1] = dup[0][0]  # duplicated number in a row
        s = task.score(inst, _fmt(dup))
        assert not s.valid and s.partial == pytest.approx(18 / 19)
        swapped = [r[:] for r in sol]
        swapped[0], swapped[1] = swapped[1], swapped[0]  # still a latin square, but givens may move
        s = task.score(inst, _fmt(swapped))
        assert s.valid == (tuple(tuple(r) for r in swapped) in sols)
        assert not task.score(inst, _fmt(sol).replace(" / ", " ")).valid  # separators required
        assert not task.score(inst, inst.prompt.split(" ", 1)[1]).valid  # blanks left


def test_latin_changing_a_given_cell_is_rejected():
    task = TASKS["latin"]
    for inst in task.generate(3, 20, blanks=6):
        puzzle = _parse_grid(inst.prompt.split(" ", 1)[1])
        r, c = next((r, c) for r in range(4) for c in range(4) if puzzle[r][c])
        # relabel symbols: still a latin square, but given cells change
        sol = _parse_grid(inst.answer)
        relabel = {1: 2, 2: 3, 3: 4, 4: 1}
        other = [[relabel[v] for v in row] for row in sol]
        assert other[r][c] != puzzle[r][c]
        assert not task.score(inst, _fmt(other)).valid


@pytest.mark.parametrize("blanks", [4, 8, 12])
def test_sudoku_unique_and_exact(blanks):
    task = TASKS["sudoku"]
    for inst in task.generate(2, 15, blanks=blanks):
        puzzle = _parse_grid(inst.prompt.split(" ", 1)[1])
        assert sum(v == 0 for row in puzzle for v in row) == blanks
        sols = _solve_all(puzzle, boxes=True)
        assert len(sols) == 1 and _fmt(sols[0]) == inst.answer
        sol = [list(r) for r in sols[0]]
        bad = [r[:] for r in sol]
        k = next(k for k in range(16) if puzzle[k // 4][k % 4] == 0)
        bad[k // 4][k % 4] = bad[k // 4][k % 4] % 4 + 1  # one wrong cell
        s = task.score(inst, _fmt(bad))
        assert not s.valid and not s.exact and s.partial == pytest.approx(18 / 19)
    # a latin square that breaks a box is rejected even where the givens allow it
    latin_only = [[1, 2, 3, 4], [2, 3, 4, 1], [3, 4, 1, 2], [4, 1, 2, 3]]
    inst = task.generate(0, 1, blanks=4)[0]
    assert not task.score(inst, _fmt(latin_only)).valid


# ---------------------------------------------------------------------------- addition

def test_addition():
    task = TASKS["add"]
    for knobs in ({}, {"digits": 6, "min_digits": 1}, {"digits": 3, "operands": 3}):
        insts = task.generate(9, N, **knobs)
        for inst in insts:
            nums = [int(x) for x in inst.prompt.split(" ", 1)[1].split(" + ")]
            assert inst.answer == str(sum(nums))
            d = list(inst.answer)
            d[-1] = str((int(d[-1]) + 1) % 10)  # one wrong digit
            s = task.score(inst, "".join(d))
            assert not s.valid and s.partial == pytest.approx(1 - 1 / len(d))
            assert not task.score(inst, "0" + inst.answer).valid  # leading zero
            assert not task.score(inst, " ".join(inst.answer)).valid or len(inst.answer) == 1  # split digits
    carries = [i for i in task.generate(0, 200) if len(i.answer) > max(len(x) for x in i.prompt.split()[1::2])]
    assert carries  # some sums gain a digit


# ---------------------------------------------------------------------------- words to sentence

def _category_regex():
    from dllm_jax.tasks import text

    cats = {}
    for letter, group in (("D", text.DETS), ("A", text.ADJS), ("N", text.NOUNS), ("I", text.VERBS_INTR),
                          ("T", text.VERBS_TR), ("P", text.PREPS)):
        for w in group:
            cats[w] = letter
    np_ = "DA*N(?:PDA*N)*"  # NP -> Det Adj* N PP*, PP -> P NP, flattened: a regular language
    return cats, re.compile(f"{np_}(?:I|T{np_})(?:PDA*N)*")


def _grammatical(toks):
    cats, rx = _category_regex()
    return all(t in cats for t in toks) and rx.fullmatch("".join(cats[t] for t in toks)) is not None


def test_words_to_sentence_small_bags_exhaustive():
    task = TASKS["words_to_sentence"]
    multi = 0
    for level in ("easy", "medium"):
        for inst in task.generate(0, 8, level=level):
            bag = inst.prompt.split()[1:]
            assert bag == sorted(bag) and sorted(inst.answer.split()) == bag
            assert _grammatical(inst.answer.split())
            n_valid = 0
            for perm in set(itertools.permutations(bag)):
                s = task.score(inst, " ".join(perm))
                assert s.valid == _grammatical(perm)
                assert (s.partial == 1.0) if s.valid else (s.partial == 0.5)
                n_valid += s.valid
            assert n_valid >= 1
            multi += n_valid > 1
    assert multi >= 6  # several grammatical orders are the rule at medium level


def test_words_to_sentence_hard_orders_and_corruptions():
    task = TASKS["words_to_sentence"]
    rng = np.random.default_rng(0)
    for inst in task.generate(1, 30, level="hard"):
        toks = inst.answer.split()
        assert _grammatical(toks)
        for _ in range(30):  # random reorderings agree with the regular-language reference
            perm = list(rng.permutation(toks))
            assert task.score(inst, " ".join(perm)).valid == _grammatical(perm)
        s = task.score(inst, " ".join(toks[:-1]))  # missing word
        assert not s.valid and 0 < s.partial < 1
        s = task.score(inst, " ".join(toks + ["the"]))  # extra word
        assert not s.valid
    # hand-made alternatives: subject/object swap, PP moved between attachment sites
    from dllm_jax.tasks.base import Instance
    inst = Instance("words_to_sentence", "", "the big cat near a dog sees my fox",
                    {"bag": tuple(sorted("the big cat near a dog sees my fox".split()))})
    for order in ("the big cat sees my fox near a dog", "my fox near a dog sees the big cat",
                  "my fox sees the big cat near a dog", "the cat near a big dog sees my fox",
                  "a dog near my fox sees the big cat"):
        assert task.score(inst, order).valid, order
    for order in ("the big cat near a dog my fox sees", "big the cat near a dog sees my fox",
                  "the big cat near a dog sees my", "the big cat near a dog sees my fox fox"):
        assert not task.score(inst, order).valid, order


# ---------------------------------------------------------------------------- tokenizer

def test_special_ids_and_vocab(tok):
    vocab = task_vocabulary()
    assert vocab[:5] == ["<pad>", "<eos>", "<mask>", "<bos>", "<unk>"]
    assert (PAD_ID, EOS_ID, MASK_ID, BOS_ID, UNK_ID) == (0, 1, 2, 3, 4)
    assert tok.pad_id == PAD_ID and tok.eos_id == EOS_ID and tok.bos_id == BOS_ID
    assert tok.token_id("mask_token") == MASK_ID and tok.token_id("unk_token") == UNK_ID
    assert tok.vocab_size == len(vocab) == len(set(vocab))
    assert tok.encode("sort: 9 4 7 1") == tok.encode("sort: 9 4 7 1", add_special_tokens=False)  # no BOS added
    assert tok.backend.encode("add: 457 + 68").tokens == ["add:", "4", "##5", "##7", "+", "6", "##8"]
    assert UNK_ID in tok.encode("sort: cats 9")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_tokenizer_round_trip_and_length_bounds(tok, case):
    name, knobs = case
    task = TASKS[name]
    max_a, max_p = task.max_answer_tokens(**knobs), task.max_prompt_tokens(**knobs)
    longest_a = 0
    for split in ("train", "test"):
        for inst in task.generate(11, 60, split, **knobs):
            for text, bound in ((inst.prompt, max_p), (inst.answer, max_a)):
                ids = tok.encode(text)
                assert UNK_ID not in ids, text
                assert tok.decode(ids) == text
                assert len(ids) <= bound, (text, bound)
            a_ids = encode_answer(tok, inst.answer, max_a)
            assert len(a_ids) == max_a and decode_answer(tok, a_ids) == inst.answer
            assert decode_answer(tok, a_ids + [MASK_ID]) == inst.answer
            longest_a = max(longest_a, len(tok.encode(inst.answer)))
    if name in ("latin", "sudoku") or not knobs:
        assert longest_a >= max_a - 2  # the bound is tight enough to be useful
    with pytest.raises(ValueError, match="more than the answer length"):
        encode_answer(tok, inst.answer, len(tok.encode(inst.answer)) - 1)


def test_decode_of_model_output(tok):
    # what a model emits: answer tokens, then EOS padding (MASK/PAD dropped as specials)
    ids = tok.encode("5 2 5") + [EOS_ID, EOS_ID]
    assert decode_answer(tok, ids) == "5 2 5"
    ids = tok.encode("525") + [EOS_ID, PAD_ID]
    assert decode_answer(tok, ids) == "525"
    assert TASKS["add"].score(TASKS["add"].generate(0, 1)[0], decode_answer(tok, [EOS_ID] * 4)).valid is False
