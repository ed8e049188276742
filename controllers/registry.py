"""Controllers by name: each controller module registers its options dataclass.

A registered options class is a frozen dataclass subclassing `ControllerOptions`, one field
per option (type, default and a one-line help via `option(...)`), with `validate()` (raises
`OptionError`, a ValueError naming the option with an example) and `build(name)` (the
controller). Registering is a decorator, so adding a controller is one new module:

    @register("threshold")
    @dataclasses.dataclass(frozen=True)
    class ThresholdOptions(ControllerOptions):
        \"\"\"Fast-dLLM: commit every masked token with confidence >= threshold.\"\"\"
        threshold: float = option(0.9, "commit threshold on confidence, in (0, 1]")

        def validate(self) -> None:
            require(0.0 < self.threshold <= 1.0, "threshold", "in (0, 1]", self.threshold, 0.9)

        def build(self, name: str) -> Threshold:
            return Threshold(threshold=self.threshold)

One class may be registered under several names (stack the decorators; `build` gets the
name). `fitted=True` marks a controller that reads fitted parameters from the model folder:
its options must include `model_dir`, which the CLI fills in. `make_controller(name,
**options)` builds by name; the CLI (`dllm_jax.cli_options`) builds its flags from
`shared_options()`.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from typing import Any, Callable, Iterable, Mapping, TypeVar

import numpy as np

from controllers.base import Controller

HELP, CLI, CHOICES, EXAMPLE = "help", "cli", "choices", "example"


class OptionError(ValueError):
    """A controller option with a value it cannot take.

    The message is one sentence: "<option> must be <rule>, got <value>; e.g. <option>=<example>."
    `cli_message()` says the same with the command-line flag (`--option`).
    """

    def __init__(self, option_name: str, rule: str, value: Any, example: Any) -> None:
        self.option_name, self.rule, self.value, self.example = option_name, rule, value, example
        super().__init__(f"{option_name} must be {rule}, got {value!r}; "
                         f"e.g. {option_name}={example!r}.")

    def cli_message(self) -> str:
        """The message with the option as a command-line flag."""
        flag = flag_name(self.option_name)
        return f"{flag} must be {self.rule}, got {self.value!r}; e.g. {flag} {self.example}."


def require(ok: bool, option_name: str, rule: str, value: Any, example: Any) -> None:
    """Raise `OptionError(option_name, rule, value, example)` unless `ok`."""
    if not ok:
        raise OptionError(option_name, rule, value, example)


def flag_name(option_name: str) -> str:
    """The command-line flag of an option: `alg_temp` -> `--alg-temp`."""
    return "--" + option_name.replace("_", "-")


def option(default: Any, help: str, *, cli: bool = True, choices: Iterable[str] | None = None,
           example: Any = None) -> Any:
    """A field of a controller's options dataclass.

    Args:
      default: the value when the option is not given.
      help: one line saying what the option does (the CLI flag's help).
      cli: whether the CLI offers it as a flag (False for Python-only values such as a file
        or an object).
      choices: the allowed values of a str option.
      example: a good value for error messages (default: `default`).
    """
    meta = {HELP: help, CLI: cli, CHOICES: tuple(choices) if choices is not None else None,
            EXAMPLE: default if example is None else example}
    return dataclasses.field(default=default, metadata=meta)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None` / `Optional[X]`, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """`value` as the field's type (int -> float, integral float -> int, numpy scalars to
    Python); raises OptionError for a value of another kind or outside `choices`."""
    base, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None
    ex = f.metadata.get(EXAMPLE, f.default)
    is_bool = isinstance(value, (bool, np.bool_))
    if base is float:
        require(isinstance(value, numbers.Real) and not is_bool, f.name, "a number", value, ex)
        return float(value)
    if base is int:
        ok = (isinstance(value, numbers.Integral) and not is_bool) or (
            isinstance(value, float) and value.is_integer())
        require(ok, f.name, "an integer", value, ex)
        return int(value)
    if base is bool:
        ok = is_bool or (isinstance(value, numbers.Integral) and value in (0, 1))
        require(ok, f.name, "True or False", value, ex)
        return bool(value)
    if base is str:
        choices = f.metadata.get(CHOICES)
        if choices:
            require(isinstance(value, str) and value in choices, f.name,
                    f"one of {', '.join(choices)}", value, ex)
        require(isinstance(value, str), f.name, "a string", value, ex)
        return value
    return value


@dataclasses.dataclass(frozen=True)
class ControllerOptions:
    """Base of every controller's options dataclass: constructing one coerces each field to
    its declared type and runs `validate()`, so an options object is always valid."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, hints[f.name], getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Raise OptionError (see `require`) for a value the controller cannot use."""

    def build(self, name: str) -> Controller:
        """The controller registered as `name` with these options."""
        raise NotImplementedError(f"{type(self).__name__} does not define build().")


OptionsT = TypeVar("OptionsT", bound=type[ControllerOptions])


@dataclasses.dataclass(frozen=True)
class ControllerSpec:
    """One registered controller: its name, options class and whether it is fitted."""

    name: str
    options: type[ControllerOptions]
    fitted: bool = False

    @property
    def help(self) -> str:
        """The first line of the options class's docstring."""
        return (self.options.__doc__ or self.name).strip().splitlines()[0]

    @property
    def fields(self) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(self.options)

    @property
    def option_names(self) -> tuple[str, ...]:
        """Every option, in declaration order."""
        return tuple(f.name for f in self.fields)

    @property
    def cli_option_names(self) -> tuple[str, ...]:
        """The options the CLI offers as flags."""
        return tuple(f.name for f in self.fields if f.metadata.get(CLI, True))

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in self.fields}

    def takes_text(self, cli: bool = False) -> str:
        """"it takes: a, b" (with cli: the flags "--a, --b"), or "it takes no options"."""
        names = self.cli_option_names if cli else self.option_names
        if not names:
            return "it takes no options"
        return "it takes: " + ", ".join(flag_name(n) if cli else n for n in names)

    def make_options(self, **values: Any) -> ControllerOptions:
        """The validated options; an option this controller does not take raises ValueError."""
        for key in values:
            if key not in self.option_names:
                raise ValueError(f"option {key} does not apply to controller {self.name}; "
                                 f"{self.takes_text()}.")
        return self.options(**values)

    def build(self, **values: Any) -> Controller:
        return self.make_options(**values).build(self.name)


_REGISTRY: dict[str, ControllerSpec] = {}


def _check_options_class(name: str, cls: Any, fitted: bool) -> None:
    if not (isinstance(cls, type) and issubclass(cls, ControllerOptions)
            and dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
        raise TypeError(f"@register({name!r}) needs a frozen dataclass subclassing "
                        f"ControllerOptions, got {cls!r}.")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING:
            raise TypeError(f"option {f.name} of controller {name} needs a default.")
        if not f.metadata.get(HELP):
            raise TypeError(f"option {f.name} of controller {name} needs a help line "
                            f"(declare it with option(default, help)).")
        if f.name not in hints:
            raise TypeError(f"option {f.name} of controller {name} needs a type annotation.")
    if fitted and "model_dir" not in {f.name for f in dataclasses.fields(cls)}:
        raise TypeError(f"fitted controller {name} needs a model_dir option (the folder holding "
                        f"its fitted parameters).")


def register(name: str, *, fitted: bool = False) -> Callable[[OptionsT], OptionsT]:
    """Class decorator: register a `ControllerOptions` dataclass as controller `name`.

    fitted: the controller reads fitted parameters from the model folder (its options include
    `model_dir`). Registering a second class under a taken name raises ValueError (the same
    class again, e.g. on module reload, replaces it).
    """
    if not name.isidentifier():
        raise ValueError(f"controller name {name!r} must be an identifier, e.g. 'threshold'.")

    def deco(cls: OptionsT) -> OptionsT:
        _check_options_class(name, cls, fitted)
        old = _REGISTRY.get(name)
        if old is not None and (old.options.__module__, old.options.__qualname__) != (
                cls.__module__, cls.__qualname__):
            raise ValueError(f"controller {name!r} is already registered by "
                             f"{old.options.__module__}.{old.options.__qualname__}.")
        _REGISTRY[name] = ControllerSpec(name=name, options=cls, fitted=fitted)
        return cls

    return deco


def controller_names(fitted: bool | None = None) -> tuple[str, ...]:
    """Registered names in registration order: all (None), only fitted, or only not fitted."""
    return tuple(n for n, s in _REGISTRY.items() if fitted is None or s.fitted == fitted)


def get_spec(name: str) -> ControllerSpec:
    """The registration of `name`; an unknown name raises ValueError listing the valid ones."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown controller {name!r}; choose one of "
                         f"{', '.join(controller_names())}.")
    return spec


def specs() -> tuple[ControllerSpec, ...]:
    """Every registration, in registration order."""
    return tuple(_REGISTRY.values())


def make_controller(name: str, **options: Any) -> Controller:
    """Build the controller registered as `name` with `options` (the rest: its defaults).

    Raises ValueError: for an unknown name (listing the valid ones), for an option this
    controller does not take (listing those it takes), and for a bad value (OptionError,
    naming the option with an example). A fitted controller may raise its file errors too.
    """
    return get_spec(name).build(**options)


def applicable_options(name: str, **options: Any) -> dict[str, Any]:
    """The subset of `options` that controller `name` takes, for sweeps over several
    controllers (e.g. `make_controller(n, **applicable_options(n, threshold=0.5))` for every
    name n: the threshold goes to those that have one)."""
    names = get_spec(name).option_names
    return {k: v for k, v in options.items() if k in names}


@dataclasses.dataclass(frozen=True)
class SharedOption:
    """One option name across every controller that takes it (one CLI flag).

    type: the field type without `| None`; help: the first controller's help line;
    controllers: who takes it; defaults: each one's default; choices: of a str option.
    """

    name: str
    type: Any
    help: str
    controllers: tuple[str, ...]
    defaults: Mapping[str, Any]
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return flag_name(self.name)


def shared_options(cli_only: bool = True) -> dict[str, SharedOption]:
    """Every option name of the registry (first-seen order), merged across controllers.

    Raises TypeError when two controllers declare one option name with different types or
    choices (they would need one flag).
    """
    out: dict[str, SharedOption] = {}
    for spec in _REGISTRY.values():
        hints = typing.get_type_hints(spec.options)
        for f in spec.fields:
            if cli_only and not f.metadata.get(CLI, True):
                continue
            tp, _ = _unwrap_optional(hints[f.name])
            choices = f.metadata.get(CHOICES)
            prev = out.get(f.name)
            if prev is None:
                out[f.name] = SharedOption(f.name, tp, f.metadata[HELP], (spec.name,),
                                           {spec.name: f.default}, choices)
                continue
            if prev.type is not tp or prev.choices != choices:
                raise TypeError(f"option {f.name} is {prev.type} for {prev.controllers[0]} but "
                                f"{tp} for {spec.name}; one name must mean one kind of value.")
            out[f.name] = dataclasses.replace(
                prev, controllers=prev.controllers + (spec.name,),
                defaults={**prev.defaults, spec.name: f.default})
    return out


__all__ = ["ControllerOptions", "ControllerSpec", "OptionError", "SharedOption",
           "applicable_options", "controller_names", "flag_name", "get_spec", "make_controller",
           "option", "register", "require", "shared_options", "specs"]
