"""Tiny random DiffusionGemma models built with transformers' own classes, saved in the Hugging
Face layout (`save_pretrained`: safetensors + config.json, vision tower included), converted
with `python -m checkpoints_convert SRC DST --dtype float32` in a subprocess and loaded with
`dllm_jax.checkpoint.load_model` (shared by tests/test_diffusion_gemma*.py).

The text config has both layer types (sliding layers with a window of 5 keys, full layers
with their own head dim 16, one k=v head, proportional RoPE over a quarter of it), MoE on
every layer and a logit soft-cap; every weight and buffer is randomised (norm scales, router
and per-expert scales, encoder and decoder `layer_scalar`s differ)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from dllm_jax.checkpoint import load_model

CANVAS = 8
TEXT: dict[str, Any] = dict(
    vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=5,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    layer_types=["sliding_attention", "sliding_attention", "full_attention",
                 "sliding_attention", "full_attention"],
    sliding_window=5, global_head_dim=16, num_global_key_value_heads=1,
    num_experts=4, top_k_experts=2, moe_intermediate_size=12, final_logit_softcapping=5.0,
    max_position_embeddings=128, rms_norm_eps=1e-6, eos_token_id=1, pad_token_id=0,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional",
                                        "partial_rotary_factor": 0.25, "rope_theta": 1e6}},
)
VISION: dict[str, Any] = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=8, intermediate_size=16,
                              patch_size=4, position_embedding_size=64)


def randomize(model: torch.nn.Module, seed: int, embed_std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:                    # norm scales, router scale, per-expert scale
                p.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(embed_std * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def build_and_convert(tmp: Path, embed_std: float = 0.5, seed: int = 1, **text: Any
                      ) -> tuple[Any, Any, Any, str]:
    """(transformers model on eager kernels, our ModelConfig, our params, converter stderr);
    the HF folder is `tmp / "hf"`, ours `tmp / "ours"`."""
    cfg = DiffusionGemmaConfig(text_config={**TEXT, **text}, vision_config=dict(VISION),
                               canvas_length=CANVAS)
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    model.set_attn_implementation("eager")       # the modeling file's own attention and
    model.set_experts_implementation("eager")    # expert loop, not sdpa / grouped_mm kernels
    randomize(model, seed, embed_std)
    model.save_pretrained(tmp / "hf")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-m", "checkpoints_convert", str(tmp / "hf"),
                           str(tmp / "ours"), "--dtype", "float32"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ours_cfg, params = load_model(tmp / "ours")
    return model, ours_cfg, params, proc.stderr
