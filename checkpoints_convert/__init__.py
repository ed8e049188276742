"""Convert Hugging Face PyTorch checkpoints (LLaDA, Dream, SDAR, DiffusionGemma's text part) into
dllm_jax params.

    python -m checkpoints_convert SRC DST [--dtype bfloat16|float32] [--overwrite]
    dllm-jax convert SRC DST ...

or from Python: `checkpoints_convert.convert(src, dst)`; load the result with
`dllm_jax.checkpoint.load_model(dst)`.
"""

from checkpoints_convert.convert import ConvertResult, convert

__all__ = ["ConvertResult", "convert"]
