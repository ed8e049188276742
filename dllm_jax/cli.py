"""The `dllm-jax` command line: one subcommand per entry of `SUBCOMMANDS`.

To add a subcommand, write `add_<name>(subparsers)` that creates its parser and sets
`func=<run function>` (a function `argparse.Namespace -> int` exit code), and append it to
`SUBCOMMANDS`. Errors of ours (ConfigError and its subclasses, CheckpointError,
TokenizerError, ...) and file-system errors (OSError: a full disk, a missing file) are printed
as one line `error: ...` with exit code 2; a command-line argument argparse cannot parse is one
line too (not the whole usage); anything else keeps its traceback (a bug to report). Log noise
of orbax / absl is silenced on these paths, so our sentence is the only output of a failure.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Callable, NoReturn

from dllm_jax import compile_cache
from dllm_jax.checkpoint import CheckpointError
from dllm_jax.config import ConfigError
from dllm_jax.mesh import ShardingError
from dllm_jax.tokenizer import TokenizerError

RunFn = Callable[[argparse.Namespace], int]
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, TokenizerError,
                                               ShardingError)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (`error: argument --steps: invalid int value: 'x'; see
    `dllm-jax generate --help`.`) instead of the whole usage text; subparsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see `{self.prog} --help`.\n")


def add_convert(subparsers: argparse._SubParsersAction) -> None:
    """`dllm-jax convert SRC DST`: Hugging Face checkpoint folder -> dllm-jax checkpoint folder."""
    from checkpoints_convert.convert import add_arguments, run

    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face LLaDA / Dream / SDAR checkpoint",
        description="Convert a Hugging Face LLaDA / Dream / SDAR checkpoint folder (config.json + "
                    "safetensors or .bin weights) into a dllm-jax checkpoint folder.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_export(subparsers: argparse._SubParsersAction) -> None:
    """`dllm-jax export MODEL_DIR HF_DIR`: dllm-jax model folder -> Hugging Face folder."""
    from checkpoints_convert.export import add_arguments, run

    p = subparsers.add_parser(
        "export", help="export a model folder back to its Hugging Face checkpoint layout",
        description="Write a dllm-jax LLaDA / Dream / SDAR model folder as a Hugging Face "
                    "checkpoint folder (safetensors under the original tensor names, "
                    "config.json, tokenizer files): the inverse of convert.")
    add_arguments(p)
    p.set_defaults(func=run)


def add_generate(subparsers: argparse._SubParsersAction) -> None:
    """`dllm-jax generate PROMPT`: decode one prompt (default model: the bundled one)."""
    from dllm_jax.generate_cli import add_arguments, run

    p = subparsers.add_parser(
        "generate", help="decode one prompt with a converted or the bundled model",
        description="Decode one prompt with the jit-compiled dLLM sampler. With --json, print "
                    '{"tokens", "text", "nfe", "steps"}.')
    add_arguments(p)
    p.set_defaults(func=run)


def add_bench(subparsers: argparse._SubParsersAction) -> None:
    """`dllm-jax bench quality`: accuracy vs forward passes on the dependency tasks."""
    from dllm_jax.bench import quality

    p = subparsers.add_parser("bench", help="benchmarks that print tables")
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    q = sub.add_parser("quality", help="task accuracy vs NFE for every controller setting",
                       description=quality.__doc__.splitlines()[0])
    quality.add_arguments(q)
    q.set_defaults(func=quality.run)


def add_train_controller(subparsers: argparse._SubParsersAction) -> None:
    """`dllm-jax train-controller --model DIR [--fit tspd|ce]`: fit a controller for a model."""
    from dllm_jax.train.controller_fit_cli import add_arguments, run

    p = subparsers.add_parser(
        "train-controller", help="fit the TSPD controller (or, --fit ce, the CE filter) on a "
                                 "model's trajectories",
        description="Record decode trajectories of the model on training-split task instances, "
                    "label them against a one-token-per-step decode, fit the TSPD controller "
                    "(optax) and write its parameters to MODEL/tspd.json (or --out FILE). With "
                    "--fit ce: fit the CE filter (q, r, slope_var0) to the reference decode's "
                    "log-odds by predictive likelihood, choose the look-ahead (z, horizon) on "
                    "held-out prompts and write MODEL/ce.json (`--controller ce_fitted`).")
    add_arguments(p)
    p.set_defaults(func=run)


def add_batch(subparsers: argparse._SubParsersAction) -> None:
    """`dllm-jax batch`: JSONL prompts -> JSONL answers, restartable, on a device mesh."""
    from dllm_jax.batch_cli import add_arguments, run

    p = subparsers.add_parser(
        "batch", help="decode a JSONL file of prompts (restartable; meshes and multi-host)",
        description="Decode every {id, prompt | prompt_ids} line of --input and append "
                    "{id, tokens, text, nfe, steps} lines to --output as batches finish. A "
                    "restart skips ids already answered (ids compare as strings: 1 and \"1\" "
                    "are one id) and refuses other decoding settings than those recorded in "
                    "OUTPUT.settings.json (--force-new-settings); OUTPUT.lock keeps a second "
                    "run off the same output. Malformed lines are reported and skipped, and "
                    "the run then exits with status 1 and their count (--max-errors N: stop "
                    "before decoding when more are rejected). --mesh data=2,model=2,seq=2 "
                    "shards the decode; --distributed runs one process per host, each on its "
                    "slice of the input.")
    add_arguments(p)
    p.set_defaults(func=run)


def add_train(subparsers: argparse._SubParsersAction) -> None:
    """`dllm-jax train --out DIR`: masked-diffusion training of a small model on the tasks."""
    from dllm_jax.train.cli import add_arguments, run

    p = subparsers.add_parser(
        "train", help="train a small diffusion LM on the dependency tasks",
        description="Masked-diffusion (LLaDA objective; --block-diffusion for SDAR-style) training "
                    "on dllm_jax.tasks, with orbax checkpoints (--resume) and a model folder at --out.")
    add_arguments(p)
    p.set_defaults(func=run)


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    """`dllm-jax serve`: the OpenAI-compatible HTTP server (needs the `serve` extra)."""
    from dllm_jax.serve.cli import add_arguments, run

    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (batched, streaming)",
        description="Serve /v1/completions, /v1/chat/completions (stream: server-sent events "
                    "replaying the denoising), /v1/models, /health and /metrics; requests "
                    "are batched by a scheduler thread. The generation flags set the "
                    "defaults of fields a request leaves out.")
    add_arguments(p)
    p.set_defaults(func=run)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_convert, add_export, add_generate, add_batch, add_train, add_train_controller, add_bench,
    add_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dllm-jax", description="Fast, jit-compiled decoding of diffusion language models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    for p in sub.choices.values():
        compile_cache.add_arguments(p)
    return parser


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _os_error_message(e: OSError) -> str:
    """An OSError as one sentence naming the file: `cannot use X: No space left on device.`"""
    names = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e)
    return f"cannot use {names}: {reason}." if names else f"{reason}."


def _silence_leftovers() -> None:
    """After our error is printed the process ends; exceptions of background work that is
    torn down with it (orbax's coroutines, closed event loops) are not the user's news."""
    sys.unraisablehook = lambda _args: None


def quiet_logs() -> None:
    """absl (orbax's logger) prints warnings such as missing OCDBT subdirs on every save /
    restore; on the command line only our own lines are printed."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)


def run_command(func: RunFn, args: argparse.Namespace) -> int:
    """Run one subcommand: our errors become `error: ...` on stderr and exit code 2; Ctrl-C and
    SIGTERM unwind (so temporary files are removed) and exit with 130."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        previous = None
    quiet_logs()
    report = compile_cache.enable(getattr(args, "no_compile_cache", False),
                                  getattr(args, "compile_cache_stats", False))
    try:
        return int(func(args) or 0)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _silence_leftovers()
        return 2
    except OSError as e:
        print(f"error: {_os_error_message(e)}", file=sys.stderr, flush=True)
        _silence_leftovers()
        return 2
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr, flush=True)
        _silence_leftovers()
        return 130
    finally:
        report()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dllm-jax` console script."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, one line printed)
        return e.code if isinstance(e.code, int) else 2
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
