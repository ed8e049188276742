"""The controller registry: every name builds, option errors are one sentence, the CLI's
controller flags and their "does not apply" errors come from the registry."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

import controllers
from controllers import (ALL_CONTROLLER_NAMES, CONTROLLER_NAMES, FITTED_CONTROLLER_NAMES,
                         CEFilter, Controller, OptionError, make_controller)
from controllers import registry
from controllers.registry import ControllerOptions, option, register, require
from dllm_jax.cli import main
from dllm_jax.cli_options import UsageError, add_generation_options, decode_settings
from dllm_jax.pretrained import bundled_model_dir

TODAY = ("low_confidence", "random", "threshold", "low_confidence_dynamic", "factor",
         "maskgit_plus", "topk_margin", "entropy", "origin", "ce", "entropy_bound", "r2",
         "r2_centred", "left_to_right", "simsd")
FITTED = ("tspd", "ce_fitted")


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_generation_options(p)
    return p


def test_names_come_from_the_registry() -> None:
    assert CONTROLLER_NAMES == TODAY
    assert FITTED_CONTROLLER_NAMES == FITTED
    assert ALL_CONTROLLER_NAMES == TODAY + FITTED
    assert registry.controller_names() == ALL_CONTROLLER_NAMES
    assert all(registry.get_spec(n).fitted == (n in FITTED) for n in ALL_CONTROLLER_NAMES)


@pytest.mark.parametrize("name", ALL_CONTROLLER_NAMES)
def test_every_name_builds_with_defaults(name: str) -> None:
    spec = registry.get_spec(name)
    extra = {"model_dir": bundled_model_dir()} if spec.fitted else {}
    ctrl = make_controller(name, **extra)
    assert isinstance(ctrl, Controller)
    # The protocol is the whole contract: decode reads these two without getattr defaults.
    assert ctrl.sampler in ("llada", "dream")
    assert ctrl.trajectory_filter is None or isinstance(ctrl.trajectory_filter, CEFilter)
    # Options objects are frozen dataclasses whose every field has a default and a help line.
    opts = spec.options(**extra)
    assert type(opts).__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(opts, "threshold", 0.5)
    for f in spec.fields:
        assert f.default is not dataclasses.MISSING and f.metadata["help"]
    assert spec.help and "\n" not in spec.help


def test_defaults_are_todays() -> None:
    assert make_controller("threshold").threshold == 0.9
    assert make_controller("factor").factor == 1.0
    assert make_controller("entropy").alg_temp == 0.0 and make_controller("origin").eps == 1e-3
    ce = make_controller("ce")
    assert (ce.threshold, ce.horizon, ce.z, ce.flip_k) == (0.9, 2, 1.0, 2)
    assert ce.trajectory_filter == CEFilter()
    r2 = make_controller("r2_centred")
    assert (r2.window, r2.agg, r2.floor, r2.k) == (1, "mean", 0.7, 3)
    assert r2.trajectory_filter is None
    r2 = make_controller("r2")
    assert (r2.threshold, r2.window, r2.spatial_threshold, r2.max_unmasked, r2.token_cluster,
            r2.temporal_steps, r2.temporal_threshold, r2.temporal_eval) == (
        0.9, 3, 0.8, 1, "confidence", 3, 0.8, "last")
    assert make_controller("random").remasking == "random"
    assert make_controller("ce", q=0.1, r=0.5).trajectory_filter == CEFilter(q=0.1, r=0.5)


SENTENCE = re.compile(r"^(?P<opt>\w+) must be .+, got .+; e\.g\. (?P=opt)=.+\.$")


@pytest.mark.parametrize("name,kw,rule", [
    ("threshold", dict(threshold=1.5), r"in \(0, 1\]"),
    ("threshold", dict(threshold=0.0), r"in \(0, 1\]"),
    ("threshold", dict(threshold="high"), "a number"),
    ("factor", dict(factor=0.0), "> 0"),
    ("entropy", dict(alg_temp=-1.0), ">= 0"),
    ("origin", dict(eps=1.0), r"in \(0, 1\)"),
    ("ce", dict(horizon=-1), "an integer >= 0"),
    ("ce", dict(horizon=1.5), "an integer"),
    ("ce", dict(r=0.0), "> 0"),
    ("ce", dict(lookahead="yes"), "True or False"),
    ("r2_centred", dict(agg="max"), "one of mean, min"),
    ("r2_centred", dict(floor=1.5), r"in \[0, 1\]"),
    ("r2_centred", dict(k=0), "an integer >= 1"),
    ("r2", dict(r2_token_cluster="left"), "one of confidence, mid, random, none"),
    ("r2", dict(r2_window=-1), "an integer >= 0"),
    ("tspd", dict(tau=1.0), r"in \(0, 1\)"),
])
def test_bad_values_give_one_sentence(name: str, kw: dict, rule: str) -> None:
    with pytest.raises(OptionError) as info:
        make_controller(name, **kw)
    msg = str(info.value)
    (opt,) = kw
    assert SENTENCE.match(msg) and msg.startswith(f"{opt} must be "), msg
    assert re.search(rule, msg), msg
    # The CLI form names the flag.
    flag = "--" + opt.replace("_", "-")
    assert info.value.cli_message().startswith(f"{flag} must be ")
    assert f"; e.g. {flag} " in info.value.cli_message()
    assert isinstance(info.value, ValueError)


def test_values_are_coerced_to_the_declared_types() -> None:
    ce = make_controller("ce", horizon=3.0, threshold=1, lookahead=0)
    assert (type(ce.horizon), type(ce.threshold), ce.lookahead) == (int, float, False)


def test_unknown_name_and_foreign_option_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown controller 'fastest'; choose one of "
                                         "low_confidence, random, .*, tspd"):
        make_controller("fastest")
    with pytest.raises(ValueError, match="option threshold does not apply to controller "
                                         "low_confidence; it takes no options"):
        make_controller("low_confidence", threshold=0.8)
    with pytest.raises(ValueError, match="option horizon does not apply to controller "
                                         "threshold; it takes: threshold"):
        make_controller("threshold", horizon=2)
    with pytest.raises(ValueError, match="option alg_temp does not apply to controller "
                                         "origin; it takes: eps"):
        make_controller("origin", alg_temp=0.5)
    assert controllers.applicable_options("factor", threshold=0.5, factor=2.0) == {"factor": 2.0}


def test_register_checks_the_options_class(scratch_registry: None) -> None:
    @dataclasses.dataclass(frozen=True)
    class Plain:
        k: int = option(1, "k")

    with pytest.raises(TypeError, match="frozen dataclass subclassing ControllerOptions"):
        register("plain")(Plain)

    @dataclasses.dataclass(frozen=True)
    class NoHelp(ControllerOptions):
        k: int = 1

    with pytest.raises(TypeError, match="help line"):
        register("nohelp")(NoHelp)

    @dataclasses.dataclass(frozen=True)
    class Fitted(ControllerOptions):
        k: int = option(1, "k")

    with pytest.raises(TypeError, match="model_dir"):
        register("fitted_one", fitted=True)(Fitted)

    @dataclasses.dataclass(frozen=True)
    class Other(ControllerOptions):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register("threshold")(Other)

    @dataclasses.dataclass(frozen=True)
    class ThresholdAsText(ControllerOptions):
        threshold: str = option("high", "a threshold of another kind")

    register("text_threshold")(ThresholdAsText)
    with pytest.raises(TypeError, match="one name must mean one kind of value"):
        registry.shared_options()


def test_a_new_controller_gets_its_flags(scratch_registry: None) -> None:
    """Adding a controller = registering one options class: make_controller and the CLI
    pick it up."""
    from controllers.baselines import LowConfidence

    @register("every_k")
    @dataclasses.dataclass(frozen=True)
    class EveryK(ControllerOptions):
        """Test controller."""

        every_k: int = option(2, "commit every k-th step, >= 1")

        def validate(self) -> None:
            require(self.every_k >= 1, "every_k", ">= 1", self.every_k, 2)

        def build(self, name: str) -> LowConfidence:
            return LowConfidence()

    assert isinstance(make_controller("every_k", every_k=3), LowConfidence)
    p = _parser()
    _, ctrl = decode_settings(p.parse_args(["--controller", "every_k", "--every-k", "3"]), "m")
    assert isinstance(ctrl, LowConfidence)
    with pytest.raises(UsageError, match=r"^--every-k must be >= 1, got 0; e\.g\. --every-k 2\.$"):
        decode_settings(p.parse_args(["--controller", "every_k", "--every-k", "0"]), "m")
    with pytest.raises(UsageError, match="--every-k does not apply to controller threshold"):
        decode_settings(p.parse_args(["--controller", "threshold", "--every-k", "3"]), "m")


def test_cli_flags_are_generated() -> None:
    p = _parser()
    flags = set(p._option_string_actions)
    for name, opt in registry.shared_options().items():
        assert opt.flag in flags
    assert {"--threshold", "--factor", "--alg-temp", "--tau", "--horizon", "--controller",
            "--no-lookahead", "--window", "--agg"} <= flags
    assert "--tspd" not in flags and "--model-dir" not in flags   # Python-only options
    args = p.parse_args(["--controller", "ce", "--horizon", "3", "--no-stabilize"])
    assert (args.horizon, args.stabilize, args.threshold) == (3, False, None)
    gen, ce = decode_settings(args, "unused")
    assert (ce.horizon, ce.stabilize, ce.threshold, ce.lookahead) == (3, False, 0.9, True)
    assert (gen.gen_length, gen.block_length, gen.steps) == (32, 32, 32)
    _, thr = decode_settings(p.parse_args(["--controller", "threshold", "--threshold", "0.8"]),
                             "unused")
    assert thr.threshold == 0.8
    _, thr = decode_settings(p.parse_args(["--controller", "threshold"]), "unused")
    assert thr.threshold == 0.9        # not given: the controller's default
    _, dream = decode_settings(p.parse_args(["--controller", "entropy", "--alg-temp", "0.5"]),
                               "unused")
    assert dream.alg_temp == 0.5
    _, t = decode_settings(p.parse_args(["--controller", "tspd", "--tau", "0.7"]),
                           str(bundled_model_dir()))
    assert t.tau == 0.7


@pytest.mark.parametrize("argv,message", [
    (["--controller", "low_confidence", "--threshold", "0.8"],
     "--threshold does not apply to controller low_confidence; it takes no options."),
    (["--controller", "ce", "--tau", "0.5", "--factor", "2"],
     "--factor, --tau do not apply to controller ce; it takes: --threshold, --horizon"),
    (["--controller", "tspd", "--threshold", "0.8"],
     "--threshold does not apply to controller tspd; it takes: --tau."),
    (["--controller", "r2_centred", "--agg", "max"], "--agg must be one of mean, min, got 'max'"),
    (["--controller", "r2", "--agg", "max"], "--agg does not apply to controller r2"),
    (["--controller", "nope"], "unknown controller 'nope'"),
    (["--gen-length", "0"], "--gen-length must be a positive integer, got 0; e.g. --gen-length"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--block-length", "-4"], "--block-length must be a positive integer, got -4"),
])
def test_decode_settings_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        decode_settings(_parser().parse_args(argv), str(bundled_model_dir()))
    assert message in str(info.value)


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv,message", [
    (["--controller", "low_confidence", "--threshold", "0.8"],
     "error: --threshold does not apply to controller low_confidence; it takes no options.\n"),
    (["--gen-length", "0"],
     "error: --gen-length must be a positive integer, got 0; e.g. --gen-length 32.\n"),
])
def test_generate_cli_refuses(capsys: pytest.CaptureFixture, argv: list[str], message: str
                              ) -> None:
    rc, out, err = _run(capsys, "generate", "--prompt-ids", "5", *argv)
    assert rc == 2 and out == "" and err == message


def test_generate_cli_threshold_flag_works(capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = _run(capsys, "generate", "sort: 3 1 2", "--controller", "threshold",
                      "--threshold", "0.8", "--gen-length", "8", "--json")
    assert rc == 0 and '"nfe"' in out
