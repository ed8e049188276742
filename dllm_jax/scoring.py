"""Decode task instances and score the answers: the one decode-and-score of the library.

Training evaluation (`dllm_jax.train.evaluation`) and the quality bench (`dllm_jax.bench.quality`)
both call `decode_and_score`: encode each instance's prompt with the model's tokenizer,
left-pad the prompts to one fixed `[rows, width]` batch (`session.left_pad`, so every batch of
a setting compiles once), decode with `decode.generate`, cut each answer at EOS
(`session.cut_at_eos`), decode its text and score it with the task's own scorer.

    from dllm_jax.scoring import decode_and_score, summarize
    scored = decode_and_score(params, cfg, tok, get_task("sort"), insts, gen, ctrl, batch_size=64)
    summarize(scored)   # {"valid": 0.93, "exact": 0.93, "partial": 0.97, "nfe": 32.0, "n": 100}

`decode_and_score_mixed` does the same for (task, instance) pairs of several tasks in one
batch stream (one prompt width, so one compile for all of them).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Sequence

import numpy as np

from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.session import cut_at_eos, left_pad
from dllm_jax.tasks import Instance, Score, Task

#: Answer length of a model folder without train_config.json (as `dllm-jax generate`).
DEFAULT_ANSWER_LENGTH = 32


@dataclasses.dataclass(frozen=True)
class Scored:
    """One decoded and scored instance.

    Attributes:
      score: the task's Score of the answer text (valid, exact, partial).
      nfe: forward passes the decode spent on this row.
      ids: the answer ids before the first EOS.
      text: their text (special tokens dropped), what the task scored.
      row: every answer position as decoded, `gen_length` ids (EOS padding included), for
        metrics that look past the first EOS (content tokens, `dllm_jax.bench.stats`).
    """

    score: Score
    nfe: int
    ids: list[int]
    text: str
    row: tuple[int, ...] = ()


def prompt_width(tokenizer: Any, instances: Sequence[Instance]) -> int:
    """The longest prompt of `instances` in tokens (a shared `width` for `decode_and_score`)."""
    return max(len(tokenizer.encode(x.prompt)) for x in instances)


def decode_and_score(params: Any, cfg: ModelConfig, tokenizer: Any, task: Task,
                     instances: Sequence[Instance], gen: GenerateConfig, controller: Any, *,
                     batch_size: int, width: int | None = None, key: Any = None,
                     draft: tuple[Any, ModelConfig] | None = None) -> list[Scored]:
    """Decode every instance's prompt and score the answer with `task.score`.

    Args:
      params, cfg: the model (any params layout `decode.generate` accepts).
      tokenizer: `dllm_jax.tokenizer.Tokenizer` of the model (encodes prompts, decodes answers;
        its `pad_id` pads, its `eos_id` (else `cfg.eos_token_id`) ends an answer).
      task, instances: what to decode and how to score it.
      gen, controller: the decode settings and controller (see `decode.generate`).
      batch_size: rows per `generate` call; every call gets `[min(batch_size, n), width]`
        (the last batch is filled with copies of its first prompt, dropped from the result).
      width: prompt columns (default: the longest prompt of `instances`); pass one width for
        several calls so that they share a compile.
      key: PRNG key of the decodes (None: `generate`'s default).
      draft: (params, cfg) of a draft model for a speculative controller (`generate`'s
        draft_params / draft_cfg), or None (self-drafting).
    Returns:
      one Scored per instance, in order.
    """
    return decode_and_score_mixed(params, cfg, tokenizer, [(task, x) for x in instances], gen,
                                  controller, batch_size=batch_size, width=width, key=key,
                                  draft=draft)


def decode_and_score_mixed(params: Any, cfg: ModelConfig, tokenizer: Any,
                           items: Sequence[tuple[Task, Instance]], gen: GenerateConfig,
                           controller: Any, *, batch_size: int, width: int | None = None,
                           key: Any = None, draft: tuple[Any, ModelConfig] | None = None
                           ) -> list[Scored]:
    """`decode_and_score` over (task, instance) pairs that may belong to different tasks:
    rows of several tasks share each `generate` call, each answer is scored by its own task.

    Every call gets `[min(batch_size, len(items)), width]` prompt ids, so all calls share one
    compile. Returns one Scored per item, in order (see `decode_and_score` for the args).
    """
    from dllm_jax.decode import generate

    if not items:
        return []
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    drafting = {} if draft is None else dict(draft_params=draft[0], draft_cfg=draft[1])
    seqs = [tokenizer.encode(inst.prompt) for _, inst in items]
    width = max(len(s) for s in seqs) if width is None else int(width)
    rows = min(int(batch_size), len(seqs))
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else cfg.eos_token_id
    out: list[Scored] = []
    for start in range(0, len(seqs), rows):
        chunk = seqs[start:start + rows]
        ids, valid = left_pad(chunk, tokenizer.pad_id, width, rows)      # [rows, width]
        res = generate(params, cfg, ids, gen, controller, prompt_valid=valid, key=key,
                       **drafting)
        tokens = np.asarray(res.tokens)[:len(chunk)]                     # [k, gen_length]
        nfes = np.asarray(res.stats.nfe)[:len(chunk)]                    # [k]
        for (task, inst), row, nfe in zip(items[start:start + rows], tokens, nfes):
            answer = cut_at_eos(row, eos)
            text = tokenizer.decode(answer, skip_special_tokens=True)
            out.append(Scored(task.score(inst, text), int(nfe), answer, text,
                              tuple(int(t) for t in row)))
    return out


def summarize(scored: Sequence[Scored]) -> dict[str, float]:
    """Fractions of valid / exact answers, mean partial credit and mean NFE over `scored`,
    and their count `n`."""
    if not scored:
        return {"valid": float("nan"), "exact": float("nan"), "partial": float("nan"),
                "nfe": float("nan"), "n": 0}
    return {"valid": statistics.fmean(s.score.valid for s in scored),
            "exact": statistics.fmean(s.score.exact for s in scored),
            "partial": statistics.fmean(s.score.partial for s in scored),
            "nfe": statistics.fmean(s.nfe for s in scored), "n": len(scored)}


__all__ = ["DEFAULT_ANSWER_LENGTH", "Scored", "decode_and_score", "decode_and_score_mixed",
           "prompt_width", "summarize"]
