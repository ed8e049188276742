"""`dllm-jax bench quality` v2: settings as data, records and their JSON schema, content
counting on a hand-made decode, output checks before any work, skipped settings, the time
budget, decode layouts, tables and the plot. Tiny random models over the task tokenizer."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from dllm_jax.bench import quality, report, stats
from dllm_jax.bench.measure import RECORD_FIELDS, Layout, Record, evaluate
from dllm_jax.bench.settings import QUICK, Setting, all_settings, select
from dllm_jax.checkpoint import save_model
from dllm_jax.cli import main
from dllm_jax.config import ConfigError
from dllm_jax.models import init_params
from dllm_jax.tasks import TASKS, TASKS_V2
from dllm_jax.tasks.vocab import build_task_tokenizer
from dllm_jax.train import tiny_model_config


def _model_folder(root: Path, name: str, task_set: str, prompt: int, answer: int,
                  block_size: int = 0) -> tuple[Path, Any, Any, Any]:
    tok = build_task_tokenizer(root / "tok")
    cfg = tiny_model_config(vocab_size=tok.vocab_size, prompt_length=prompt,
                            answer_length=answer, block_size=block_size)
    params = init_params(cfg, jax.random.key(0), std=0.3)
    model_dir = root / name
    save_model(model_dir, cfg, params)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / f).write_text((root / "tok" / f).read_text())
    train = {"task_set": task_set, "answer_length": answer, "prompt_length": prompt,
             "block_diffusion": block_size > 0, "tasks": []}
    (model_dir / "train_config.json").write_text(json.dumps({"train": train}))
    return model_dir, cfg, params, tok


@pytest.fixture(scope="module")
def v1_model(tmp_path_factory: pytest.TempPathFactory):
    return _model_folder(tmp_path_factory.mktemp("qv1"), "model", "v1", 32, 32)


@pytest.fixture(scope="module")
def v2_model(tmp_path_factory: pytest.TempPathFactory):
    return _model_folder(tmp_path_factory.mktemp("qv2"), "model", "v2", 32, 128)


# ------------------------------------------------------------------------------ settings
def test_settings_cover_every_family_in_priority_order() -> None:
    ss = all_settings()
    labels = [s.label for s in ss]
    assert labels[:2] == ["llada k=1", "threshold 0.9"] and len(set(labels)) == len(labels)
    fams = {s.family for s in ss}
    assert {"llada k", "threshold", "factor", "dream", "r2", "ce", "tspd", "tspd+ce"} <= fams
    assert {s.steps_divisor for s in ss if s.family == "llada k"} >= {1, 2, 4}
    th = sorted(dict(s.options)["threshold"] for s in ss if s.family == "threshold")
    assert th[0] == 0.5 and th[-1] == 0.99 and 0.9 in th
    assert {s.controller for s in ss if s.family == "dream"} == {"maskgit_plus", "topk_margin",
                                                                 "entropy"}
    dual = [s for s in ss if s.cache == "dual" and s.family != "refresh"]
    assert dual and all(s.label.endswith(" dual") for s in dual)
    cheaper = {(s.refresh_scope, s.refresh_blocks) for s in ss if s.family == "refresh"}
    assert cheaper == {("answer", 1), ("full", 2)}
    # Every setting builds a valid controller (TSPD ones from the bundled model's files).
    from dllm_jax.pretrained import bundled_model_dir

    for s in ss:
        assert s.unavailable(bundled_model_dir(), 32, 32) is None
        s.build(bundled_model_dir())


def test_select_and_run_cache() -> None:
    ss = all_settings()
    got = select(ss, "threshold 0.9,llada k")
    assert [s.label for s in got][:2] == ["threshold 0.9", "llada k=1"]
    assert all(s.family == "llada k" for s in got[1:])
    with pytest.raises(ConfigError, match="--settings"):
        select(ss, "k=99")
    t = select(ss, "threshold 0.9")[0]
    assert t.with_run_cache("dual").label == "threshold 0.9 dual"
    assert t.with_run_cache("dual").cache_mode == "dual" and t.with_run_cache("none") is t
    from dllm_jax.bench.settings import dedupe

    both = dedupe(x.with_run_cache("dual") for x in select(ss, "threshold 0.9,threshold 0.9 dual"))
    assert [x.label for x in both] == ["threshold 0.9 dual"]
    own = select(ss, "ce dual")[0]
    assert own.with_run_cache("prefix") is own          # a setting's own cache wins
    for preset in QUICK.values():
        select(ss, ",".join(preset.settings))


def test_unavailable_settings(tmp_path: Path) -> None:
    tspd = select(all_settings(), "tspd+ce")[0]
    why = tspd.unavailable(tmp_path, 128, 32)
    assert why is not None and "no tspd.json" in why
    (tmp_path / "tspd.json").write_text("{}")
    assert tspd.unavailable(tmp_path, 128, 32) is None
    k8 = select(all_settings(), "llada k=8")[0]
    assert k8.unavailable(None, 128, 4) is not None and k8.unavailable(None, 128, 32) is None


# ------------------------------------------------------------------------------ metrics
def test_content_counting_on_a_hand_made_decode(v1_model, monkeypatch) -> None:
    """The decoder is replaced by one that returns hand-made answers and NFEs."""
    _, cfg, params, tok = v1_model
    task = TASKS["copy"]
    insts = task.generate(0, 3, split="test")
    G, eos, pad = 8, tok.eos_id, tok.pad_id
    good = [tok.encode(x.answer) for x in insts]
    rows = [good[0] + [eos] * (G - len(good[0])),                  # right, EOS-padded
            (good[1] + [5] * G)[:G],                               # wrong, no EOS at all
            good[2] + [eos] + [pad] * (G - len(good[2]) - 1)]      # right, one EOS then junk
    nfe = [4, 8, 2]
    content = [len(good[0]) + 1, G, len(good[2]) + 1]
    by_prompt = {tuple(tok.encode(x.prompt)): (r, f) for x, r, f in zip(insts, rows, nfe)}

    def fake_generate(params, cfg, ids, gen, controller, prompt_valid=None, key=None):
        out = [by_prompt[tuple(int(t) for t, v in zip(row, ok) if v)] for row, ok in
               zip(np.asarray(ids), np.asarray(prompt_valid))]
        return types.SimpleNamespace(tokens=np.array([o[0] for o in out]),
                                     stats=types.SimpleNamespace(nfe=np.array([o[1] for o in out])))

    monkeypatch.setattr("dllm_jax.decode.generate", fake_generate)
    setting = Setting("fake", "fake", "threshold", (("threshold", 0.9),))
    res = evaluate(params, cfg, tok, {"copy": task}, {"copy": insts}, [setting],
                   Layout(width=16, gen_length=G, block_length=G), batch_size=2)
    [r] = res.records
    assert (r.n, r.n_valid, r.accuracy) == (3, 2, 2 / 3)
    assert (r.ci_low, r.ci_high) == stats.wilson_interval(2, 3)
    assert r.nfe_mean == pytest.approx(14 / 3)
    # content_tpf is a ratio of totals: sum(content) / sum(NFE).
    assert r.content_tpf == pytest.approx(sum(content) / sum(nfe))
    assert r.content_fraction == pytest.approx(np.mean([c / G for c in content]))
    assert r.content_mean == pytest.approx(np.mean(content))
    # The one-task entry point gives the same rows (EOS padding included) and NFEs.
    from dllm_jax.config import GenerateConfig
    from dllm_jax.scoring import decode_and_score

    one = decode_and_score(params, cfg, tok, task, insts, GenerateConfig(G, G, G), None,
                           batch_size=2, width=16)
    assert [list(s.row) for s in one] == rows and [s.nfe for s in one] == nfe
    assert [s.ids for s in one] == good[:1] + [rows[1]] + good[2:]


def _rec(task: str, dep: str, setting: str, n: int, k: int, nfe: float,
         content: float = 10.0) -> Record:
    lo, hi = stats.wilson_interval(k, n)
    return Record(task, dep, setting, n, k / n, lo, hi, nfe, content / nfe, content / 64,
                  family=setting.split()[0], n_valid=k, content_mean=content, exact=k / n)


def test_pooling_and_target_table() -> None:
    rows = [_rec("riffle", "high", "llada k=1", 100, 100, 64), _rec("copy", "low", "llada k=1", 100, 100, 64),
            _rec("riffle", "high", "threshold 0.9", 100, 90, 20), _rec("copy", "low", "threshold 0.9", 100, 100, 10),
            _rec("riffle", "high", "tspd+ce", 100, 99, 12), _rec("copy", "low", "tspd+ce", 100, 100, 6),
            _rec("riffle", "high", "ce", 100, 95, 19), _rec("copy", "low", "ce", 100, 100, 10)]
    p = report.pool([r for r in rows if r.setting == "threshold 0.9"])
    assert (p.n, p.n_valid, p.nfe_mean) == (200, 190, 15.0)
    assert p.content_tpf == pytest.approx(20 / 30)          # total content / total NFE
    assert (p.ci_low, p.ci_high) == stats.wilson_interval(190, 200)
    text = report.targets_table(rows)
    assert "| tspd+ce | 99.5 [97.2, 99.9] | 9.00 | 40.0% | +4.5 | yes | 1.0 (riffle) | yes |" in text
    assert "| ce | 97.5 [94.3, 98.9] | 14.50 | 3.3% | +2.5 | yes | 5.0 (riffle) | no |" in text
    assert "no threshold" in report.targets_table([r for r in rows if r.setting == "ce"])
    md = report.markdown(rows, ["header"])
    for part in ("### Overall", "### By dependency level", "### Targets", "### Per task"):
        assert part in md
    assert "| high | tspd+ce | 1 | 100 | 99.0 [94.6, 99.8] | 12.0 | 0.83 |" in md


def test_plot_is_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [_rec("copy", "low", "llada k=1", 10, 9, 32), _rec("copy", "low", "llada k=2", 10, 7, 16),
            _rec("shuffle", "high", "llada k=1", 10, 8, 32), _rec("shuffle", "high", "threshold 0.9", 10, 5, 5)]
    path = tmp_path / "q.png"
    report.plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["q.png"]      # no temporary left


# ------------------------------------------------------------------------------ CLI
def _check_schema(records: list[dict[str, Any]]) -> None:
    for d in records:
        assert list(d)[:len(RECORD_FIELDS)] == list(RECORD_FIELDS)
        assert all(isinstance(d[k], str) for k in ("task", "dependency", "setting"))
        assert isinstance(d["n"], int) and d["n"] > 0
        for k in ("accuracy", "ci_low", "ci_high", "nfe_mean", "content_tpf", "content_fraction"):
            assert isinstance(d[k], float) and math.isfinite(d[k]), k
        assert 0.0 <= d["ci_low"] <= d["accuracy"] <= d["ci_high"] <= 1.0
        assert 0.0 < d["content_fraction"] <= 1.0 and d["nfe_mean"] >= 1.0
        assert d["content_tpf"] > 0 and d["dependency"] in ("low", "medium", "high")


def test_cli_json_schema_and_tables(v1_model, tmp_path: Path, capsys) -> None:
    model_dir = v1_model[0]
    js, md = tmp_path / "q.json", tmp_path / "q.md"
    rc = main(["bench", "quality", "--model", str(model_dir), "--tasks", "copy,shuffle",
               "--settings", "llada k=2,threshold 0.9", "--n", "4", "--gen-length", "8",
               "--json", str(js), "--out", str(md)])
    assert rc == 0
    records = json.loads(js.read_text())
    assert [(d["task"], d["setting"]) for d in records] == [
        ("copy", "llada k=2"), ("shuffle", "llada k=2"), ("copy", "threshold 0.9"),
        ("shuffle", "threshold 0.9")]
    _check_schema(records)
    by = {(d["task"], d["setting"]): d for d in records}
    assert by[("copy", "llada k=2")]["nfe_mean"] == 4.0        # k=2 on 8 positions
    assert all(d["gen_length"] == 8 and d["block_length"] == 8 for d in records)
    text = md.read_text()
    assert "| copy | low | llada k=2 | 4 |" in text and "### Targets" in text
    capsys.readouterr()
    assert main(["bench", "quality", "--model", str(model_dir), "--tasks", "nope"]) == 2
    assert "unknown tasks" in capsys.readouterr().err
    # int8 weights: the same records, the header says so; a bad value is one line
    q8 = tmp_path / "q8.md"
    assert main(["bench", "quality", "--model", str(model_dir), "--tasks", "copy",
                 "--settings", "threshold 0.9", "--n", "4", "--gen-length", "8",
                 "--quantize", "int8", "--out", str(q8)]) == 0
    assert "quantised to int8" in q8.read_text()
    capsys.readouterr()
    assert main(["bench", "quality", "--model", str(model_dir), "--quantize", "int4"]) == 2
    assert "--quantize must be int8" in capsys.readouterr().err


def test_v2_cli_uses_blocks_of_32(v2_model, tmp_path: Path) -> None:
    model_dir = v2_model[0]
    js = tmp_path / "q.json"
    rc = main(["bench", "quality", "--model", str(model_dir), "--tasks", "add_steps",
               "--settings", "llada k=4", "--n", "3", "--json", str(js)])
    assert rc == 0
    [d] = json.loads(js.read_text())
    _check_schema([d])
    assert (d["task"], d["gen_length"], d["block_length"], d["steps"]) == ("add_steps", 128, 32, 32)
    assert d["nfe_mean"] == 32.0


@pytest.mark.parametrize("flag", ["--json", "--out", "--plot"])
def test_missing_output_folder_fails_before_any_work(v1_model, tmp_path: Path, flag: str,
                                                     monkeypatch, capsys) -> None:
    def no_work(*a: Any, **k: Any) -> None:
        raise AssertionError("work started before the output check")

    monkeypatch.setattr(quality, "evaluate", no_work)
    monkeypatch.setattr(quality, "make_instances", no_work)
    monkeypatch.setattr("dllm_jax.session.load", no_work)
    path = tmp_path / "missing" / "x.out"
    assert main(["bench", "quality", "--model", str(v1_model[0]), flag, str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag} ") and "does not exist" in err and "\n" not in err


def test_plot_without_matplotlib_fails_first(tmp_path: Path, monkeypatch, capsys) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["bench", "quality", "--plot", str(tmp_path / "q.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and 'pip install -e ".[plot]"' in err


def test_tspd_skipped_with_a_note(v1_model, tmp_path: Path, capsys) -> None:
    js, md = tmp_path / "q.json", tmp_path / "q.md"
    rc = main(["bench", "quality", "--model", str(v1_model[0]), "--tasks", "copy",
               "--settings", "threshold 0.9,tspd+ce,tspd", "--n", "2", "--gen-length", "8",
               "--json", str(js), "--out", str(md)])
    assert rc == 0
    assert [d["setting"] for d in json.loads(js.read_text())] == ["threshold 0.9"]
    assert "no tspd.json" in capsys.readouterr().err
    assert "skipped: tspd+ce" in md.read_text() and "skipped: tspd:" in md.read_text()


def test_time_budget_stops_starting_settings(v1_model, tmp_path: Path) -> None:
    _, cfg, params, tok = v1_model
    ticks = iter(range(0, 10_000, 100))             # every clock reading advances 100 s
    insts = {"copy": TASKS["copy"].generate(0, 2, split="test")}
    settings = select(all_settings(), "llada k=4,llada k=2,threshold 0.9")
    res = evaluate(params, cfg, tok, {"copy": TASKS["copy"]}, insts, settings,
                   Layout(width=8, gen_length=8, block_length=8), batch_size=2,
                   time_budget=150, clock=lambda: float(next(ticks)))
    assert [r.setting for r in res.records] == ["llada k=4"]
    assert res.not_run == ["llada k=2", "threshold 0.9"]
    # From the command line: a budget of 0 runs nothing, and says so in the files.
    js, md = tmp_path / "q.json", tmp_path / "q.md"
    assert main(["bench", "quality", "--model", str(v1_model[0]), "--tasks", "copy", "--n", "2",
                 "--settings", "llada k=4,ce", "--time-budget", "0", "--gen-length", "8",
                 "--json", str(js), "--out", str(md)]) == 0
    assert json.loads(js.read_text()) == []
    assert "not run (time budget 0 s spent): llada k=4, ce" in md.read_text()


def test_layouts() -> None:
    v2 = {"add_steps": TASKS_V2["add_steps"]}                 # answers <= 101 tokens
    bi = tiny_model_config(prompt_length=32, answer_length=192)
    lay, notes = quality.choose_layout("v2", v2, 22, bi, 192)
    assert (lay.gen_length, lay.block_length, notes) == (192, 32, [])
    lay, notes = quality.choose_layout("v2", v2, 22, bi, 175)   # not a multiple of 32
    assert (lay.gen_length, lay.block_length) == (128, 32) and notes
    sdar = tiny_model_config(prompt_length=32, answer_length=192, block_size=4)
    assert quality.choose_layout("v2", v2, 22, sdar, 192)[0].block_length == 4
    v1 = {"copy": TASKS["copy"]}
    lay, _ = quality.choose_layout("v1", v1, 7, tiny_model_config(), 32)
    assert (lay.gen_length, lay.block_length) == (32, 32)
    with pytest.raises(ConfigError, match="--gen-length 64 is too short"):
        quality.choose_layout("v2", v2, 22, bi, None, gen_flag=64)
    with pytest.raises(ConfigError, match="maximum length"):
        quality.choose_layout("v2", v2, 100, bi, 192)
    assert quality.task_set_of(None, None) == "v1"
    assert quality.task_set_of(None, {"train": {"task_set": "v2"}}) == "v2"
    assert quality.task_set_of("v1", {"train": {"task_set": "v2"}}) == "v1"
