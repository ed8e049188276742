"""An independent, minimal PyTorch LLaDA (the reference for the JAX forward in tests).

Written from a reading of the published LLaDA-8B `modeling_llada.py` (OLMo-derived,
`block_type="llama"` -> `LLaDALlamaBlock`), not copied from it. What it reproduces:

- parameter names of the Hugging Face checkpoint: `model.transformer.wte.weight`,
  `model.transformer.blocks.{i}.{attn_norm,ff_norm,q_proj,k_proj,v_proj,attn_out,ff_proj,
  up_proj,ff_out}.weight` (+ `{q,k,v}_proj.bias` with `include_qkv_bias`),
  `model.transformer.ln_f.weight`, `model.transformer.ff_out.weight` (absent when
  `weight_tying`, the head is then `wte.weight`);
- pre-norm block: `x + attn_out(attn(attn_norm(x)))`, then
  `x + ff_out(silu(ff_proj(h)) * up_proj(h))` with `h = ff_norm(x)`: **`ff_proj` is the
  gate** (`activation_type="silu"`), `up_proj` the linear branch;
- RMSNorm computed in float32, cast back to the input dtype, then scaled by the weight
  (no bias, `bias_for_layer_norm=False`);
- RoPE on `head_dim = d_model // n_heads` in float32 (`rope_full_precision=True`), half-split
  `rotate_half` (the last axis seen as `[2, head_dim // 2]`), `inv_freq = theta^(-2i/d)`,
  positions `0..T-1` by default;
- grouped-query attention by repeating each kv head `n_heads // n_kv_heads` times
  (`repeat_interleave` on the head axis: query head h reads kv head h // group);
- no causal mask; scaled dot-product attention with scale `1/sqrt(head_dim)`;
- untied (`ff_out`) or tied (`wte`) LM head, no logit scaling.

Two extensions that the upstream forward does not take, for comparing left-padded batches:
`attention_mask` (`[B, T]` bool/0-1, False on padding) masks padded *keys* (an additive
`finfo.min` bias, the convention of the upstream code), and `position_ids` (`[B, T]`)
replaces the default `0..T-1` RoPE positions. Note on upstream: the first public
`modeling_llada.py` passes `attn_mask=None` to SDPA (a padding mask is ignored), and its
OLMo path merges a padding mask with a *causal* bias. Here padding means what LLaDA's
batched generation intends: bidirectional attention over the non-padded keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class TorchLLaDAConfig:
    """The LLaDA config fields this reference reads (names as in `config.json`)."""

    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 4
    n_layers: int = 2
    mlp_hidden_size: int = 96
    vocab_size: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    include_qkv_bias: bool = False
    weight_tying: bool = False
    max_sequence_length: int = 512
    mask_token_id: int = 127
    eos_token_id: int = 1
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` in the shape of the released LLaDA-8B one."""
        return {
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "activation_type": "silu",
            "alibi": False,
            "attention_layer_norm": False,
            "bias_for_layer_norm": False,
            "block_group_size": 1,
            "block_type": "llama",
            "d_model": self.d_model,
            "embedding_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            "include_bias": False,
            "include_qkv_bias": self.include_qkv_bias,
            "input_emb_norm": False,
            "layer_norm_type": "rms",
            "layer_norm_with_affine": True,
            "mask_token_id": self.mask_token_id,
            "max_sequence_length": self.max_sequence_length,
            "mlp_hidden_size": self.mlp_hidden_size,
            "mlp_ratio": 4,
            "multi_query_attention": None,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers,
            "pad_token_id": self.pad_token_id,
            "rms_norm_eps": self.rms_norm_eps,
            "rope": True,
            "rope_full_precision": True,
            "rope_theta": self.rope_theta,
            "scale_logits": False,
            "vocab_size": self.vocab_size,
            "weight_tying": self.weight_tying,
        }


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.unflatten(-1, (2, x.shape[-1] // 2)).unbind(-2)
    return torch.cat((-second, first), dim=-1)


def rope_sin_cos(position_ids: torch.Tensor, head_dim: int, theta: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """sin, cos `[B, 1, T, head_dim]` (float32) for integer positions `[B, T]`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, hd/2]
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, hd]
    return angles.sin(), angles.cos()


class LLaDALlamaBlock(nn.Module):
    def __init__(self, cfg: TorchLLaDAConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.d_model, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=cfg.include_qkv_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.include_qkv_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.include_qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        b, t, d = x.shape
        h = self.attn_norm(x)
        # [B, heads, T, hd]
        q = self.q_proj(h).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        qf, kf = q.float(), k.float()
        q = (qf * cos + _rotate_half(qf) * sin).to(q.dtype)
        k = (kf * cos + _rotate_half(kf) * sin).to(k.dtype)
        group = cfg.n_heads // cfg.n_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, t, d))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class _LLaDAModel(nn.Module):
    def __init__(self, cfg: TorchLLaDAConfig):
        super().__init__()
        self.cfg = cfg
        modules: dict[str, nn.Module] = {
            "wte": nn.Embedding(cfg.vocab_size, cfg.d_model),
            "blocks": nn.ModuleList(LLaDALlamaBlock(cfg) for _ in range(cfg.n_layers)),
            "ln_f": RMSNorm(cfg.d_model, cfg.rms_norm_eps),
        }
        if not cfg.weight_tying:
            modules["ff_out"] = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.transformer = nn.ModuleDict(modules)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t)[None].expand(b, t)
        sin, cos = rope_sin_cos(position_ids, cfg.head_dim, cfg.rope_theta)
        bias = None
        if attention_mask is not None:
            valid = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T] over keys
            bias = torch.zeros(valid.shape, dtype=torch.float).masked_fill(
                ~valid, torch.finfo(torch.float).min)
        x = self.transformer["wte"](input_ids)
        for block in self.transformer["blocks"]:
            x = block(x, sin, cos, bias)
        x = self.transformer["ln_f"](x)
        if cfg.weight_tying:
            return F.linear(x, self.transformer["wte"].weight)
        return self.transformer["ff_out"](x)


@torch.no_grad()
def randomize_parameters(module: nn.Module, seed: int, std: float = 0.15) -> nn.Module:
    """Random weights for any LLaDA / Qwen-style torch module, scaled so that attention is
    peaked (not near-uniform) and every tensor matters: norm scales 1 + 0.1 N(0, 1),
    embeddings N(0, 1), biases 0.1 N(0, 1), matrices std * N(0, 1) * sqrt(64 / fan_in)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "norm" in name or "ln_f" in name:
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith("wte.weight") or name.endswith("embed_tokens.weight"):
            p.copy_(noise)
        elif name.endswith(".bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(std * noise * math.sqrt(64 / p.shape[-1]))
    return module


class TorchLLaDA(nn.Module):
    """`LLaDAModelLM` stand-in: `state_dict()` keys are those of the HF checkpoint."""

    def __init__(self, cfg: TorchLLaDAConfig):
        super().__init__()
        self.config = cfg
        self.model = _LLaDAModel(cfg)

    def randomize(self, seed: int, std: float = 0.15) -> "TorchLLaDA":
        randomize_parameters(self, seed, std)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """float logits `[B, T, vocab]` at every position."""
        return self.model(input_ids, attention_mask, position_ids)
