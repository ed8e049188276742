"""The decode options every decoding command shares (`generate`, `batch`, later `serve`):
their flags, and their translation into a `GenerateConfig` and a controller.

The controller flags are generated from the controller registry (`controllers/registry.py`):
one flag per option name (`alg_temp` -> `--alg-temp`), shared by every controller that takes
that option, default None meaning "not given" (the controller's own default applies). A flag
given for a controller that does not take it is a usage error.

Validation happens here, once, before any model is loaded: every numeric flag is range-checked
with the flag named in the message (`require_flag`), messages of the config dataclasses are
given the flags' names (`flag_message`), and `--steps` above what a decode can run is refused
(see `decode_settings`). `decode_fingerprint` is the resolved settings as flags, for records
such as `dllm-jax batch`'s settings sidecar.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any, Mapping

from dllm_jax.config import ConfigError

DEFAULT_GEN_LENGTH = 32
MAX_SEED = 2**63 - 1
# GenerateConfig field -> the flag that sets it (for messages of GenerateConfig).
GENERATE_FLAGS: dict[str, str] = {
    "gen_length": "--gen-length", "block_length": "--block-length", "steps": "--steps",
    "temperature": "--temperature", "cfg_scale": "--cfg", "cache": "--cache",
    "refresh_every": "--refresh-every", "refresh_scope": "--refresh-scope",
    "refresh_blocks": "--refresh-blocks"}


class UsageError(ConfigError):
    """A command-line input that cannot be used; the message says how to fix it."""


def require_flag(ok: bool, flag: str, rule: str, value: Any, example: Any) -> None:
    """Raise UsageError "FLAG must be RULE, got VALUE; e.g. FLAG EXAMPLE." unless `ok`."""
    if not ok:
        raise UsageError(f"{flag} must be {rule}, got {value}; e.g. {flag} {example}.")


def check_number(value: Any, flag: str, *, minimum: float | None = None,
                 maximum: float | None = None, low_open: bool = False, example: Any = None
                 ) -> None:
    """Range-check one numeric flag (None: not given, fine): value >= minimum (> with
    `low_open`) and <= maximum; NaN and infinities are refused."""
    if value is None:
        return
    if minimum is not None and maximum is not None:
        rule = f"in {'(' if low_open else '['}{minimum:g}, {maximum:g}]"
    elif minimum is not None:
        rule = f"{'>' if low_open else '>='} {minimum:g}"
    elif maximum is not None:
        rule = f"<= {maximum:g}"
    else:
        rule = "a finite number"
    ok = isinstance(value, int) or math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if low_open else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    require_flag(ok, flag, rule, value, minimum if example is None else example)


def flag_message(message: str, flags: Mapping[str, str] = GENERATE_FLAGS) -> str:
    """A message of a config dataclass with its field names replaced by the CLI flags."""
    for name, flag in sorted(flags.items(), key=lambda kv: -len(kv[0])):
        message = re.sub(rf"(?<![-\w]){re.escape(name)}(?![\w-])", flag, message)
    return message


def _fmt_default(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _flag_help(opt: Any) -> str:
    """The option's help line, the controllers that take it and their defaults."""
    from controllers import get_spec

    defaults = {k: v for k, v in opt.defaults.items() if v is not None}
    text = f"{opt.help} [{', '.join(opt.controllers)}"
    distinct = set(map(repr, defaults.values()))
    # a fitted controller's None default means "the fitted file's value"
    fitted = [k for k, v in opt.defaults.items() if v is None and get_spec(k).fitted]
    if len(distinct) == 1 and not fitted:
        text += f"; default {_fmt_default(next(iter(defaults.values())))}"
    elif distinct:
        text += "; default " + ", ".join([f"{_fmt_default(v)} ({k})" for k, v in defaults.items()]
                                         + [f"the fitted one ({k})" for k in fitted])
    return (text + "]").replace("%", "%%")


def add_controller_options(p: argparse.ArgumentParser) -> None:
    """`--controller` and one flag per controller option of the registry."""
    from controllers import controller_names, shared_options

    fitted = controller_names(fitted=True)
    names = " | ".join(controller_names())
    p.add_argument("--controller", default="low_confidence", metavar="NAME",
                   help=f"{names} (default low_confidence; fitted, reading the model folder's "
                        f"parameters: {', '.join(fitted) or 'none'})")
    g = p.add_argument_group(
        "controller options",
        "each flag applies only to the controllers listed in its help; a flag not given takes "
        "the controller's default")
    for opt in shared_options(cli_only=True).values():
        kw: dict[str, Any] = dict(dest=opt.name, default=None, help=_flag_help(opt))
        if opt.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = opt.type
            kw["metavar"] = ("{" + ",".join(opt.choices) + "}" if opt.choices else
                             {int: "N", float: "X"}.get(opt.type, "VALUE"))
        g.add_argument(opt.flag, **kw)


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """The decode options shared by `dllm-jax generate` and `dllm-jax batch`."""
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template (instruct models)")
    p.add_argument("--gen-length", type=int, default=None, metavar="N",
                   help=f"answer tokens (default {DEFAULT_GEN_LENGTH})")
    p.add_argument("--block-length", type=int, default=None, metavar="N",
                   help="tokens per semi-autoregressive block; must divide --gen-length "
                        "(default: gen-length, one block)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="step budget of the fixed schedules (low_confidence, random: tokens per "
                        "step = gen-length / steps; Dream's orders: the time grid), a multiple "
                        "of the number of blocks and at most gen-length except for Dream's "
                        "orders; adaptive controllers stop by themselves (default: gen-length)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="X",
                   help="sampling temperature, >= 0 (default 0: greedy)")
    p.add_argument("--cfg", type=float, default=0.0, metavar="X",
                   help="classifier-free guidance scale, >= 0 (default 0: off)")
    p.add_argument("--cache", default="none", choices=("none", "prefix", "dual"),
                   help="block-wise KV cache: none | prefix | dual (default none)")
    p.add_argument("--refresh-every", type=int, default=0, metavar="N",
                   help="with --cache: also refresh the cache every N steps inside a block "
                        "(default 0: only at block starts)")
    p.add_argument("--refresh-scope", default="full", choices=("full", "answer"),
                   help="with --cache, bidirectional models: what a block-start refresh "
                        "recomputes: full (prompt + answer, Fast-dLLM; default) or answer "
                        "(the prompt's keys/values kept from the first forward)")
    p.add_argument("--refresh-blocks", type=int, default=1, metavar="K",
                   help="with --cache, bidirectional models: refresh at the start of every "
                        "K-th block only (default 1: every block)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="random seed of sampling and random orders (default 0)")
    add_controller_options(p)


def add_quantize_option(p: argparse.ArgumentParser) -> None:
    """`--quantize int8` (generate, batch, serve): checked with `check_quantize`."""
    p.add_argument("--quantize", default=None, metavar="int8",
                   help="int8: quantise --model's matrices at load time (weight-only, per "
                        "output channel; activations in the stored dtype / --dtype); default: "
                        "the stored weights (a folder from `convert --quantize int8` is int8 "
                        "already)")


def check_quantize(value: str | None) -> None:
    """UsageError naming --quantize for a value other than int8 (None: not given)."""
    from dllm_jax import quant

    try:
        quant.check_mode(value, "--quantize")
    except quant.QuantizationError as e:
        raise UsageError(str(e)) from None


def given_controller_options(args: argparse.Namespace) -> dict[str, Any]:
    """The controller options given on the command line (flags left at None are not)."""
    from controllers import shared_options

    return {name: getattr(args, name) for name in shared_options(cli_only=True)
            if getattr(args, name, None) is not None}


def controller_from_args(args: argparse.Namespace, model_dir: Any) -> Any:
    """The controller of `--controller` with the flags given; `model_dir` goes to fitted
    controllers only. Raises UsageError (flags named) for a flag the controller does not take
    or a bad value; a fitted controller's file errors (ConfigError) pass through."""
    from controllers import OptionError, get_spec

    try:
        spec = get_spec(args.controller)
    except ValueError as e:
        raise UsageError(str(e)) from None
    given = given_controller_options(args)
    foreign = [k for k in given if k not in spec.cli_option_names]
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        verb = "does" if len(foreign) == 1 else "do"
        raise UsageError(f"{flags} {verb} not apply to controller {spec.name}; "
                         f"{spec.takes_text(cli=True)}.")
    if spec.fitted:
        given["model_dir"] = model_dir
    try:
        return spec.build(**given)
    except OptionError as e:
        raise UsageError(e.cli_message()) from None


def _length(value: int | None, flag: str, default: int) -> int:
    """`value`, or `default` when the flag was not given (None); 0 or less is refused."""
    if value is None:
        return default
    if value <= 0:
        raise UsageError(f"{flag} must be a positive integer, got {value}; e.g. {flag} "
                         f"{default}.")
    return value


def decode_settings(args: argparse.Namespace, model_dir: str) -> tuple[Any, Any]:
    """(GenerateConfig, controller) from the options of `add_generation_options`; bad values
    raise UsageError naming the flag, with the fix.

    `--steps` above `--gen-length` is refused for every controller but Dream's orders: they
    commit at least one token per step, so the decode would stop after gen-length steps (a
    silent cap); with Dream's orders the extra steps run (and may commit nothing)."""
    from controllers import uses_time_grid
    from dllm_jax.config import GenerateConfig

    gen_length = _length(args.gen_length, "--gen-length", DEFAULT_GEN_LENGTH)
    block_length = _length(args.block_length, "--block-length", gen_length)
    steps = _length(args.steps, "--steps", gen_length)
    check_number(args.temperature, "--temperature", minimum=0, example=0.7)
    check_number(args.cfg, "--cfg", minimum=0, example=1.5)
    check_number(args.refresh_every, "--refresh-every", minimum=0, example=4)
    check_number(args.refresh_blocks, "--refresh-blocks", minimum=1, example=2)
    check_number(args.seed, "--seed", minimum=0, maximum=MAX_SEED, example=0)
    try:
        gen = GenerateConfig(
            gen_length=gen_length, block_length=block_length, steps=steps,
            temperature=args.temperature, cfg_scale=args.cfg, cache=args.cache,
            refresh_every=args.refresh_every, refresh_scope=args.refresh_scope,
            refresh_blocks=args.refresh_blocks)
    except ValueError as e:
        raise UsageError(flag_message(str(e))) from None
    controller = controller_from_args(args, model_dir)
    if steps > gen_length and not uses_time_grid(controller):
        raise UsageError(
            f"--steps {steps} is more than --gen-length {gen_length}: controller "
            f"{args.controller} commits at least one token per step, so at most {gen_length} "
            f"steps would run; pass --steps {gen_length} or less.")
    return gen, controller


def decode_fingerprint(args: argparse.Namespace, gen: Any) -> dict[str, Any]:
    """The decoding settings as `{flag: value}`, defaults resolved (a flag left out and the
    same value given explicitly compare equal): the generation flags, the controller and
    every command-line option of it."""
    from controllers import get_spec

    spec = get_spec(args.controller)
    given = {k: v for k, v in given_controller_options(args).items()
             if k in spec.cli_option_names}
    options = spec.defaults()
    options.update(given)
    out: dict[str, Any] = {
        "--chat": bool(args.chat), "--gen-length": gen.gen_length,
        "--block-length": gen.block_length, "--steps": gen.steps,
        "--temperature": float(gen.temperature), "--cfg": float(gen.cfg_scale),
        "--cache": gen.cache, "--refresh-every": gen.refresh_every, "--seed": int(args.seed),
        "--controller": spec.name}
    if gen.refresh_scope != "full" or gen.refresh_blocks != 1:  # (older records lack them)
        out.update({"--refresh-scope": gen.refresh_scope, "--refresh-blocks": gen.refresh_blocks})
    for name in spec.cli_option_names:
        value = options[name]
        out["--" + name.replace("_", "-")] = value if isinstance(
            value, (bool, int, float, str, type(None))) else str(value)
    return out


__all__ = ["DEFAULT_GEN_LENGTH", "UsageError", "add_controller_options",
           "add_generation_options", "check_number", "controller_from_args",
           "decode_fingerprint", "decode_settings", "flag_message", "given_controller_options",
           "require_flag"]
