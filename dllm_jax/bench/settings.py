"""The controller settings of `dllm-jax bench quality`, as data, built in one place.

A :class:`Setting` is a frozen record: a label (what tables, `--settings` and the JSON say), a
family (one line per family in the plot), a registered controller name with its options, the
step budget as a divisor of the answer length (k tokens per step for the fixed schedules:
`steps = gen_length / k`) and its KV cache.

:func:`all_settings` lists them in PRIORITY order (references first, then the controllers the
issue's targets are about, then the sweeps): `--time-budget` runs them in this order and stops
starting new ones when the budget is spent, so the most important comparisons come first.

Families (issue 12, item 6):

==========  =================================================================================
llada k     LLaDA low-confidence remasking, k = 1, 2, 4, 8 tokens per step
threshold   Fast-dLLM threshold 0.5, 0.7, 0.8, 0.9, 0.95, 0.99
factor      Fast-dLLM factor 0.5, 1, 2 (dynamic threshold 1 - f / (n + 1))
dream       Dream's orders maskgit_plus, topk_margin, entropy at k = 2 tokens per step
r2          R2 (the authors' rules, registry defaults: threshold 0.9), R2 at threshold 0.7,
            and our earlier centred-window design (`r2_centred`, defaults)
ce          CE with the registry's default options (threshold 0.9 + look-ahead + hold), and
            at threshold 0.7 (`ce t=0.7`)
ce fitted   CE with the filter and look-ahead fitted for the model (`ce.json`, controller
            `ce_fitted`, made by `dllm-jax train-controller --fit ce`), threshold 0.9 / 0.7
tspd        TSPD fitted without the CE features (`tspd_noce.json`), tau fitted / 0.5 / 0.7 / 0.9
tspd+ce     TSPD fitted with the CE features (`tspd.json`), tau fitted / 0.5 / 0.7 / 0.9
dual        the dual-cache variants of llada k=1, threshold 0.9, ce, tspd and tspd+ce
            (label suffix " dual"; family: the base family + " dual")
simsd       SimSD speculative draft-and-verify, greedy, draft order left_to_right (`simsd`)
            and confidence (`simsd confidence`), self-drafting or drafting with the model of
            `--draft-model DIR` (:attr:`Setting.speculative`), and `left_to_right` (one token
            per step, the leftmost masked one: greedy left-to-right SimSD's exact tokens)
refresh     threshold 0.9 with the dual cache and a cheaper refresh (issue 14, item 3):
            "answer-refresh" (the prompt's keys/values kept from the first forward) and
            "refresh/2" (every second block start refreshes)
==========  =================================================================================

Every setting of a run decodes with the run's block length (`bench.quality.choose_layout`),
Dream's orders included, so that settings are compared on the same semi-autoregressive
schedule. TSPD and CE-fitted settings need their file in the model folder; without it they are skipped with a note
(:meth:`Setting.unavailable`), never an error. A fixed schedule needs k to divide the block
length (steps must split evenly over blocks); otherwise it is skipped the same way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Sequence

from dllm_jax.config import ConfigError

CACHES = ("none", "prefix", "dual")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One controller setting of the bench.

    Attributes:
      label: unique name in tables, JSON records and `--settings`.
      family: the controller family (plot lines, `--settings FAMILY`).
      controller: a name registered in `controllers.registry`.
      options: the controller's options as (name, value) pairs.
      steps_divisor: k: the step budget is `gen_length // k` (k tokens per step for the fixed
        schedules; 1 for the adaptive controllers, whose budget is then a cap of one token
        per step).
      cache: "none" | "prefix" | "dual" for a setting with its own cache; None follows the
        run's `--cache` (default "none").
      fitted_file: (option, file): the controller reads `model_dir/file` as option `option`
        (TSPD's `tspd`, ce_fitted's `ce_file`); the setting is unavailable when the file is
        missing.
      fit_command: the command that makes the fitted file (named in the unavailable note).
      refresh_scope, refresh_blocks: the cache's refresh (`GenerateConfig`; full, 1 =
        Fast-dLLM's).
    """

    label: str
    family: str
    controller: str
    options: tuple[tuple[str, Any], ...] = ()
    steps_divisor: int = 1
    cache: str | None = None
    fitted_file: tuple[str, str] | None = None
    fit_command: str = "dllm-jax train-controller"
    refresh_scope: str = "full"
    refresh_blocks: int = 1

    def __post_init__(self) -> None:
        if self.steps_divisor <= 0:
            raise ValueError(f"{self.label}: steps_divisor must be positive.")
        if self.cache is not None and self.cache not in CACHES:
            raise ValueError(f"{self.label}: cache must be one of {CACHES} or None.")

    @property
    def cache_mode(self) -> str:
        """The cache this setting decodes with ("none" when it follows an unset --cache)."""
        return self.cache or "none"

    def with_run_cache(self, cache: str | None) -> "Setting":
        """The setting under the run's `--cache`: a setting with its own cache keeps it; the
        others take `cache` (a label suffix " dual" / " prefix" marks the change)."""
        if self.cache is not None or cache in (None, "none"):
            return self
        return dataclasses.replace(self, label=f"{self.label} {cache}", cache=cache,
                                   family=f"{self.family} {cache}")

    def steps(self, gen_length: int) -> int:
        """The step budget of one decode of `gen_length` answer tokens."""
        return gen_length // self.steps_divisor

    def unavailable(self, model_dir: str | os.PathLike | None, gen_length: int,
                    block_length: int) -> str | None:
        """Why this setting cannot run here (one sentence), or None when it can."""
        if self.fitted_file is not None:
            path = os.path.join(os.fspath(model_dir or ""), self.fitted_file[1])
            if model_dir is None or not os.path.isfile(path):
                return (f"{self.label}: the model folder has no {self.fitted_file[1]} (fit it with "
                        f"`{self.fit_command}`).")
        k = self.steps_divisor
        if gen_length % k or block_length % k:
            return (f"{self.label}: {k} tokens per step does not divide the block length "
                    f"{block_length} (gen_length {gen_length}).")
        return None

    @property
    def speculative(self) -> bool:
        """Whether the controller verifies drafts (declares `verify`: simsd), so that it
        drafts with `--draft-model` when one is given. Fitted controllers (tspd, ce_fitted)
        commit by their own rule and are not built here (they read a file)."""
        from controllers import get_spec

        spec = get_spec(self.controller)
        return not spec.fitted and spec.build(**dict(self.options)).verify is not None

    def controller_options(self, model_dir: str | os.PathLike | None) -> dict[str, Any]:
        """The options for `make_controller` (the fitted file resolved in `model_dir`)."""
        kw = dict(self.options)
        if self.fitted_file is not None:
            if model_dir is None:
                raise ConfigError(f"{self.label} reads {self.fitted_file[1]} from the model "
                                  f"folder; pass the model folder.")
            kw[self.fitted_file[0]] = os.path.join(os.fspath(model_dir), self.fitted_file[1])
        return kw

    def build(self, model_dir: str | os.PathLike | None) -> Any:
        """The controller of this setting (`controllers.make_controller`)."""
        from controllers import make_controller

        return make_controller(self.controller, **self.controller_options(model_dir))


def _llada(k: int) -> Setting:
    return Setting(f"llada k={k}", "llada k", "low_confidence", (), k)


def _threshold(t: float) -> Setting:
    return Setting(f"threshold {t}", "threshold", "threshold", (("threshold", t),))


def _tspd(with_ce: bool, tau: float | None) -> Setting:
    name = "tspd+ce" if with_ce else "tspd"
    file = "tspd.json" if with_ce else "tspd_noce.json"
    label = name if tau is None else f"{name} tau={tau}"
    opts = () if tau is None else (("tau", tau),)
    return Setting(label, name, "tspd", opts, fitted_file=("tspd", file))


def _ce_fitted(t: float) -> Setting:
    return Setting(f"ce fitted t={t}", "ce fitted", "ce_fitted", (("threshold", t),),
                   fitted_file=("ce_file", "ce.json"),
                   fit_command="dllm-jax train-controller --fit ce")


def _dual(s: Setting) -> Setting:
    return dataclasses.replace(s, label=f"{s.label} dual", family=f"{s.family} dual",
                               cache="dual")


def all_settings() -> list[Setting]:
    """Every setting of the bench, in priority order (see the module docstring)."""
    ce = Setting("ce", "ce", "ce")
    tspd_ce, tspd = _tspd(True, None), _tspd(False, None)
    k1, t09 = _llada(1), _threshold(0.9)
    out = [k1, t09, tspd_ce, ce, tspd, _ce_fitted(0.9)]
    out += [_dual(s) for s in (t09, tspd_ce, ce, tspd, k1)]
    out += [_llada(k) for k in (2, 4, 8)]
    out += [_threshold(t) for t in (0.5, 0.7, 0.8, 0.95, 0.99)]
    out += [Setting(f"factor {f}", "factor", "factor", (("factor", f),)) for f in (0.5, 1.0, 2.0)]
    out += [Setting(f"dream {a} k=2", "dream", a, (), 2)
            for a in ("maskgit_plus", "topk_margin", "entropy")]
    out += [Setting("r2", "r2", "r2"), Setting("r2 t=0.7", "r2", "r2", (("threshold", 0.7),)),
            Setting("r2 centred", "r2", "r2_centred")]
    out += [Setting("ce t=0.7", "ce", "ce", (("threshold", 0.7),)), _ce_fitted(0.7)]
    out += [_tspd(True, tau) for tau in (0.5, 0.7, 0.9)]
    out += [_tspd(False, tau) for tau in (0.5, 0.7, 0.9)]
    out += [Setting("left_to_right", "simsd", "left_to_right"),
            Setting("simsd", "simsd", "simsd"),
            Setting("simsd confidence", "simsd", "simsd", (("draft_order", "confidence"),))]
    out += [dataclasses.replace(_dual(t09), label="threshold 0.9 dual answer-refresh",
                                family="refresh", refresh_scope="answer"),
            dataclasses.replace(_dual(t09), label="threshold 0.9 dual refresh/2",
                                family="refresh", refresh_blocks=2)]
    labels = [s.label for s in out]
    assert len(set(labels)) == len(labels), "setting labels must be unique"
    return out


#: Reference labels of the target table: one token per step and the threshold-0.9 baseline.
REFERENCE, BASELINE = "llada k=1", "threshold 0.9"


def select(settings: Sequence[Setting], spec: str | None) -> list[Setting]:
    """The settings named by `spec`: comma-separated labels or family names, run in the order
    given (a family expands to its settings in priority order). None: all of them.

    Raises ConfigError naming `--settings` for a name that is neither.
    """
    if spec is None:
        return list(settings)
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    if not wanted:
        raise ConfigError("--settings is empty; give setting labels or families, e.g. "
                          "--settings 'llada k=1,threshold 0.9'.")
    by_label = {s.label: s for s in settings}
    families = list(dict.fromkeys(s.family for s in settings))
    out: list[Setting] = []
    unknown = []
    for w in wanted:
        if w in by_label:
            out.append(by_label[w])
        elif w in families:
            out.extend(s for s in settings if s.family == w)
        else:
            unknown.append(w)
    if unknown:
        raise ConfigError(f"unknown settings {unknown} in --settings; valid labels: "
                          f"{', '.join(by_label)}; families: {', '.join(families)}.")
    return dedupe(out)


def dedupe(settings: Iterable[Setting]) -> list[Setting]:
    """Drop later settings whose label repeats an earlier one (order kept)."""
    seen: set[str] = set()
    out = []
    for s in settings:
        if s.label not in seen:
            seen.add(s.label)
            out.append(s)
    return out


@dataclasses.dataclass(frozen=True)
class QuickPreset:
    """What `--quick` runs (explicit --tasks / --n / --settings override it).

    tasks: low-, medium- and high-dependency tasks; n: instances per task; settings: labels,
    in priority order; time_budget: seconds after which no new setting starts (unless
    --time-budget is given), so a larger or slower model still finishes in time.
    """

    tasks: tuple[str, ...]
    n: int
    settings: tuple[str, ...]
    time_budget: float = 420.0


#: `--quick` per task set, sized for a 2-core CPU with a bundled-size (4.6M) model: v1 about
#: 4 minutes (bundled model); v2 (answers of 192 positions, uncached settings at up to one
#: token per step) about 100 s per uncached setting of 24 answers, so its time budget decides.
QUICK: dict[str, QuickPreset] = {
    "v1": QuickPreset(tasks=("copy", "sort", "shuffle", "latin"), n=100,
                      settings=("llada k=1", "threshold 0.9", "tspd+ce", "ce", "tspd",
                                "threshold 0.9 dual", "tspd+ce dual", "llada k=2", "llada k=4",
                                "threshold 0.7", "factor 1.0", "dream maskgit_plus k=2",
                                "r2")),
    "v2": QuickPreset(tasks=("record", "add_steps", "riffle"), n=8,
                      settings=("llada k=1", "threshold 0.9", "tspd+ce", "ce",
                                "threshold 0.9 dual", "tspd+ce dual", "llada k=4")),
}


__all__ = ["BASELINE", "CACHES", "QUICK", "QuickPreset", "REFERENCE", "Setting", "all_settings",
           "dedupe", "select"]
