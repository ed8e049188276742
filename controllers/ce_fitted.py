"""`ce_fitted`: the CE controller with a filter and look-ahead fitted for the model.

`dllm-jax train-controller --model DIR --fit ce` (`dllm_jax.train.ce_fit_run`) fits the CE
filter (q, r, slope_var0) by maximum predictive likelihood on recorded decodes and chooses the
look-ahead (z, horizon) by coverage on a validation split; it writes them to DIR/ce.json
(`ce_fit_to_json`). `ce_fitted` reads that file and builds `controllers.ce.CE` with them; the
threshold and the stabilisation rule options stay CE's (and z / horizon may be overridden).

ce.json (strict JSON): {"format": "dllm-jax-ce", "version": 1, "ce_filter": {"q", "r",
"slope_var0"}, "z", "horizon", "calibrated", "threshold" (the one the choice was made for),
"coverage": [the `choose_z_h` table], "metrics": {...}}.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional

from controllers.ce import CE, CE_RULE_OPTIONS, CEOptions, CERuleOptions
from controllers.registry import option, register
from dllm_jax.config import ConfigError
from dllm_jax.features import CEFilter

CE_FILE = "ce.json"
CE_FORMAT = "dllm-jax-ce"
CE_VERSION = 1
FIT_COMMAND = "dllm-jax train-controller --model DIR --fit ce"


class CEFitError(ConfigError):
    """A ce.json that is missing or cannot be used; the message says how to make one."""


@dataclasses.dataclass(frozen=True)
class CEFit:
    """What ce.json holds: the filter, the look-ahead (z, horizon) and the record of the fit."""

    ce_filter: CEFilter
    z: float
    horizon: int
    calibrated: bool = True
    threshold: float = 0.9
    coverage: tuple[Mapping[str, Any], ...] = ()
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def ce_fit_to_json(fit: CEFit) -> dict[str, Any]:
    f = fit.ce_filter
    return {"format": CE_FORMAT, "version": CE_VERSION,
            "ce_filter": {"q": f.q, "r": f.r, "slope_var0": f.slope_var0},
            "z": fit.z, "horizon": fit.horizon, "calibrated": fit.calibrated,
            "threshold": fit.threshold, "coverage": [dict(r) for r in fit.coverage],
            "metrics": dict(fit.metrics)}


def _positive(d: Mapping[str, Any], key: str, zero_ok: bool = False) -> float:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{key} is {v!r}, not a number")
    v = float(v)
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        raise ValueError(f"{key} = {v} is out of range")
    return v


def ce_fit_from_json(d: Any, source: str = "CE fit file") -> CEFit:
    refit = f"refit it with `{FIT_COMMAND}`"
    if not isinstance(d, Mapping) or d.get("format") != CE_FORMAT:
        got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
        raise CEFitError(f"{source} is not a CE fit file (format {got!r}); {refit}.")
    if d.get("version") != CE_VERSION:
        raise CEFitError(f"{source} has version {d.get('version')!r}, this dllm-jax reads "
                         f"version {CE_VERSION}; {refit}.")
    try:
        cf = d["ce_filter"]
        filt = CEFilter(q=_positive(cf, "q", zero_ok=True), r=_positive(cf, "r"),
                        slope_var0=_positive(cf, "slope_var0"))
        z = _positive(d, "z", zero_ok=True)
        h = d["horizon"]
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise ValueError(f"horizon = {h!r} is not an integer >= 0")
        return CEFit(ce_filter=filt, z=z, horizon=int(h),
                     calibrated=bool(d.get("calibrated", True)),
                     threshold=float(d.get("threshold", 0.9)),
                     coverage=tuple(d.get("coverage") or ()), metrics=dict(d.get("metrics") or {}))
    except (KeyError, TypeError, ValueError) as e:
        what = f"lacks {e}" if isinstance(e, KeyError) else f"is damaged ({e})"
        raise CEFitError(f"{source} {what}; {refit}.") from None


def read_ce_fit(path: str | os.PathLike) -> CEFit:
    """The fit in `path` (a ce.json file, or a folder holding one); CEFitError when it is
    missing or unusable (one sentence naming the file and the command that makes it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CE_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except FileNotFoundError:
        raise CEFitError(f"no fitted CE filter at {path}; make it with `{FIT_COMMAND}`."
                         ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CEFitError(f"cannot read the CE fit {path} ({e}); refit it with "
                         f"`{FIT_COMMAND}`.") from None
    return ce_fit_from_json(d, source=path)


def resolve_ce_fit(ce_file: Any = None, model_dir: Any = None) -> CEFit:
    """`ce_file` (a CEFit, a ce.json file or a folder), else `model_dir/ce.json`, else the
    bundled model's."""
    if isinstance(ce_file, CEFit):
        return ce_file
    if ce_file is not None:
        return read_ce_fit(ce_file)
    if model_dir is None:
        try:
            from dllm_jax.pretrained import bundled_model_dir
            model_dir = bundled_model_dir()
        except Exception:  # no bundled model installed
            raise CEFitError(f"the 'ce_fitted' controller needs a model folder holding "
                             f"{CE_FILE}; make it with `{FIT_COMMAND}`.") from None
    return read_ce_fit(os.path.join(os.fspath(model_dir), CE_FILE))


@register("ce_fitted", fitted=True)
@dataclasses.dataclass(frozen=True)
class CEFittedOptions(CERuleOptions):
    """CE with the filter and look-ahead fitted for the model (MODEL/ce.json)."""

    # CE's rule options are CERuleOptions'; horizon and z default to the fitted ones
    horizon: Optional[int] = option(None, "CE look-ahead in steps (default: the fitted one)",
                                    example=2)
    z: Optional[float] = option(None, "width of the CE lower bound in sds (default: the "
                                      "fitted one)", example=1.0)
    ce_file: Any = option(None, f"a CEFit, or a {CE_FILE} file / folder (default: model_dir's)",
                          cli=False)
    model_dir: Any = option(None, f"model folder holding {CE_FILE} (default: the bundled model)",
                            cli=False)

    # validate(): CERuleOptions' (horizon / z None: the fitted ones, checked when read)

    def ce_options(self, fit: CEFit) -> CEOptions:
        """The `ce` options of these rule options with `fit`'s filter (and its horizon / z
        where these are None)."""
        kw = {k: getattr(self, k) for k in CE_RULE_OPTIONS}
        for k in ("horizon", "z"):
            if kw[k] is None:
                kw[k] = getattr(fit, k)
        f = fit.ce_filter
        return CEOptions(**kw, q=f.q, r=f.r, slope_var0=f.slope_var0)

    def build(self, name: str) -> CE:
        return self.ce_options(resolve_ce_fit(self.ce_file, self.model_dir)).build("ce")


__all__ = ["CEFit", "CEFitError", "CEFittedOptions", "CE_FILE", "CE_FORMAT", "CE_VERSION",
           "FIT_COMMAND", "ce_fit_from_json", "ce_fit_to_json", "read_ce_fit", "resolve_ce_fit"]
