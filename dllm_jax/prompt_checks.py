"""The rules a prompt batch must meet before a decode, written once: `decode.generate` raises
them as GenerateError on a padded batch, `session.check_prompt_ids` as SessionError on one
prompt (so a batch file can reject a line before any batch is built)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dllm_jax.config import ModelConfig


def prompt_problem(prompt: Any, valid: Any, cfg: ModelConfig, gen_length: int) -> str | None:
    """The sentence saying what is wrong with left-padded prompt ids `[B, P]` (`valid [B, P]`
    bool, None: no padding) for a `gen_length`-token answer of a `cfg` model, or None."""
    prompt = np.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        return f"the prompt is empty (shape {prompt.shape}); give at least one token per row."
    if not np.issubdtype(prompt.dtype, np.integer):
        return f"prompt ids must be integers, got dtype {prompt.dtype}."
    valid = np.ones(prompt.shape, bool) if valid is None else np.asarray(valid, bool)
    if valid.shape != prompt.shape:
        return f"prompt_valid has shape {valid.shape} but the prompt has {prompt.shape}."
    if not valid.any(axis=1).all():
        return "a prompt row has no tokens (all padding); give every row a prompt."
    bad = prompt[((prompt < 0) | (prompt >= cfg.vocab_size)) & valid]
    if bad.size:
        return f"prompt ids must lie in [0, {cfg.vocab_size}), got {bad[:5].tolist()}."
    total = prompt.shape[1] + gen_length
    if total > cfg.max_position:
        return (f"prompt ({prompt.shape[1]}) + answer ({gen_length}) = {total} tokens exceeds "
                f"the model's maximum length {cfg.max_position}; shorten the prompt or "
                f"--gen-length.")
    return None


__all__ = ["prompt_problem"]
