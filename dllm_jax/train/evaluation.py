"""Held-out evaluation of a trained task model: score decodes of split='test' instances.

    results = evaluate(params, model_cfg, tasks=("sort", "add"), n=100)
    print(format_results(results))    # markdown: valid / exact / partial % per task
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from dllm_jax.config import ModelConfig
from dllm_jax.models import Params

if TYPE_CHECKING:
    from dllm_jax.tokenizer import Tokenizer


def task_tokenizer() -> "Tokenizer":
    """The task tokenizer in memory (no files): what `dllm-jax train` writes beside a model."""
    from dllm_jax.tasks.vocab import build_backend
    from dllm_jax.tokenizer import Tokenizer

    return Tokenizer(backend=build_backend(),
                     special_tokens={"eos_token": "<eos>", "pad_token": "<pad>"})


def evaluate(
    params: Params,
    model_cfg: ModelConfig,
    *,
    tasks: Sequence[str] | None = None,
    n: int = 100,
    seed: int = 12345,
    prompt_length: int = 32,
    gen_length: int = 32,
    block_length: int | None = None,
    steps: int | None = None,
    controller: str = "low_confidence",
    batch_size: int = 100,
    task_set: str = "v1",
) -> dict[str, dict[str, float]]:
    """Score decodes of held-out (split='test') instances at the default difficulty.

    Prompts are left-padded to `prompt_length` (the training layout). Defaults decode one
    token per step (`steps = gen_length`, one block, low-confidence remasking), as
    `dllm-jax generate` does. Returns `{task: {valid, exact, partial, n}}` (fractions over the
    n instances).
    """
    from controllers import make_controller
    from dllm_jax.config import GenerateConfig
    from dllm_jax.scoring import decode_and_score, summarize
    from dllm_jax.tasks import TASK_SETS

    tok = task_tokenizer()
    gen = GenerateConfig(gen_length=gen_length, block_length=block_length or gen_length,
                         steps=steps or gen_length)
    ctl = make_controller(controller)
    results: dict[str, dict[str, float]] = {}
    registry = TASK_SETS[task_set]
    for name in tasks or tuple(registry):
        task = registry[name]
        insts = task.generate(seed, n, split="test")
        scored = decode_and_score(params, model_cfg, tok, task, insts, gen, ctl,
                                  batch_size=batch_size, width=prompt_length)
        s = summarize(scored)
        results[name] = {"valid": s["valid"], "exact": s["exact"], "partial": s["partial"],
                         "n": n}
    return results


def format_results(results: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table of `evaluate` results (percentages)."""
    from dllm_jax.tasks import TASKS, TASKS_V2

    lines = ["| task | dependency | valid % | exact % | partial % | n |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        task = TASKS.get(name) or TASKS_V2.get(name)
        dep = task.dependency if task is not None else "?"
        lines.append(f"| {name} | {dep} | {100 * r['valid']:.1f} | {100 * r['exact']:.1f} | "
                     f"{100 * r['partial']:.1f} | {int(r['n'])} |")
    mean = np.mean([r["valid"] for r in results.values()]) if results else float("nan")
    lines.append(f"| **mean** | | **{100 * mean:.1f}** | | | |")
    return "\n".join(lines)


__all__ = ["evaluate", "format_results", "task_tokenizer"]
