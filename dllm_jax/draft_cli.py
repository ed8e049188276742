"""`--draft-model DIR`: the draft model of a speculative controller, one flag shared by
`dllm-jax generate`, `dllm-jax batch` and `dllm-jax bench quality` (a command-line module:
the flag, its checks and the loading, with errors as one sentence naming the flag).

A draft model is a (smaller) model folder with the target's tokenizer whose predictions draft
the masked positions instead of the target's own (self-drafting, the default). Only a
controller that verifies drafts (one that declares `verify`: `simsd`) uses it; the flag given
with any other controller is refused, and so is a folder that is missing or not a converted
model, each in one sentence naming the flag (no traceback). A draft whose vocabulary or MASK
id differs from the target's is refused by the decode (`decode.GenerateError`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dllm_jax.cli_options import UsageError

FLAG = "--draft-model"


def add_argument(p: argparse.ArgumentParser, extra_help: str = "") -> None:
    """The `--draft-model DIR` flag (dest `draft_model`, default None: self-drafting)."""
    p.add_argument(FLAG, default=None, metavar="DIR",
                   help="with --controller simsd: a smaller model folder with the same "
                        "tokenizer that drafts the masked positions (default: self-drafting)"
                        + extra_help)


def refuse_unless_speculative(speculative: bool, not_by: str, *,
                              uses: str = "a speculative controller (--controller simsd)",
                              fix: str = f"drop {FLAG}") -> None:
    """UsageError "--draft-model is used only by USES, not by NOT_BY; FIX." unless the run
    has a speculative controller to draft for."""
    if not speculative:
        raise UsageError(f"{FLAG} is used only by {uses}, not by {not_by}; {fix}.")


def _named(e: Exception) -> UsageError:
    text = str(e)
    return UsageError(text if FLAG in text else f"{FLAG}: {text}")


def resolve(draft_dir: str) -> Path:
    """The draft model's folder, checked to hold a converted model (its config is read, not
    its weights): SessionError / UsageError naming --draft-model otherwise."""
    from dllm_jax.checkpoint import CheckpointError, load_config
    from dllm_jax.session import resolve_model_dir

    path = resolve_model_dir(draft_dir, FLAG)
    try:
        load_config(path)
    except CheckpointError as e:
        raise _named(e) from None
    return path


def load(draft_dir: str | Path, *, dtype: Any = None, mesh: Any = None) -> Any:
    """`session.load` of the draft model (on the target's `mesh`), errors naming the flag."""
    from dllm_jax import session
    from dllm_jax.checkpoint import CheckpointError

    try:
        return session.load(draft_dir, dtype=dtype, mesh=mesh, flag=FLAG)
    except (CheckpointError, session.SessionError) as e:
        raise _named(e) from None


__all__ = ["FLAG", "add_argument", "load", "refuse_unless_speculative", "resolve"]
