"""TSPD: Temporal-Spatial Parallel Decoding (our design after arXiv 2605.30753; see
shared/SPEC.md "Our controllers").

A small model maps per-token features to p(converged), the probability that the token's
current candidate is the one a slow one-token-per-step decode ends with; the controller
commits every masked token with p > tau (at least one per row). The features (`FEATURES`,
plus `CE_FEATURES` when `use_ce`), all float32 `[B, Lb]`:

  logit_conf      logit(clip(confidence, 1e-6, 1 - 1e-6))
  norm_entropy    entropy / log(vocab_size)
  margin          top-1 minus top-2 probability
  momentum        smoothed confidence change (Trajectory.momentum)
  log_stable      log(1 + consecutive observations with the same candidate)
  log_flips       log(1 + candidate changes)
  rel_pos         position in the block / (Lb - 1)
  dist_committed  distance to the nearest committed position / Lb; the position just left
                  of the block (previous block or prompt, always decoded) counts as committed
  frac_committed  committed positions of the block / Lb (the same for the whole row)
  ce_mean         CE forecast of the log-odds `horizon` steps ahead (clipped to +-30)
  ce_log_sd       log of its standard deviation

The model (`TSPDParams`, a few hundred float32 leaves): x' = (x - x_mean) / x_scale,
    logit p = x' . w + b + tanh(x' W1 + b1) . w2
a logistic model plus a one-hidden-layer MLP residual (hidden = 0: logistic only). The
parameters are pytree LEAVES of the controller, so new values never recompile the decode.

Fitted parameters ship next to the model as `tspd.json` (`save_tspd` / `load_tspd`), written
by `dllm_jax.train.controller_fit` / `dllm-jax train-controller`, with the static settings they were fitted
with (features, vocab size, CE filter and horizon).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from typing import Any, ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from controllers.base import at_least_one
from controllers.ce import ce_forecast, py_logit
from controllers.registry import ControllerOptions, option, register, require
from dllm_jax.config import ConfigError
from dllm_jax.features import CEFilter, log_odds
from dllm_jax.state import BlockContext, Features, Trajectory

TSPD_FILE = "tspd.json"
TSPD_FORMAT = "dllm-jax-tspd"
TSPD_VERSION = 1
FEATURES: tuple[str, ...] = ("logit_conf", "norm_entropy", "margin", "momentum", "log_stable",
                             "log_flips", "rel_pos", "dist_committed", "frac_committed")
CE_FEATURES: tuple[str, ...] = ("ce_mean", "ce_log_sd")
PARAM_NAMES: tuple[str, ...] = ("x_mean", "x_scale", "w", "b", "w1", "b1", "w2")


class TSPDError(ConfigError):
    """A TSPD parameter file that is missing or cannot be used; the message says what to do."""


def feature_names(use_ce: bool) -> tuple[str, ...]:
    return FEATURES + (CE_FEATURES if use_ce else ())


def distance_to_committed(masked: jax.Array) -> jax.Array:
    """int32 `[B, Lb]`: distance from each position to the nearest non-masked one, where index
    -1 (just left of the block) counts as committed."""
    lb = masked.shape[-1]
    i = jnp.arange(lb)
    d = jnp.abs(i[:, None] - i[None, :])                                    # [Lb, Lb]
    big = jnp.int32(2 * lb + 2)
    nearest = jnp.min(jnp.where(~masked[:, None, :], d[None], big), axis=-1)
    return jnp.minimum(nearest, i[None, :] + 1).astype(jnp.int32)


def tspd_features(feats: Features, traj: Trajectory, vocab_size: int, use_ce: bool,
                  horizon: int, ce_filter: Optional[CEFilter]) -> jax.Array:
    """float32 `[B, Lb, F]` in the order of `feature_names(use_ce)` (see the module doc)."""
    masked = feats.masked
    b, lb = masked.shape
    log_v = math.log(max(int(vocab_size), 2))
    frac = jnp.sum(~masked, axis=-1, keepdims=True).astype(jnp.float32) / lb
    cols = [
        log_odds(feats.confidence),
        feats.entropy.astype(jnp.float32) / jnp.float32(log_v),
        feats.margin.astype(jnp.float32),
        traj.momentum.astype(jnp.float32),
        jnp.log1p(traj.stable.astype(jnp.float32)),
        jnp.log1p(traj.flips.astype(jnp.float32)),
        jnp.broadcast_to(jnp.arange(lb, dtype=jnp.float32) / max(lb - 1, 1), (b, lb)),
        distance_to_committed(masked).astype(jnp.float32) / lb,
        jnp.broadcast_to(frac, (b, lb)),
    ]
    if use_ce:
        if ce_filter is None:
            raise ValueError("CE features need a CE filter (ce_filter=CEFilter(...)).")
        mean_h, sd_h = ce_forecast(traj, horizon, ce_filter)
        cols += [jnp.clip(mean_h, -30.0, 30.0), jnp.log(jnp.maximum(sd_h, 1e-6))]
    x = jnp.stack(cols, axis=-1)
    return jnp.where(jnp.isfinite(x), x, 0.0).astype(jnp.float32)


@struct.dataclass
class TSPDParams:
    """The learned part of TSPD (all leaves float32): x_mean, x_scale `[F]`, w `[F]`, b `[]`,
    w1 `[F, H]`, b1 `[H]`, w2 `[H]`."""

    x_mean: jax.Array
    x_scale: jax.Array
    w: jax.Array
    b: jax.Array
    w1: jax.Array
    b1: jax.Array
    w2: jax.Array

    @property
    def num_features(self) -> int:
        return int(self.w.shape[-1])

    @property
    def hidden(self) -> int:
        return int(self.b1.shape[-1])

    def logit(self, x: jax.Array) -> jax.Array:
        """logit p(converged) `[...]` for features `x [..., F]`."""
        xs = (x - self.x_mean) / self.x_scale
        h = jnp.tanh(xs @ self.w1 + self.b1)
        return xs @ self.w + self.b + h @ self.w2

    @classmethod
    def zeros(cls, num_features: int, hidden: int = 0) -> "TSPDParams":
        f, h = int(num_features), int(hidden)
        z = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
        return cls(x_mean=z(f), x_scale=jnp.ones((f,), jnp.float32), w=z(f), b=z(), w1=z(f, h),
                   b1=z(h), w2=z(h))

    @classmethod
    def threshold_rule(cls, threshold: float, num_features: int = len(FEATURES),
                       hidden: int = 0) -> "TSPDParams":
        """logit p = logit(confidence) - logit(threshold): with tau = 0.5, p > tau is the
        threshold rule (confidence > threshold; ties at exactly the threshold aside)."""
        p = cls.zeros(num_features, hidden)
        return p.replace(w=p.w.at[FEATURES.index("logit_conf")].set(1.0),
                         b=jnp.float32(-py_logit(threshold)))

    def to_dict(self) -> dict[str, Any]:
        return {k: np.asarray(getattr(self, k), np.float32).tolist() for k in PARAM_NAMES}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TSPDParams":
        missing = [k for k in PARAM_NAMES if k not in d]
        if missing:
            raise TSPDError(f"TSPD parameters lack {missing}; refit with `dllm-jax "
                            f"train-controller`.")
        arrs = {k: jnp.asarray(np.asarray(d[k], np.float32)) for k in PARAM_NAMES}
        p = cls(**arrs)
        f, h = p.num_features, p.hidden
        want = dict(x_mean=(f,), x_scale=(f,), w=(f,), b=(), w1=(f, h), b1=(h,), w2=(h,))
        bad = {k: tuple(arrs[k].shape) for k in PARAM_NAMES if tuple(arrs[k].shape) != want[k]}
        if bad:
            raise TSPDError(f"TSPD parameter shapes {bad} do not fit {f} features and {h} hidden "
                            f"units; the file is damaged, refit it.")
        return p


@struct.dataclass
class TSPD:
    """Commit every masked token with p(converged) > tau (at least one per row).

    params: TSPDParams (leaves). tau: commit threshold on p (static; trades speed vs quality).
    vocab_size: for the entropy normalisation. use_ce: feed the CE forecast (`horizon` steps
    ahead, filter `ce_filter`) to the model.
    """

    params: TSPDParams
    tau: float = struct.field(pytree_node=False, default=0.5)
    vocab_size: int = struct.field(pytree_node=False, default=2)
    use_ce: bool = struct.field(pytree_node=False, default=True)
    horizon: int = struct.field(pytree_node=False, default=2)
    ce_filter: CEFilter = struct.field(pytree_node=False, default=CEFilter())
    sampler: str = struct.field(pytree_node=False, default="llada")
    verify: ClassVar[None] = None

    @property
    def trajectory_filter(self) -> Optional[CEFilter]:
        """The CE filter the decode loop must run (None when the CE features are off)."""
        return self.ce_filter if self.use_ce else None

    @property
    def features(self) -> tuple[str, ...]:
        return feature_names(self.use_ce)

    def init(self, batch: int, block: int) -> Any:
        return ()

    def features_of(self, feats: Features, traj: Trajectory) -> jax.Array:
        return tspd_features(feats, traj, self.vocab_size, self.use_ce, self.horizon,
                             self.ce_filter)

    def logit(self, feats: Features, traj: Trajectory) -> jax.Array:
        x = self.features_of(feats, traj)
        if x.shape[-1] != self.params.w.shape[-1]:
            raise ValueError(f"TSPD params expect {self.params.w.shape[-1]} features but "
                             f"use_ce={self.use_ce} gives {x.shape[-1]} ({self.features}).")
        return self.params.logit(x)

    def decide(self, feats: Features, traj: Trajectory, ctx: BlockContext, state: Any):
        z = self.logit(feats, traj)
        commit = feats.masked & (z > jnp.float32(py_logit(self.tau)))
        return at_least_one(commit, z, feats.masked), state


def tspd_to_json(ctrl: TSPD, metrics: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    f = ctrl.ce_filter
    return {
        "format": TSPD_FORMAT, "version": TSPD_VERSION,
        "features": list(ctrl.features), "hidden": ctrl.params.hidden,
        "tau": ctrl.tau, "vocab_size": ctrl.vocab_size, "use_ce": ctrl.use_ce,
        "horizon": ctrl.horizon, "ce_filter": {"q": f.q, "r": f.r, "slope_var0": f.slope_var0},
        "params": ctrl.params.to_dict(), "metrics": dict(metrics or {}),
    }


def tspd_from_json(d: Mapping[str, Any], source: str = "TSPD file") -> TSPD:
    if d.get("format") != TSPD_FORMAT:
        raise TSPDError(f"{source} is not a TSPD parameter file (format {d.get('format')!r}).")
    if int(d.get("version", -1)) != TSPD_VERSION:
        raise TSPDError(f"{source} has version {d.get('version')}, this dllm-jax reads version "
                        f"{TSPD_VERSION}; refit with `dllm-jax train-controller`.")
    try:
        use_ce = bool(d["use_ce"])
        if list(d["features"]) != list(feature_names(use_ce)):
            raise TSPDError(f"{source} was fitted on features {d['features']}, this dllm-jax "
                            f"computes {list(feature_names(use_ce))}; refit with `dllm-jax "
                            f"train-controller`.")
        cf = d["ce_filter"]
        ctrl = TSPD(params=TSPDParams.from_dict(d["params"]), tau=float(d["tau"]),
                    vocab_size=int(d["vocab_size"]), use_ce=use_ce, horizon=int(d["horizon"]),
                    ce_filter=CEFilter(q=float(cf["q"]), r=float(cf["r"]),
                                       slope_var0=float(cf["slope_var0"])))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, TSPDError):
            raise
        raise TSPDError(f"{source} is damaged ({type(e).__name__}: {e}); refit it.") from None
    if ctrl.params.num_features != len(ctrl.features):
        raise TSPDError(f"{source} has {ctrl.params.num_features} weights for "
                        f"{len(ctrl.features)} features; refit it.")
    return ctrl


def save_tspd(path: str | os.PathLike, ctrl: TSPD,
              metrics: Optional[Mapping[str, Any]] = None) -> str:
    """Write `ctrl` (params + static settings + fit metrics) as JSON, atomically. If `path` is
    a folder, the file is `path/tspd.json`. Returns the file written."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, TSPD_FILE)
    text = json.dumps(tspd_to_json(ctrl, metrics), indent=1)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tspd-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_tspd(path: str | os.PathLike) -> TSPD:
    """Read a TSPD file written by `save_tspd`."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except FileNotFoundError:
        raise TSPDError(f"no TSPD parameters at {path}; fit them with `dllm-jax train-controller "
                        f"--model DIR`.") from None
    except (OSError, json.JSONDecodeError) as e:
        raise TSPDError(f"cannot read TSPD parameters from {path} ({e}).") from None
    return tspd_from_json(d, source=path)


def load_tspd(model_dir: str | os.PathLike) -> TSPD:
    """The TSPD controller fitted for the model in `model_dir` (`model_dir/tspd.json`)."""
    return read_tspd(os.path.join(os.fspath(model_dir), TSPD_FILE))


def resolve_tspd(tspd: Any = None, model_dir: Any = None) -> TSPD:
    """The fitted TSPD controller: `tspd` itself (a TSPD, a tspd.json file or a folder holding
    one), else `model_dir/tspd.json`, else the bundled model's; TSPDError when none is found."""
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


@register("tspd", fitted=True)
@dataclasses.dataclass(frozen=True)
class TSPDOptions(ControllerOptions):
    """TSPD: commit every masked token whose fitted p(converged) exceeds tau."""

    tspd: Any = option(None, "a TSPD, or a tspd.json file / folder (default: model_dir's)",
                       cli=False)
    model_dir: Any = option(None, f"model folder holding {TSPD_FILE} (default: the bundled "
                                  f"model)", cli=False)
    tau: Optional[float] = option(None, "TSPD commit threshold on p(converged), in (0, 1) "
                                        "(default: the fitted file's)", example=0.5)

    def validate(self) -> None:
        if self.tau is not None:
            require(0.0 < self.tau < 1.0, "tau", "in (0, 1)", self.tau, 0.5)

    def build(self, name: str) -> TSPD:
        ctrl = resolve_tspd(self.tspd, self.model_dir)
        return ctrl if self.tau is None else ctrl.replace(tau=self.tau)


__all__ = ["CE_FEATURES", "FEATURES", "TSPD", "TSPDError", "TSPDOptions", "TSPDParams",
           "TSPD_FILE", "distance_to_committed", "feature_names", "load_tspd", "read_tspd",
           "resolve_tspd", "save_tspd", "tspd_features"]
