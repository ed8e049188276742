"""SDAR (`JetLM/SDAR-*`, Qwen3-based `modeling_sdar.py`): a Qwen3 decoder with block-causal
attention (`ModelConfig.block_causal`: causal across blocks, bidirectional inside one).

Hugging Face names are Qwen2's (`qwen2.QWEN_NAMES`) plus per-head RMSNorm weights
`self_attn.q_norm` / `self_attn.k_norm` [head_dim]; q/k/v biases only with `attention_bias`.
With `attention_bias` Qwen3 also gives `o_proj` a bias, which our model lacks: `ModelConfig`
refuses such configs (and an `o_proj.bias` tensor would be reported as unknown).
"""

from dllm_jax.models.params import Family, dense_decoder
from dllm_jax.models.qwen2 import HF_SKIP, QWEN_NAMES

FAMILY = Family(arch="sdar", weights=dense_decoder(QWEN_NAMES), hf_skip=HF_SKIP)
