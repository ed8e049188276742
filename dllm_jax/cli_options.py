"""The decode options every decoding command shares (`generate`, `batch`, later `serve`):
their flags, and their translation into a `GenerateConfig` and a controller.

The controller flags are generated from the controller registry (`controllers/registry.py`):
one flag per option name (`alg_temp` -> `--alg-temp`), shared by every controller that takes
that option, default None meaning "not given" (the controller's own default applies). A flag
given for a controller that does not take it is a usage error.
"""

from __future__ import annotations

import argparse
from typing import Any

from dllm_jax.config import ConfigError

DEFAULT_GEN_LENGTH = 32


class UsageError(ConfigError):
    """A command-line input that cannot be used; the message says how to fix it."""


def _fmt_default(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _flag_help(opt: Any) -> str:
    """The option's help line, the controllers that take it and their defaults."""
    defaults = {k: v for k, v in opt.defaults.items() if v is not None}
    text = f"{opt.help} [{', '.join(opt.controllers)}"
    distinct = set(map(repr, defaults.values()))
    if len(distinct) == 1:
        text += f"; default {_fmt_default(next(iter(defaults.values())))}"
    elif distinct:
        text += "; default " + ", ".join(f"{_fmt_default(v)} ({k})" for k, v in defaults.items())
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
    p.add_argument("--gen-length", type=int, default=None,
                   help=f"answer tokens (default {DEFAULT_GEN_LENGTH})")
    p.add_argument("--block-length", type=int, default=None,
                   help="tokens per semi-autoregressive block (default: gen-length)")
    p.add_argument("--steps", type=int, default=None, help="step budget (default: gen-length)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--cfg", type=float, default=0.0, help="classifier-free guidance scale")
    p.add_argument("--cache", default="none", help="KV cache: none | prefix | dual")
    p.add_argument("--refresh-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    add_controller_options(p)


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
    raise UsageError with the reason."""
    from dllm_jax.config import GenerateConfig

    gen_length = _length(args.gen_length, "--gen-length", DEFAULT_GEN_LENGTH)
    block_length = _length(args.block_length, "--block-length", gen_length)
    steps = _length(args.steps, "--steps", gen_length)
    try:
        gen = GenerateConfig(
            gen_length=gen_length, block_length=block_length, steps=steps,
            temperature=args.temperature, cfg_scale=args.cfg, cache=args.cache,
            refresh_every=args.refresh_every)
        controller = controller_from_args(args, model_dir)
    except ValueError as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(str(e)) from None
    return gen, controller


__all__ = ["DEFAULT_GEN_LENGTH", "UsageError", "add_controller_options",
           "add_generation_options", "controller_from_args", "decode_settings",
           "given_controller_options"]
