"""Decoding controllers: who decides which masked tokens to commit at each step.

`make_controller(name, ...)` builds one by name (the CLI and benchmarks use it); `decode.py`
never learns the names.
"""

from __future__ import annotations

import os
from typing import Any

from controllers.base import Controller, at_least_one, top_k_commit
from controllers.baselines import DREAM_ALGS, DreamOrder, Factor, LowConfidence, Threshold
from controllers.ce import CE
from controllers.r2 import R2, R2_AGGS
from controllers.tspd import TSPD, TSPD_FILE, TSPDError, TSPDParams, load_tspd, read_tspd
from dllm_jax.features import CEFilter

#: Controllers that work without fitted parameters (`make_controller(name)` always succeeds).
CONTROLLER_NAMES: tuple[str, ...] = ("low_confidence", "random", "threshold", "factor",
                                     "maskgit_plus", "topk_margin", "entropy", "origin",
                                     "ce", "r2")
#: Controllers that need fitted parameters (`tspd.json` next to the model).
FITTED_CONTROLLER_NAMES: tuple[str, ...] = ("tspd",)
ALL_CONTROLLER_NAMES: tuple[str, ...] = CONTROLLER_NAMES + FITTED_CONTROLLER_NAMES


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _unit(name: str, value: float, flag: str, closed_low: bool = False) -> float:
    v = float(value)
    lo_ok = v >= 0.0 if closed_low else v > 0.0
    _check(lo_ok and v <= 1.0, f"{name} must be in {'[' if closed_low else '('}0, 1], got "
                               f"{value}; e.g. {flag}.")
    return v


def _load_tspd(tspd: Any, model_dir: Any) -> TSPD:
    if isinstance(tspd, TSPD):
        return tspd
    if tspd is not None:
        path = os.fspath(tspd)
        return load_tspd(path) if os.path.isdir(path) else read_tspd(path)
    if model_dir is None:
        try:
            from dllm_jax.pretrained import bundled_model_dir
            model_dir = bundled_model_dir()
        except Exception:  # no bundled model installed
            model_dir = None
    if model_dir is None or not os.path.exists(os.path.join(os.fspath(model_dir), TSPD_FILE)):
        raise TSPDError(
            "the 'tspd' controller needs fitted parameters: pass tspd=FILE or model_dir=DIR "
            f"holding {TSPD_FILE} (made by `dllm-jax train-controller --model DIR`).")
    return load_tspd(model_dir)


def make_controller(name: str, *, threshold: float = 0.9, factor: float = 1.0,
                    alg_temp: float = 0.0, eps: float = 1e-3,
                    horizon: int = 2, z: float = 1.0, q: float = CEFilter.q,
                    r: float = CEFilter.r, slope_var0: float = CEFilter.slope_var0,
                    lookahead: bool = True, stabilize: bool = True, flip_k: int = 2,
                    recent: int = 2, slope_tol: float = 0.0, flat_tol: float = 0.1,
                    tau: float | None = None, tspd: Any = None, model_dir: Any = None,
                    window: int = 1, agg: str = "mean", floor: float = 0.7, k: int = 3,
                    temporal_floor: float = 0.7, spatial: bool = True, temporal: bool = True
                    ) -> Any:
    """Build a controller by name; raises ValueError with the valid choices on bad input.

    threshold: Fast-dLLM's threshold; also the commit threshold of 'ce' and 'r2'.
    'ce' (controllers/ce.py): horizon, z, q, r, slope_var0, lookahead, stabilize, flip_k,
      recent, slope_tol, flat_tol.
    'tspd' (controllers/tspd.py): tspd (a TSPD, or a tspd.json file / folder), else
      model_dir/tspd.json, else the bundled model's; tau overrides the file's commit threshold.
    'r2' (controllers/r2.py): window, agg ('mean' | 'min'), floor, k, temporal_floor, spatial,
      temporal.
    """
    if name in ("low_confidence", "random"):
        return LowConfidence(remasking=name)
    if name in ("threshold", "ce", "r2"):
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}; e.g. --threshold 0.9.")
    if name == "threshold":
        return Threshold(threshold=float(threshold))
    if name == "factor":
        if not float(factor) > 0.0:
            raise ValueError(f"factor must be > 0, got {factor}; e.g. --factor 1.0.")
        return Factor(factor=float(factor))
    if name in DREAM_ALGS:
        if float(alg_temp) < 0:
            raise ValueError(f"alg_temp must be >= 0, got {alg_temp}.")
        if not 0.0 < float(eps) < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}.")
        return DreamOrder(alg=name, eps=float(eps), alg_temp=float(alg_temp))
    if name == "ce":
        _check(int(horizon) == horizon and horizon >= 0,
               f"horizon must be an integer >= 0 (steps ahead), got {horizon}.")
        _check(float(z) >= 0, f"z must be >= 0 (forecast sds), got {z}.")
        _check(int(flip_k) == flip_k and flip_k >= 1, f"flip_k must be an integer >= 1, got {flip_k}.")
        _check(int(recent) == recent and recent >= 1, f"recent must be an integer >= 1, got {recent}.")
        _check(float(slope_tol) >= 0 and float(flat_tol) >= 0,
               f"slope_tol and flat_tol must be >= 0, got {slope_tol} and {flat_tol}.")
        filt = CEFilter(q=float(q), r=float(r), slope_var0=float(slope_var0))
        return CE(threshold=float(threshold), horizon=int(horizon), z=float(z),
                  lookahead=bool(lookahead), stabilize=bool(stabilize), flip_k=int(flip_k),
                  recent=int(recent), slope_tol=float(slope_tol), flat_tol=float(flat_tol),
                  trajectory_filter=filt)
    if name == "r2":
        _check(int(window) == window and window >= 0,
               f"window must be an integer >= 0 (neighbours per side), got {window}.")
        _check(agg in R2_AGGS, f"agg must be one of {', '.join(R2_AGGS)}, got {agg!r}.")
        _check(int(k) == k and k >= 1, f"k must be an integer >= 1 (stable steps), got {k}.")
        return R2(threshold=float(threshold), window=int(window), agg=agg,
                  floor=_unit("floor", floor, "floor=0.7", closed_low=True), k=int(k),
                  temporal_floor=_unit("temporal_floor", temporal_floor, "temporal_floor=0.7",
                                       closed_low=True),
                  spatial=bool(spatial), temporal=bool(temporal))
    if name == "tspd":
        ctrl = _load_tspd(tspd, model_dir)
        if tau is not None:
            _check(0.0 < float(tau) < 1.0, f"tau must be in (0, 1), got {tau}; e.g. tau=0.5.")
            ctrl = ctrl.replace(tau=float(tau))
        return ctrl
    raise ValueError(f"unknown controller {name!r}; choose one of "
                     f"{', '.join(ALL_CONTROLLER_NAMES)}.")


__all__ = ["ALL_CONTROLLER_NAMES", "CE", "CEFilter", "CONTROLLER_NAMES", "Controller",
           "DreamOrder", "FITTED_CONTROLLER_NAMES", "Factor", "LowConfidence", "R2", "TSPD",
           "TSPDError", "TSPDParams", "Threshold", "at_least_one", "load_tspd",
           "make_controller", "top_k_commit"]
