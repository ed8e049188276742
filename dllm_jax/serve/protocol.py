"""Request models of the OpenAI-compatible server, their validation, and the translation of a
request into decode settings (`GenerateConfig` + controller) on top of the server defaults.

Validation is strict: an unknown field, a value of the wrong type (`"n": "2"`) or out of range
(`max_tokens: 0`) is an `ApiError` (HTTP 400) whose body names the field in `param`, in
OpenAI's error format `{"error": {"message", "type", "param", "code"}}`.

Fields: the OpenAI ones that apply (`model`, `prompt` / `messages`, `max_tokens` = answer
length, `temperature`, `seed`, `stop`, `n`, `stream`, `stream_options`, `user`; `top_p`,
`presence_penalty`, `frequency_penalty` only at their neutral values 1 / 0, since clients send
them by default) plus the dLLM ones under their own names: `controller`, `block_length`,
`steps`, `cache`, `refresh_every`, `cfg`, and every controller option of the registry
(`threshold`, `factor`, `alg_temp`, `tau`, CE's `horizon`, ...), each accepted only by the
controllers that take it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from dllm_jax.config import ConfigError, GenerateConfig

# `dllm-jax generate`'s defaults (cli_options.DEFAULT_GEN_LENGTH, add_generation_options);
# tests/test_serve.py checks that they agree.
DEFAULT_GEN_LENGTH = 32
DEFAULT_CONTROLLER = "low_confidence"
#: Controllers whose decisions draw on the PRNG key (besides temperature > 0).
RANDOM_CONTROLLERS = ("random", "origin")
MAX_STOP = 4
MAX_SEED = 2 ** 63 - 1  # as `dllm-jax generate --seed`


class ApiError(Exception):
    """An error answered in OpenAI's format; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_field(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


# ----------------------------------------------------------------------------- models
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    top_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    # dLLM decode settings
    controller: Optional[str] = None
    block_length: Optional[int] = Field(None, ge=1)
    steps: Optional[int] = Field(None, ge=1)
    cache: Optional[Literal["none", "prefix", "dual"]] = None
    refresh_every: Optional[int] = Field(None, ge=0)
    cfg: Optional[float] = Field(None, ge=0.0)


class _Completion(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]


class _Chat(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


_PY_TYPES = {float: float, int: int, bool: bool, str: str}


def _controller_fields() -> dict[str, Any]:
    """One optional field per controller option of the registry (values checked later, by the
    chosen controller's options class)."""
    from controllers import shared_options

    out: dict[str, Any] = {}
    for name, opt in shared_options(cli_only=True).items():
        if name in _Common.model_fields:
            continue
        tp = _PY_TYPES.get(opt.type, Any)
        if opt.choices:
            tp = Literal[tuple(opt.choices)]  # type: ignore[valid-type]
        out[name] = (Optional[tp], None)
    return out


_MODELS: dict[str, type[BaseModel]] = {}


def request_model(kind: str) -> type[BaseModel]:
    """The pydantic model of a `completion` or `chat` request (built once, with the
    registry's controller options as fields)."""
    if kind not in _MODELS:
        base = {"completion": _Completion, "chat": _Chat}[kind]
        _MODELS[kind] = create_model(f"{base.__name__[1:]}Request", __base__=base,
                                     **_controller_fields())
    return _MODELS[kind]


def controller_option_names() -> tuple[str, ...]:
    from controllers import shared_options

    return tuple(shared_options(cli_only=True))


def _param(loc: tuple[Any, ...]) -> str | None:
    """A pydantic error location -> the field as OpenAI names it: `n`, `messages[0].role`
    (the union-member tags pydantic adds, like `str`, are dropped)."""
    if not loc or not isinstance(loc[0], str):
        return None
    out = loc[0]
    if out == "messages" and len(loc) > 1 and isinstance(loc[1], int):
        out += f"[{loc[1]}]"
        if len(loc) > 2 and loc[2] in Message.model_fields:
            out += f".{loc[2]}"
    return out


def parse_request(kind: str, body: Any) -> BaseModel:
    """Validate a decoded JSON body; raises ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.", code="invalid_json")
    try:
        req = request_model(kind).model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            msg = f"unknown field {param!r}; this server does not support it."
        elif err["type"] == "missing":
            msg = f"field {param!r} is required."
        else:
            msg = f"invalid value for {param!r}: {err['msg']}."
        raise ApiError(400, msg, param=param, code=err["type"]) from None
    for name, neutral in (("top_p", 1.0), ("presence_penalty", 0.0),
                          ("frequency_penalty", 0.0)):
        value = getattr(req, name)
        if value is not None and value != neutral:
            raise bad_field(name, f"{name} is not supported by diffusion decoding; omit it or "
                                  f"send {neutral}.")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise bad_field("stop", f"stop must be a non-empty string or a list of up to {MAX_STOP} "
                                f"non-empty strings.")
    return req


def stop_strings(req: Any) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


# ----------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class ServeDefaults:
    """The server's decode settings for fields a request leaves out: `dllm-jax generate`'s
    defaults unless `dllm-jax serve` was given generation flags (block_length / steps None:
    the answer length, as in `generate`)."""

    gen_length: int = DEFAULT_GEN_LENGTH
    block_length: int | None = None
    steps: int | None = None
    temperature: float = 0.0
    cfg: float = 0.0
    cache: str = "none"
    refresh_every: int = 0
    seed: int = 0
    controller: str = DEFAULT_CONTROLLER
    controller_options: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """What a request decodes with. `controller_key` (name, sorted options) identifies the
    controller; `uses_key`: the decode draws on the PRNG key, so the request decodes in a
    batch of its own with `key(seed)` (its answers then do not depend on other requests)."""

    gen: GenerateConfig
    controller_key: tuple[str, tuple[tuple[str, Any], ...]]
    seed: int
    uses_key: bool

    @property
    def group(self) -> tuple[Any, ...]:
        """Requests with equal groups may share a batch."""
        return (self.gen, self.controller_key)


def _length_fields(req: Any, d: ServeDefaults, max_answer: int) -> tuple[int, int, int, str]:
    mt = getattr(req, "max_completion_tokens", None)
    name = "max_completion_tokens" if mt is not None else "max_tokens"
    gen_length = mt if mt is not None else (req.max_tokens or d.gen_length)
    if gen_length > max_answer:
        raise bad_field(name, f"{name} must be at most {max_answer} (the model's maximum "
                              f"length leaves no room for the prompt beyond that), got "
                              f"{gen_length}.")
    block = req.block_length or d.block_length or gen_length
    note = "" if req.block_length else ", the server's default"
    if block > gen_length or gen_length % block:
        raise bad_field("block_length", f"block_length ({block}{note}) must divide the answer "
                                        f"length {name} ({gen_length}).")
    steps = req.steps or d.steps or gen_length
    blocks = gen_length // block
    if steps % blocks:
        note = "" if req.steps else ", the server's default"
        raise bad_field("steps", f"steps ({steps}{note}) must be a multiple of the number of "
                                 f"blocks ({blocks} = answer length / block_length), e.g. "
                                 f"{max(1, round(steps / blocks)) * blocks}.")
    return gen_length, block, steps, name


def decode_settings(req: Any, defaults: ServeDefaults, max_answer: int) -> DecodeSettings:
    """A validated request -> its DecodeSettings; ApiError(400) naming the field otherwise."""
    from controllers import get_spec

    gen_length, block, steps, _ = _length_fields(req, defaults, max_answer)
    temperature = defaults.temperature if req.temperature is None else req.temperature
    try:
        gen = GenerateConfig(
            gen_length=gen_length, block_length=block, steps=steps, temperature=temperature,
            cfg_scale=defaults.cfg if req.cfg is None else req.cfg,
            cache=req.cache or defaults.cache,
            refresh_every=defaults.refresh_every if req.refresh_every is None
            else req.refresh_every)
    except ConfigError as e:
        raise bad_field("max_tokens", str(e)) from None
    name = req.controller or defaults.controller
    try:
        spec = get_spec(name)
    except ValueError as e:
        raise bad_field("controller", str(e)) from None
    given = {k: getattr(req, k) for k in controller_option_names()
             if getattr(req, k, None) is not None}
    foreign = [k for k in given if k not in spec.cli_option_names]
    if foreign:
        raise bad_field(foreign[0], f"{foreign[0]} does not apply to controller {name}; "
                                    f"{spec.takes_text()}.")
    options = dict(defaults.controller_options) if req.controller is None else {}
    options.update(given)
    # every option spelled out, so that equal controllers get equal keys (and share batches)
    merged = {k: v for k, v in {**spec.defaults(), **options}.items()
              if k in spec.cli_option_names}
    uses_key = (temperature > 0 or name in RANDOM_CONTROLLERS or req.seed is not None
                or (merged.get("alg_temp") or 0) > 0 or merged.get("r2_token_cluster") == "random")
    return DecodeSettings(gen=gen, controller_key=(name, tuple(sorted(merged.items()))),
                          seed=defaults.seed if req.seed is None else req.seed,
                          uses_key=uses_key)


__all__ = ["ApiError", "DEFAULT_CONTROLLER", "DEFAULT_GEN_LENGTH", "DecodeSettings", "Message",
           "ServeDefaults", "bad_field", "decode_settings", "parse_request", "request_model",
           "stop_strings"]
