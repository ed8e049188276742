"""`python -m checkpoints_convert SRC DST [--dtype bfloat16|float32] [--overwrite]`."""

import argparse
import sys

from checkpoints_convert.convert import add_arguments, run
from dllm_jax.cli import run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m checkpoints_convert",
        description="Convert a Hugging Face LLaDA / Dream / SDAR checkpoint into a dllm-jax checkpoint.",
    )
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
