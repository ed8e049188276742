"""Decoding controllers: who decides which masked tokens to commit at each step.

`make_controller(name, **options)` builds one by name (the CLI and benchmarks use it) from
the registry (`controllers/registry.py`); `decode.py` never learns the names. Each controller
module registers its own controllers with `@register(name)` on an options dataclass; a new
controller is one new module, imported below so that it registers when `controllers` is.
"""

from __future__ import annotations

# Each of these modules registers its controllers on import.
from controllers import (baselines, ce, entropy_bound, r2,  # noqa: F401  (registration)
                         r2_centred, left_to_right, simsd, tspd, ce_fitted)
from controllers.base import Controller, at_least_one, top_k_commit
from controllers.baselines import (DREAM_ALGS, DreamOrder, Factor, LowConfidence, Threshold,
                                  uses_time_grid)
from controllers.ce import CE
from controllers.ce_fitted import CE_FILE, CEFit, CEFitError, read_ce_fit
from controllers.entropy_bound import EntropyBound
from controllers.left_to_right import LeftToRight
from controllers.r2 import R2
from controllers.r2_centred import R2_AGGS, R2Centred
from controllers.registry import (ControllerOptions, OptionError, applicable_options,
                                  controller_names, get_spec, make_controller, option, register,
                                  require, shared_options)
from controllers.simsd import SimSD
from controllers.tspd import TSPD, TSPD_FILE, TSPDError, TSPDParams, load_tspd, read_tspd
from dllm_jax.features import CEFilter

#: Controllers that work without fitted parameters (`make_controller(name)` always succeeds).
CONTROLLER_NAMES: tuple[str, ...] = controller_names(fitted=False)
#: Controllers that need fitted parameters (`tspd.json`, `ce.json` next to the model).
FITTED_CONTROLLER_NAMES: tuple[str, ...] = controller_names(fitted=True)
ALL_CONTROLLER_NAMES: tuple[str, ...] = CONTROLLER_NAMES + FITTED_CONTROLLER_NAMES

__all__ = ["ALL_CONTROLLER_NAMES", "CE", "CEFilter", "CEFit", "CEFitError", "CE_FILE", "CONTROLLER_NAMES", "Controller",
           "ControllerOptions", "DREAM_ALGS", "DreamOrder", "EntropyBound", "FITTED_CONTROLLER_NAMES", "Factor",
           "LeftToRight", "LowConfidence", "OptionError", "R2", "R2Centred", "R2_AGGS", "SimSD", "TSPD", "TSPDError", "TSPDParams",
           "TSPD_FILE", "Threshold", "applicable_options", "at_least_one", "controller_names",
           "get_spec", "load_tspd", "make_controller", "option", "read_ce_fit", "read_tspd", "register",
           "require", "shared_options", "top_k_commit", "uses_time_grid"]
