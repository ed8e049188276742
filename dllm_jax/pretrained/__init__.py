"""The small model that ships with dllm-jax (the default of `dllm-jax generate`).

A LLaDA-architecture denoiser (~4.6M params, float32) trained by `dllm_jax.train` on all task
families of `dllm_jax.tasks`; its folder holds `dllm_config.json`, `params/` (orbax),
`tokenizer.json`, `tokenizer_config.json` and `train_config.json` (how it was trained). Prompts
are task prompts such as ``sort: Eve Bob Zoe`` (up to 32 tokens); answers are up to 32 tokens,
padded with ``<eos>``. Held-out accuracies: benchmarks/RESULTS.md.

    from dllm_jax.checkpoint import load_model
    from dllm_jax.pretrained import bundled_model_dir
    cfg, params = load_model(bundled_model_dir())
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_NAME = "tasks-llada-4.6m"


def bundled_model_dir() -> Path:
    """Path of the bundled model folder (loadable with `load_model` and `Tokenizer.from_dir`).

    Raises:
        FileNotFoundError: the package was installed without its model files.
    """
    path = Path(__file__).resolve().parent / BUNDLED_MODEL_NAME
    if not (path / "dllm_config.json").is_file():
        raise FileNotFoundError(
            f"the bundled model is missing from {path}; reinstall dllm-jax (the wheel ships it) "
            f"or pass --model DIR.")
    return path


__all__ = ["BUNDLED_MODEL_NAME", "bundled_model_dir"]
