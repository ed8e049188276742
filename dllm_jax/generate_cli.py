"""`dllm-jax generate`: decode one prompt with a converted (or the bundled) model.

Contract (other tools call exactly this):

    dllm-jax generate [PROMPT] [--model DIR] (--prompt TEXT | --prompt-ids 1,2,3)
        [--gen-length N --block-length N --steps N --controller NAME --threshold X
         --factor X --temperature X --cfg X --seed N --cache none|prefix|dual
         --draft-model DIR (simsd)] [--json]

With --quantize int8 the model's matrices are quantised to int8 at load time
(`dllm_jax.quant`).

With --json it prints one JSON object: {"tokens": [...], "text": "...", "nfe": N, "steps": N}
where tokens are the answer ids before the first EOS.
"""

from __future__ import annotations

import argparse
import json
import sys

from dllm_jax import draft_cli
from dllm_jax.cli_options import (UsageError, add_generation_options, add_quantize_option,
                                  check_quantize, decode_settings)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UsageError(f"--prompt-ids must be comma-separated integers, got {text!r}; "
                         f"e.g. --prompt-ids 12,7,99.") from None
    if not ids:
        raise UsageError("--prompt-ids is empty; give at least one token id.")
    return ids


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", default=None, metavar="PROMPT",
                   help="prompt text (same as --prompt)")
    p.add_argument("--model", default=None,
                   help="model folder from `dllm-jax convert` (default: the bundled model)")
    p.add_argument("--prompt", default=None, help="prompt text")
    p.add_argument("--prompt-ids", default=None, help="prompt as comma-separated token ids")
    add_generation_options(p)
    draft_cli.add_argument(p)
    add_quantize_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--show-steps", action="store_true", help="print the answer after each "
                   "step, committed tokens in brackets (to stderr with --json)")
    p.add_argument("--trace-png", default=None, metavar="FILE",
                   help="write a heatmap of the step each answer token was committed")


def run(args: argparse.Namespace) -> int:
    import jax

    from dllm_jax import session
    from dllm_jax.decode import GenerateError
    from dllm_jax.tokenizer import TokenizerError

    check_quantize(args.quantize)
    text = args.prompt if args.prompt is not None else args.text
    if args.prompt is not None and args.text is not None:
        raise UsageError("give the prompt once: either as PROMPT or with --prompt.")
    if (text is None) == (args.prompt_ids is None):
        raise UsageError("give exactly one of PROMPT/--prompt TEXT or --prompt-ids 1,2,3.")
    sess = session.load(args.model, quantize=args.quantize)
    try:
        ids = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else sess.encode(
            text, chat=args.chat)
        gen, controller = decode_settings(args, str(sess.model_dir))
        draft = None
        if args.draft_model is not None:
            draft_cli.refuse_unless_speculative(controller.verify is not None, args.controller)
            draft = draft_cli.load(draft_cli.resolve(args.draft_model))
        if args.show_steps or args.trace_png:
            from dllm_jax import viz
            answer = viz.generate_showing_steps(
                sess, ids, gen, controller, jax.random.key(args.seed), args.show_steps,
                args.trace_png, file=sys.stderr if args.json else sys.stdout, draft=draft)
        else:
            [answer] = sess.generate([ids], gen, controller, key=jax.random.key(args.seed),
                                     draft=draft)
    except (TokenizerError, GenerateError) as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(answer.to_json()))
    else:
        print(answer.text if sess.tokenizer is not None else " ".join(map(str, answer.tokens)))
        print(f"[nfe={answer.nfe} steps={answer.steps}]", file=sys.stderr)
    return 0
