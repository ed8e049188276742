"""Decoding controllers: who decides which masked tokens to commit at each step.

`make_controller(name, ...)` builds one by name (the CLI and benchmarks use it); `decode.py`
never learns the names.
"""

from __future__ import annotations

from typing import Any

from controllers.base import Controller, at_least_one, top_k_commit
from controllers.baselines import DREAM_ALGS, DreamOrder, Factor, LowConfidence, Threshold

CONTROLLER_NAMES: tuple[str, ...] = ("low_confidence", "random", "threshold", "factor",
                                     "maskgit_plus", "topk_margin", "entropy", "origin")


def make_controller(name: str, *, threshold: float = 0.9, factor: float = 1.0,
                    alg_temp: float = 0.0, eps: float = 1e-3) -> Any:
    """Build a controller by name; raises ValueError with the valid choices on bad input."""
    if name in ("low_confidence", "random"):
        return LowConfidence(remasking=name)
    if name == "threshold":
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}; e.g. --threshold 0.9.")
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
    raise ValueError(f"unknown controller {name!r}; choose one of {', '.join(CONTROLLER_NAMES)}.")


__all__ = ["CONTROLLER_NAMES", "Controller", "DreamOrder", "Factor", "LowConfidence",
           "Threshold", "at_least_one", "make_controller", "top_k_commit"]
