"""`dllm-jax generate`: decode one prompt with a converted (or the bundled) model.

Contract (other tools call exactly this):

    dllm-jax generate [PROMPT] [--model DIR] (--prompt TEXT | --prompt-ids 1,2,3)
        [--gen-length N --block-length N --steps N --controller NAME --threshold X
         --factor X --temperature X --cfg X --seed N --cache none|prefix|dual] [--json]

With --json it prints one JSON object: {"tokens": [...], "text": "...", "nfe": N, "steps": N}
where tokens are the answer ids before the first EOS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from dllm_jax.config import ConfigError

DEFAULT_GEN_LENGTH = 32


class UsageError(ConfigError):
    """A command-line input that cannot be used; the message says how to fix it."""


def _default_model_dir() -> str:
    try:
        from dllm_jax.pretrained import bundled_model_dir
    except ImportError:
        raise UsageError("no --model given and no bundled model is installed; pass --model DIR "
                         "(a folder made by `dllm-jax convert`).") from None
    return str(bundled_model_dir())


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UsageError(f"--prompt-ids must be comma-separated integers, got {text!r}; "
                         f"e.g. --prompt-ids 12,7,99.") from None
    if not ids:
        raise UsageError("--prompt-ids is empty; give at least one token id.")
    return ids


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """The decode options shared by `dllm-jax generate` and `dllm-jax batch`."""
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template (instruct models)")
    p.add_argument("--gen-length", type=int, default=None,
                   help=f"answer tokens (default {DEFAULT_GEN_LENGTH})")
    p.add_argument("--block-length", type=int, default=None,
                   help="tokens per semi-autoregressive block (default: gen-length)")
    p.add_argument("--steps", type=int, default=None, help="step budget (default: gen-length)")
    p.add_argument("--controller", default="low_confidence",
                   help="low_confidence | random | threshold | factor | maskgit_plus | "
                        "topk_margin | entropy | origin | ce | r2 | tspd (fitted: the "
                        "model folder's tspd.json)")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--factor", type=float, default=1.0)
    p.add_argument("--alg-temp", type=float, default=0.0)
    p.add_argument("--tau", type=float, default=None,
                   help="tspd: commit threshold on p(converged) (default: the fitted file's)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--cfg", type=float, default=0.0, help="classifier-free guidance scale")
    p.add_argument("--cache", default="none", help="KV cache: none | prefix | dual")
    p.add_argument("--refresh-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def decode_settings(args: argparse.Namespace, model_dir: str) -> tuple[Any, Any]:
    """(GenerateConfig, controller) from the options of `add_generation_options`; bad values
    raise UsageError with the reason."""
    from controllers import make_controller
    from dllm_jax.config import GenerateConfig

    try:
        gen_length = args.gen_length or DEFAULT_GEN_LENGTH
        gen = GenerateConfig(
            gen_length=gen_length, block_length=args.block_length or gen_length,
            steps=args.steps or gen_length, temperature=args.temperature, cfg_scale=args.cfg,
            cache=args.cache, refresh_every=args.refresh_every)
        controller = make_controller(args.controller, threshold=args.threshold,
                                     factor=args.factor, alg_temp=args.alg_temp, tau=args.tau,
                                     model_dir=model_dir)
    except ValueError as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(str(e)) from None
    return gen, controller


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", default=None, metavar="PROMPT",
                   help="prompt text (same as --prompt)")
    p.add_argument("--model", default=None,
                   help="model folder from `dllm-jax convert` (default: the bundled model)")
    p.add_argument("--prompt", default=None, help="prompt text")
    p.add_argument("--prompt-ids", default=None, help="prompt as comma-separated token ids")
    add_generation_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from dllm_jax.checkpoint import load_model
    from dllm_jax.decode import GenerateError, generate
    from dllm_jax.model import decode_layout
    from dllm_jax.tokenizer import Tokenizer, TokenizerError

    text = args.prompt if args.prompt is not None else args.text
    if args.prompt is not None and args.text is not None:
        raise UsageError("give the prompt once: either as PROMPT or with --prompt.")
    if (text is None) == (args.prompt_ids is None):
        raise UsageError("give exactly one of PROMPT/--prompt TEXT or --prompt-ids 1,2,3.")
    model_dir = args.model or _default_model_dir()
    if not os.path.isdir(model_dir):
        raise UsageError(f"model folder {model_dir} does not exist; pass --model DIR from "
                         f"`dllm-jax convert`.")
    cfg, params = load_model(model_dir)
    params = decode_layout(params)
    tok = None
    if os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        tok = Tokenizer.from_dir(model_dir)
    try:
        if args.prompt_ids is not None:
            ids = _parse_ids(args.prompt_ids)
        else:
            if tok is None:
                raise UsageError(f"{model_dir} has no tokenizer.json, so a text prompt cannot be "
                                 f"encoded; pass --prompt-ids or copy the tokenizer files there.")
            if not text.strip():
                raise UsageError("the prompt is empty; give some text.")
            if args.chat:
                text = tok.apply_chat_template([{"role": "user", "content": text}])
            ids = tok.encode(text)
        gen, controller = decode_settings(args, model_dir)
        out = generate(params, cfg, np.asarray([ids], np.int32), gen, controller,
                       key=jax.random.key(args.seed))
    except (ValueError, TokenizerError, GenerateError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(str(e)) from None
    answer = [int(t) for t in np.asarray(out.tokens[0])]
    if cfg.eos_token_id in answer:
        answer = answer[:answer.index(cfg.eos_token_id)]
    text_out = tok.decode(answer) if tok is not None else ""
    result: dict[str, Any] = {"tokens": answer, "text": text_out,
                              "nfe": int(out.stats.nfe[0]), "steps": int(out.stats.steps)}
    if args.json:
        print(json.dumps(result))
    else:
        print(text_out if tok is not None else " ".join(map(str, answer)))
        print(f"[nfe={result['nfe']} steps={result['steps']}]", file=sys.stderr)
    return 0
