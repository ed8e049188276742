"""dllm_jax.tasks v2: generators checked against independent re-computations written here,
validity checkers (accept every reference and alternative valid answers, reject corrupted
ones), the split (disjoint by prompt AND by answer), the vocabulary and the length bounds."""

from __future__ import annotations

import dataclasses
import heapq
import importlib
import json
import re

import numpy as np
import pytest

from dllm_jax.tasks import TASKS, TASKS_V2, get_task, get_task_v2, split_of, split_of_any, tasks_v2_by_dependency
from dllm_jax.tasks.base import Score
from dllm_jax.tasks.text import VERBS_TR, is_sentence
from dllm_jax.tasks.v2_base import V2_TOKENS, answer_split, count_tokens, split_of_v2
from dllm_jax.tasks.v2_puzzles import intercalates, parse_grid
from dllm_jax.tasks.v2_reasoning import EvalStepsTask
from dllm_jax.tasks.vocab import UNK_ID, build_backend, task_vocabulary

V1_NAMES = ["copy", "reverse", "sort", "insert", "insert_random", "remove", "remove_random", "replace",
            "replace_random", "shuffle", "latin", "sudoku", "add", "words_to_sentence"]
SEEDS = (0, 1, 2)
PER_SEED = 12


@pytest.fixture(scope="module")
def backend():
    return build_backend()


@pytest.fixture(scope="module")
def samples():
    """Per task: instances of both splits at the default difficulty (3 seeds each)."""
    out = {}
    for name, task in TASKS_V2.items():
        insts = []
        for seed in SEEDS:
            insts += task.generate(seed, PER_SEED, "train") + task.generate(seed, 4, "test")
        out[name] = insts
    return out


# ---------------------------------------------------------------------------- registry


def test_registry_is_separate_and_complete():
    assert list(TASKS) == V1_NAMES  # the bundled model and today's benchmark iterate over TASKS
    assert 8 <= len(TASKS_V2) <= 12 and not set(TASKS) & set(TASKS_V2)
    assert {t.dependency for t in TASKS_V2.values()} == {"low", "medium", "high"}
    assert {t.category for t in TASKS_V2.values()} == {"lists", "reasoning", "puzzles", "text"}
    assert sum(len(tasks_v2_by_dependency(lv)) for lv in ("low", "medium", "high")) == len(TASKS_V2)
    assert get_task_v2("path") is TASKS_V2["path"]
    with pytest.raises(ValueError, match="valid v2 tasks: .*sudoku9"):
        get_task_v2("sort")
    with pytest.raises(ValueError, match="valid tasks"):
        get_task("sort_long")  # v1 lookup does not see v2 tasks
    for name, t in TASKS_V2.items():
        assert t.name == name and t.description and t.keyword == f"{name}:"
        # the module docstring states the task's dependency level (and the reason next to it)
        doc = importlib.import_module(type(t).__module__).__doc__
        assert name in doc and f"'{t.dependency}'" in doc, name
    with pytest.raises(ValueError, match="valid knobs"):
        TASKS_V2["sort_long"].generate(0, 2, lenght=3)
    with pytest.raises(ValueError, match="split"):
        TASKS_V2["sort_long"].generate(0, 2, split="dev")


def test_bounds_in_range_and_respected(samples, backend):
    for name, task in TASKS_V2.items():
        max_a, max_p = task.max_answer_tokens(), task.max_prompt_tokens()
        assert 64 <= max_a <= 256, (name, max_a)
        lengths = []
        for inst in samples[name]:
            a, p = backend.encode(inst.answer).ids, backend.encode(inst.prompt).ids
            assert len(a) <= max_a and len(p) <= max_p, (name, len(a), len(p))
            assert count_tokens(inst.answer) == len(a) and count_tokens(inst.prompt) == len(p)
            lengths.append(len(a))
        # almost all content: padding to the bound is at most a quarter of the answer positions
        assert np.mean(lengths) >= 0.75 * max_a, (name, np.mean(lengths), max_a)
        assert min(lengths) >= 64, (name, min(lengths))


# ---------------------------------------------------------------------------- vocabulary


def test_vocabulary_appends_only():
    vocab = task_vocabulary()
    bundled = "dllm_jax/pretrained/tasks-llada-4.6m/tokenizer.json"
    with open(bundled, encoding="utf-8") as f:
        old = json.load(f)["model"]["vocab"]
    assert len(old) == 115
    assert all(vocab[i] == tok for tok, i in old.items())  # every id of the bundled model is unchanged
    assert vocab[len(old):] == list(V2_TOKENS)
    assert {t.keyword for t in TASKS_V2.values()} <= set(V2_TOKENS)
    assert len(set(vocab)) == len(vocab)


def test_no_unk_and_round_trip(samples, backend):
    for name, insts in samples.items():
        for inst in insts:
            for text in (inst.prompt, inst.answer):
                enc = backend.encode(text)
                assert UNK_ID not in enc.ids, (name, text)
                assert backend.decode(enc.ids) == text
        assert insts[0].prompt.startswith(f"{name}: ")


# ---------------------------------------------------------------------------- validity checkers


def _corruptions(name: str, answer: str, rng: np.random.Generator) -> list[str]:
    """Corrupted answers that are invalid by construction (see the comments)."""
    toks = answer.split()
    out = ["", " ".join(toks[:-1]), answer + " " + toks[-1], " ".join(toks[:len(toks) // 2])]
    digit_pos = [i for i, t in enumerate(toks) if t.isdigit()]
    word_pos = [i for i, t in enumerate(toks) if t.isalpha()]
    if name != "sentences":
        # one number changed: a different answer for single-answer tasks; for latin9 a row
        # repeats a value, for riffle an item is foreign, for eval_steps a step is no reduction
        for i in rng.choice(digit_pos, size=min(3, len(digit_pos)), replace=False):
            t = list(toks)
            v = int(t[i])
            t[i] = str(v + 1 if name != "latin9" else v % 9 + 1)
            out.append(" ".join(t))
        # two different adjacent words swapped: for latin9 a column repeats a value (rows and
        # columns are permutations), elsewhere the token order of a unique answer changes
        if name not in ("riffle",):  # swapping two riffle items can be another interleaving
            i = next(i for i in range(len(toks) - 1) if toks[i] != toks[i + 1] and toks[i].isdigit())
            t = list(toks)
            t[i], t[i + 1] = t[i + 1], t[i]
            out.append(" ".join(t))
    if name == "riffle":
        t = list(toks)
        t[0], t[-1] = t[-1], t[0]  # the first item cannot move to the end of its list
        out.append(" ".join(t))
    if name in ("latin9", "sudoku9"):
        # symbols 1 and 2 exchanged everywhere: still a latin square / sudoku, but the givens
        # (which hold both symbols) are not kept
        out.append(" ".join({"1": "2", "2": "1"}.get(t, t) for t in toks))
    if word_pos:
        # a word replaced by one that does not occur in the answer (changes a bag / a value)
        for i in rng.choice(word_pos, size=min(3, len(word_pos)), replace=False):
            t = list(toks)
            t[i] = next(w for w in ("zebra", "Zoe", "quiet", "lazy", "brave", "cow") if w not in toks)
            out.append(" ".join(t))
    return [c for c in out if c.split() != toks]


def test_reference_accepted_and_corruptions_rejected(samples):
    rng = np.random.default_rng(0)
    for name, task in TASKS_V2.items():
        for inst in samples[name]:
            assert task.score(inst, inst.answer) == Score(True, True, 1.0), name
            assert task.score(inst, "  " + inst.answer.replace(" ", "   ") + "\n") == Score(True, True, 1.0)
            for bad in _corruptions(name, inst.answer, rng):
                s = task.score(inst, bad)
                assert not s.valid and not s.exact and 0.0 <= s.partial < 1.0, (name, bad)


def test_partial_credit_orders_outputs(samples):
    """A nearly right output gets more partial credit than a mostly wrong one."""
    for name, task in TASKS_V2.items():
        inst = samples[name][0]
        toks = inst.answer.split()
        near = task.score(inst, " ".join(toks[:-1])).partial
        far = task.score(inst, " ".join(toks[: len(toks) // 4])).partial
        assert 0.0 <= far < near < 1.0, (name, far, near)


def test_alternative_valid_answers_accepted(samples):
    """Multi-answer tasks accept valid answers other than the reference."""
    # eval_steps: the leftmost-first reduction order
    task = TASKS_V2["eval_steps"]
    n_diff = 0
    for inst in samples["eval_steps"]:
        e = EvalStepsTask.expression(inst)
        state, order = 0, []
        for _ in range(e.m):
            i = e.ready(state)[0]
            order.append(i)
            state |= 1 << i
        alt = e.chain(order)
        n_diff += alt != inst.answer
        assert task.score(inst, alt).valid
    assert n_diff > 0
    # latin9: the blanked intercalate swapped
    task = TASKS_V2["latin9"]
    for inst in samples["latin9"]:
        grid, cells = list(parse_grid(inst.answer, 9)), inst.meta["cells"]
        quads = [q for q in intercalates(grid, 9)
                 if all(cells[r * 9 + c] == 0 for r in q[:2] for c in q[2:])]
        assert quads
        r1, r2, c1, c2 = quads[0]
        for r in (r1, r2):
            grid[r * 9 + c1], grid[r * 9 + c2] = grid[r * 9 + c2], grid[r * 9 + c1]
        alt = " / ".join(" ".join(map(str, grid[r * 9:(r + 1) * 9])) for r in range(9))
        assert alt != inst.answer and task.score(inst, alt) == Score(True, False, 1.0)
    # riffle: both concatenations
    task = TASKS_V2["riffle"]
    for inst in samples["riffle"]:
        left, right = (" ".join(map(str, inst.meta[k])) for k in ("left", "right"))
        assert task.score(inst, f"{left} {right}").valid and task.score(inst, f"{right} {left}").valid
    # sentences: subject and object swapped around the verb in every sentence
    task = TASKS_V2["sentences"]
    for inst in samples["sentences"]:
        alt = []
        for sent in inst.answer.split(" / "):
            w = sent.split()
            v = next(i for i, t in enumerate(w) if t in VERBS_TR)
            alt.append(" ".join(w[v + 1:] + [w[v]] + w[:v]))
        alt_text = " / ".join(alt)
        assert alt_text != inst.answer and task.score(inst, alt_text) == Score(True, False, 1.0)
        # and the sentences in the wrong order are not valid
        assert not task.score(inst, " / ".join(reversed(inst.answer.split(" / ")))).valid


# ---------------------------------------------------------------------------- generators vs independent checks


def _nums(text):
    return [int(x) for x in text.split() if x.isdigit()]


def test_add_steps_arithmetic(samples):
    task = TASKS_V2["add_steps"]
    insts = samples["add_steps"] + task.generate(3, 30, operands=3, digits=6, min_digits=2)
    for inst in insts:
        ops = [int(x) for x in inst.prompt.split(":", 1)[1].split("+")]
        steps, total = inst.answer.split(" | ")
        assert int(total) == sum(ops)
        width = max(len(str(x)) for x in ops)
        carry = 0
        cols = steps.split(" , ")
        assert len(cols) == width
        for i, col in enumerate(cols):
            lhs, rhs = col.split(" = ")
            terms = [int(x) for x in lhs.split(" + ")]
            assert terms[:-1] == [x // 10 ** i % 10 for x in ops] and terms[-1] == carry
            assert int(rhs) == sum(terms)
            carry = int(rhs) // 10
    assert any(len({len(str(x)) for x in i.meta["operands"]}) > 1 for i in insts)  # padded columns exercised


def test_mul_steps_arithmetic(samples):
    for inst in TASKS_V2["mul_steps"].generate(4, 30, digits=4, min_digits=1, factor_digits=3, min_factor_digits=1) \
            + samples["mul_steps"]:
        a, b = (int(x) for x in inst.prompt.split(":", 1)[1].split("*"))
        sections = inst.answer.split(" ; ")
        nb = len(str(b))
        assert len(sections) == (nb if nb == 1 else nb + 1)
        partials = []
        for j, sec in enumerate(sections[:nb]):
            e = int(str(b)[::-1][j])
            steps, p = sec.split(" | ")
            assert int(p) == a * e
            partials.append(int(p))
            carry = 0
            for i, st in enumerate(steps.split(" , ")):
                m = re.fullmatch(r"(\d) \* (\d) \+ (\d) = (\d+)", st)
                d, ee, c, t = (int(g) for g in m.groups())
                assert d == a // 10 ** i % 10 and ee == e and c == carry and t == d * e + c
                carry = t // 10
        final = sections[-1].split(" | ")[-1]
        assert int(final) == a * b
        if nb > 1:
            assert sum(p * 10 ** j for j, p in enumerate(partials)) == a * b


def test_eval_steps_each_step_keeps_the_value(samples):
    for inst in samples["eval_steps"] + TASKS_V2["eval_steps"].generate(5, 30, ops=3):
        expr = inst.prompt.split(":", 1)[1]
        value = eval(expr)  # noqa: S307 - the test's own arithmetic on generated digits and + - * ( )
        segs = inst.answer.split(" = ")
        assert len(segs) == expr.count("+") + expr.count("-") + expr.count("*")
        for k, seg in enumerate(segs):
            assert eval(seg) == value  # noqa: S307
            n_ops = sum(seg.count(o) for o in "+-*")
            assert n_ops == len(segs) - 1 - k  # exactly one operation fewer per step
        assert segs[-1] == str(value) and 0 <= value <= 99


def test_list_answers(samples):
    for inst in samples["sort_long"]:
        items = _nums(inst.prompt)
        assert len(set(items)) == len(items) == 30 and _nums(inst.answer) == sorted(items)
    for inst in samples["merge"]:
        left, right = (_nums(x) for x in inst.prompt.split(":", 1)[1].split("|"))
        assert left == sorted(left) and right == sorted(right) and _nums(inst.answer) == sorted(left + right)
    for inst in samples["riffle"]:
        left, right = (_nums(x) for x in inst.prompt.split(":", 1)[1].split("|"))
        out = _nums(inst.answer)
        assert sorted(out) == sorted(left + right)
        assert [x for x in out if x in left] == left and [x for x in out if x in right] == right


def _independent_dijkstra(names, edges, source):
    idx = {n: i for i, n in enumerate(names)}
    adj = {n: [] for n in names}
    for u, v, w in edges:
        adj[u].append((v, w))
        adj[v].append((u, w))
    dist = {source: 0}
    heap = [(0, source)]
    done = set()
    while heap:
        d, u = heapq.heappop(heap)
        if u in done:
            continue
        done.add(u)
        for v, w in adj[u]:
            if d + w < dist.get(v, 10 ** 9):
                dist[v] = d + w
                heapq.heappush(heap, (d + w, v))
    assert len(idx) == len(dist)
    return dist, adj


def test_path_answers(samples):
    for inst in samples["path"]:
        head, body = inst.prompt.split(":", 1)[1].split(" | ")
        source, target = head.split()
        edges = [(u, v, int(w)) for u, v, w in (e.split() for e in body.split(" , "))]
        names = sorted({u for u, _, _ in edges} | {v for _, v, _ in edges})
        dist, adj = _independent_dijkstra(names, edges, source)
        table, path = inst.answer.split(" | ")
        rows = [r.split() for r in table.split(" , ")]
        assert rows[0] == [source, "0"] and sorted(r[0] for r in rows) == names
        assert [(int(r[1]), r[0]) for r in rows] == sorted((dist[n], n) for n in names)
        for node, d, pred in rows[1:]:
            assert int(d) == dist[node]
            preds = [u for u, w in adj[node] if dist[u] + w == dist[node]]
            assert preds == [pred]  # a unique shortest-path predecessor, the one written
        p = path.split()
        assert p[0] == source and p[-1] == target
        weight = {frozenset((u, v)): w for u, v, w in edges}
        assert sum(weight[frozenset(x)] for x in zip(p, p[1:])) == dist[target]


def test_grid_answers(samples):
    from dllm_jax.tasks.v2_puzzles import is_valid_grid, solve_grid

    for name, box in (("latin9", None), ("sudoku9", (3, 3))):
        for inst in samples[name]:
            cells = inst.meta["cells"]
            grid = parse_grid(inst.answer, 9)
            g = np.array(grid).reshape(9, 9)
            assert all(sorted(r) == list(range(1, 10)) for r in list(g) + list(g.T))
            if box:
                assert all(sorted(g[r:r + 3, c:c + 3].ravel()) == list(range(1, 10))
                           for r in (0, 3, 6) for c in (0, 3, 6))
            assert all(c in (0, v) for c, v in zip(cells, grid))
            assert sum(c == 0 for c in cells) == TASKS_V2[name].difficulty()["blanks"]
            assert inst.prompt.split(":", 1)[1].split().count("_") == sum(c == 0 for c in cells)
            n_sol = len(solve_grid(cells, 9, box, 3))
            assert (n_sol == 1) if box else (n_sol >= 2)
            assert is_valid_grid(grid, 9, box)


def test_record_answers(samples):
    for inst in samples["record"] + TASKS_V2["record"].generate(6, 20, records=6, min_records=1):
        recs = [dict(kv.split(" = ") for kv in r.split(" , ")) for r in inst.prompt.split(":", 1)[1].strip().split(" ; ")]
        want = " , ".join("{ " + " , ".join(f"{k} : {r[k]}" for k in ("name", "age", "pet", "trait", "score")) + " }"
                          for r in recs)
        assert inst.answer == want


def test_sentences_answers(samples):
    for inst in samples["sentences"]:
        bags = [b.split() for b in inst.prompt.split(":", 1)[1].split(" / ")]
        sents = [s.split() for s in inst.answer.split(" / ")]
        assert len(bags) == len(sents) == 8
        for b, s in zip(bags, sents):
            assert b == sorted(b) and sorted(s) == b and is_sentence(s)


# ---------------------------------------------------------------------------- split


def test_split_rule_unit():
    # unique-answer tasks: the answer hash alone decides, whatever the prompt
    for a in ("1 2 3", "4 5 6", "7 8 9", "x y"):
        assert split_of_v2("sort_long", "p1", a, True) == split_of_v2("sort_long", "p2", a, True) == answer_split("sort_long", a)
    assert answer_split("t", "1  2\n3") == answer_split("t", "1 2 3")  # whitespace-normalised
    # several-answer tasks: both hashes must agree, else the instance is in no split
    seen = set()
    for i in range(400):
        p, a = f"prompt {i}", f"answer {i}"
        s = split_of_v2("riffle", p, a, False)
        ps, as_ = split_of("riffle", p), answer_split("riffle", a)
        assert s == (ps if ps == as_ else None)
        seen.add(s)
    assert seen == {"train", "test", None}


# collision-rich difficulties: many prompts share an answer, and (several-answer tasks) the
# same prompt comes with different reference answers, so a prompt-only split would leak
SMALL = {
    "sort_long": {"min_len": 4, "max_len": 4, "min_value": 100, "max_value": 108},
    "merge": {"total": 4, "min_part": 1, "min_value": 100, "max_value": 109},
    "riffle": {"total": 4, "min_part": 2, "min_value": 100, "max_value": 111},
    "add_steps": {"digits": 2, "min_digits": 1},
    "mul_steps": {"digits": 3, "min_digits": 1, "factor_digits": 1, "min_factor_digits": 1},
    "eval_steps": {"ops": 3, "max_leaf": 3},
    "path": {"nodes": 4, "extra_edges": 1, "max_weight": 3},
    "record": {"records": 1, "min_records": 1},
    "sentences": {"sentences": 1, "min_sentences": 1, "max_adjectives": 0, "min_pps": 0, "max_pps": 0},
}
N_TRAIN, N_TEST = 1500, 150


def _small_task(name, latin_blanks=8):
    task = TASKS_V2[name]
    if name == "latin9":
        return dataclasses.replace(task, size=4), {"blanks": latin_blanks}
    if name == "sudoku9":
        return dataclasses.replace(task, size=4, box=(2, 2)), {"blanks": 6}
    return task, SMALL[name]


@pytest.mark.parametrize("name", list(TASKS_V2))
def test_split_disjoint_by_prompt_and_answer(name):
    task, knobs = _small_task(name)
    n_train = N_TRAIN
    train = task.generate(0, n_train, "train", **knobs)
    test = task.generate(0, N_TEST, "test", **knobs)
    train2 = task.generate(1, n_train // 2, "train", **knobs)  # another seed: more train draws
    tr_p = {i.prompt for i in train + train2}
    tr_a = {i.answer for i in train + train2}
    assert len({i.prompt for i in train}) == len(train) and len({i.prompt for i in test}) == len(test)
    assert not tr_p & {i.prompt for i in test}
    assert not tr_a & {i.answer for i in test}
    assert all(split_of_any(task, i) == "train" for i in train + train2)
    assert all(split_of_any(task, i) == "test" for i in test)
    # deterministic in the seed, and a Generator is advanced
    assert [i.answer for i in task.generate(0, 20, "test", **knobs)] == [i.answer for i in test[:20]]
    rng = np.random.default_rng(3)
    assert task.generate(rng, 3, **knobs) != task.generate(rng, 3, **knobs)


def test_split_is_meaningful_and_unique_answers_are_functions():
    """The collision-rich settings do share answers across prompts (so answer disjointness is
    not implied by prompt disjointness); unique-answer tasks map a prompt to one answer;
    several-answer tasks give one prompt several references."""
    shared, multi = set(), set()
    for name in TASKS_V2:
        task, knobs = _small_task(name, latin_blanks=14)  # 14 blanks: few prompts, many completions
        rng = np.random.default_rng(9)
        by_prompt, by_answer = {}, {}
        for _ in range(1500):
            inst = task._sample(rng, **task.difficulty(**knobs))
            by_prompt.setdefault(inst.prompt, set()).add(inst.answer)
            by_answer.setdefault(inst.answer, set()).add(inst.prompt)
        if task.unique_answer:
            assert all(len(a) == 1 for a in by_prompt.values()), name
        elif any(len(a) > 1 for a in by_prompt.values()):
            multi.add(name)
        if any(len(p) > 1 for p in by_answer.values()):
            shared.add(name)
    assert {"sort_long", "merge", "riffle", "eval_steps", "latin9", "sudoku9"} <= shared
    assert {"eval_steps", "latin9", "riffle"} <= multi


def test_too_small_space_raises():
    with pytest.raises(ValueError, match="distinct test instances"):
        TASKS_V2["sort_long"].generate(0, 5, "test", min_len=2, max_len=2, min_value=100, max_value=102)


def test_knob_errors_are_sentences():
    for name, bad in (("sort_long", {"min_len": 1}), ("merge", {"min_part": 20}), ("add_steps", {"operands": 1}),
                      ("mul_steps", {"factor_digits": 5}), ("eval_steps", {"ops": 0}), ("latin9", {"blanks": 3}),
                      ("sudoku9", {"blanks": 60}), ("path", {"nodes": 30}), ("record", {"records": 0}),
                      ("sentences", {"sentences": 0})):
        with pytest.raises(ValueError, match=rf"^{name}: "):
            TASKS_V2[name].max_answer_tokens(**bad)
