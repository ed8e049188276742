"""Measurement of the quality bench: decode every (task, setting), one record per pair.

All instances of a setting, across every task, go through the same stream of `generate`
calls (`scoring.decode_and_score_mixed`), each call `[batch_size, width]` with ONE prompt
width for all tasks, so a setting compiles once whatever the number of tasks.

Metrics of one (task, setting) record, over its n held-out answers:

- accuracy: fraction of valid answers (the task's scorer); ci_low / ci_high: the Wilson 95 %
  score interval of that fraction (`stats.wilson_interval`).
- nfe_mean: mean forward passes (model evaluations) per answer.
- content_tpf: content tokens per forward, as a RATIO OF TOTALS: sum over answers of content
  tokens / sum over answers of NFE (`stats.content_tokens_per_forward`); equal to
  content_mean / nfe_mean, so pooling records (weights n) stays exact.
- content_fraction: mean over answers of content tokens / gen_length, in [0, 1].
Content tokens of an answer: its positions up to and including the first EOS (all gen_length
positions without one), `stats.content_token_counts`; EOS padding after it is not counted.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence, TextIO

import numpy as np

from dllm_jax import progress
from dllm_jax.bench import stats
from dllm_jax.bench.settings import Setting
from dllm_jax.config import ConfigError

#: The record fields every consumer may rely on, in this order (issue 12, item 3).
RECORD_FIELDS = ("task", "dependency", "setting", "n", "accuracy", "ci_low", "ci_high",
                 "nfe_mean", "content_tpf", "content_fraction")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The decode shape shared by every setting of a run (all in tokens).

    width: prompt columns (the longest prompt over all tasks); gen_length: answer positions;
    block_length: semi-autoregressive block (divides gen_length).
    """

    width: int
    gen_length: int
    block_length: int


@dataclasses.dataclass(frozen=True)
class Record:
    """One (task, setting) measurement; `to_json` gives RECORD_FIELDS first, then the rest.

    Fractions (accuracy, ci_low, ci_high, exact, partial, content_fraction) lie in [0, 1];
    nfe_mean is forwards per answer; content_mean is content tokens per answer; n_valid is the
    count of valid answers (accuracy = n_valid / n); gen_length / block_length / steps are the
    decode's (tokens, tokens, step budget).
    """

    task: str
    dependency: str
    setting: str
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    nfe_mean: float
    content_tpf: float
    content_fraction: float
    family: str = ""
    cache: str = "none"
    exact: float = 0.0
    partial: float = 0.0
    n_valid: int = 0
    content_mean: float = 0.0
    gen_length: int = 0
    block_length: int = 0
    steps: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Record":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def make_record(task: Any, setting: Setting, scored: Sequence[Any], eos_id: int,
                layout: Layout) -> Record:
    """The record of `scored` (`scoring.Scored` with `row`: the `[gen_length]` answer ids)."""
    n = len(scored)
    if n == 0:
        raise ValueError(f"{task.name} / {setting.label}: no answers to measure.")
    rows = np.asarray([s.row for s in scored], dtype=np.int64)          # [n, gen_length]
    nfe = np.asarray([s.nfe for s in scored], dtype=np.float64)        # [n]
    counts = stats.content_token_counts(rows, eos_id)                   # [n]
    n_valid = int(sum(bool(s.score.valid) for s in scored))
    low, high = stats.wilson_interval(n_valid, n)
    return Record(
        task=task.name, dependency=task.dependency, setting=setting.label, n=n,
        accuracy=n_valid / n, ci_low=low, ci_high=high, nfe_mean=float(nfe.mean()),
        content_tpf=stats.content_tokens_per_forward(rows, nfe, eos_id),
        content_fraction=stats.content_fraction(rows, eos_id),
        family=setting.family, cache=setting.cache_mode,
        exact=float(np.mean([bool(s.score.exact) for s in scored])),
        partial=float(np.mean([float(s.score.partial) for s in scored])),
        n_valid=n_valid, content_mean=float(counts.mean()),
        gen_length=layout.gen_length, block_length=layout.block_length,
        steps=setting.steps(layout.gen_length))


@dataclasses.dataclass
class BenchResult:
    """What a run measured.

    records: one per (task, setting) run, settings in run order, tasks in the order given.
    skipped: one sentence per setting that does not apply here (no tspd.json, k not dividing
      the block), in list order.
    not_run: labels of the settings not started because the time budget was spent.
    seconds: wall seconds per setting run (compile included).
    """

    records: list[Record] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    not_run: list[str] = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)


def make_instances(tasks: Mapping[str, Any], n: int, seed: int) -> dict[str, list[Any]]:
    """`n` held-out (split='test') instances of each task, seeded (one ConfigError sentence
    when a task cannot supply n distinct ones)."""
    out = {}
    for name, task in tasks.items():
        try:
            out[name] = task.generate(seed, n, split="test")
        except ValueError as e:
            raise ConfigError(f"--n {n}: {e}") from None
    return out


def evaluate(params: Any, cfg: Any, tokenizer: Any, tasks: Mapping[str, Any],
             instances: Mapping[str, Sequence[Any]], settings: Sequence[Setting],
             layout: Layout, *, batch_size: int, model_dir: Any = None,
             time_budget: float | None = None, log: TextIO | None = None,
             clock: Callable[[], float] = time.monotonic,
             draft: tuple[Any, Any] | None = None) -> BenchResult:
    """Decode and score every task's instances under every setting, settings in list order.

    Args:
      params, cfg, tokenizer: the model (`session.Session` fields).
      tasks: name -> Task; instances: name -> its held-out instances (`make_instances`).
      settings: in priority order; those whose `unavailable(...)` gives a reason are skipped
        (the reason goes to `skipped`).
      layout: the decode shape of every setting (one compile per setting).
      batch_size: rows per `generate` call (all tasks' instances share the calls).
      model_dir: the model folder (fitted controller files).
      time_budget: seconds from the call; a setting is started only while the time spent is
        below it (a started setting always finishes). None: no limit.
      log: progress lines (one per setting) go here.
      clock: seconds (tests pass a fake one).
      draft: (params, cfg) of a draft model (`--draft-model`): the speculative settings
        (controller with `verify`, simsd) draft with it; the others ignore it. None: the
        speculative settings self-draft.
    """
    from dllm_jax.config import GenerateConfig
    from dllm_jax.scoring import decode_and_score_mixed

    eos = tokenizer.eos_id if tokenizer.eos_id is not None else cfg.eos_token_id
    items = [(tasks[name], inst) for name in tasks for inst in instances[name]]
    result = BenchResult()
    runnable = []
    for st in settings:
        why = st.unavailable(model_dir, layout.gen_length, layout.block_length)
        if why is None and cfg.block_causal and (st.refresh_scope, st.refresh_blocks) != (
                "full", 1):
            why = (f"{st.label}: a block-causal model's cache is exact; a cheaper refresh does "
                   f"not apply.")
        if why is None:
            runnable.append(st)
        else:
            result.skipped.append(why)
            _say(log, f"  skipped: {why}")
    t0 = clock()
    pbar = progress.bar(len(runnable), "bench", quiet=log is None, unit="setting", stream=log)
    for i, st in enumerate(runnable):
        pbar.set_postfix_str(st.label)
        if time_budget is not None and clock() - t0 >= time_budget:
            result.not_run = [s.label for s in runnable[i:]]
            _say(log, f"  time budget spent; not run: {', '.join(result.not_run)}")
            break
        start = clock()
        gen = GenerateConfig(gen_length=layout.gen_length, block_length=layout.block_length,
                             steps=st.steps(layout.gen_length), cache=st.cache_mode,
                             refresh_scope=st.refresh_scope, refresh_blocks=st.refresh_blocks)
        controller = st.build(model_dir)
        scored = decode_and_score_mixed(
            params, cfg, tokenizer, items, gen, controller, batch_size=batch_size,
            width=layout.width, draft=draft if controller.verify is not None else None)
        offset = 0
        recs = []
        for name in tasks:
            k = len(instances[name])
            recs.append(make_record(tasks[name], st, scored[offset:offset + k], eos, layout))
            offset += k
        result.records.extend(recs)
        result.seconds[st.label] = clock() - start
        acc = sum(r.n_valid for r in recs) / max(1, sum(r.n for r in recs))
        nfe = sum(r.nfe_mean * r.n for r in recs) / max(1, sum(r.n for r in recs))
        _say(log, f"  [{i + 1}/{len(runnable)}] {st.label:24s} acc {100 * acc:5.1f}%  "
                  f"nfe {nfe:6.1f}  {result.seconds[st.label]:6.1f} s")
        pbar.update(1)
    pbar.close()
    return result


def _say(log: TextIO | None, line: str) -> None:
    if log is not None:
        progress.line(line, stream=log)


__all__ = ["BenchResult", "Layout", "RECORD_FIELDS", "Record", "evaluate", "make_instances",
           "make_record"]
