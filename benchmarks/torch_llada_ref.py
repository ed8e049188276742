"""PyTorch reference for the speed benchmark: a transformers-style LLaDA forward (bf16, torch
SDPA, no causal mask) and the original samplers' Python loops, run on the SAME weights as the
JAX model (moved with dlpack, no host copy).

Written for `benchmarks/speed.py` from a reading of the public originals, not copied:
  - LLaDA `generate.py`: full forward over prompt + answer at every step, logits over the whole
    sequence, softmax of the (bf16) logits, top-k low-confidence commit per row;
  - Fast-dLLM `generate_with_prefix_cache`: at a block start a full forward that returns every
    layer's keys/values (pre-RoPE, as the LLaDA modeling file caches them) and commits; the
    cache is cut to the prefix; the other steps feed `x[:, block_start:]` (block + suffix),
    concatenating the cached keys per layer; softmax in float64 over the fed positions;
  - Fast-dLLM `generate_with_dual_cache`: the same first step; the other steps feed the block
    alone and overwrite the block's entries of the full-length cache in place.
Every cached key is rotated again at every step (RoPE after the cache, as upstream).

The MASK logit is suppressed (our decoder never proposes MASK) so that every loop runs exactly
`steps` forwards: the same NFE as `dllm_jax.decode.generate` with the low_confidence
controller.

Weight layout: the JAX params are `[in, out]`; the reference multiplies `x @ w` (cuBLAS reads
the transposed layout directly), so no weight is copied.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def jax_to_torch(a: Any) -> torch.Tensor:
    """Zero-copy view of a JAX array as a torch tensor (same device)."""
    return torch.from_dlpack(a)


class TorchLLaDA:
    """LLaDA forward over per-layer weights (torch tensors, `[in, out]` layout)."""

    def __init__(self, params: dict, cfg: Any):
        self.cfg = cfg
        self.embed = jax_to_torch(params["embed"])
        self.final_norm = jax_to_torch(params["final_norm"])
        self.lm_head = jax_to_torch(params["lm_head"])
        self.layers = [{k: jax_to_torch(v) for k, v in lp.items()} for lp in params["layers"]]
        self.h, self.hkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        dev = self.embed.device
        self.inv_freq = 1.0 / (cfg.rope_theta ** (
            torch.arange(0, self.hd, 2, device=dev, dtype=torch.float32) / self.hd))

    # ------------------------------------------------------------------ pieces
    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * w

    def _rope(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x `[B, H, T, hd]`, positions start..start+T-1; float32 math (rope_full_precision)."""
        t = x.shape[2]
        pos = torch.arange(start, start + t, device=x.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        xf = x.float()
        half = self.hd // 2
        rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * cos + rot * sin).to(x.dtype)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, ids: torch.Tensor, start: int = 0, past: list | None = None,
                replace: tuple[int, int] | None = None, use_cache: bool = False
                ) -> tuple[torch.Tensor, list | None]:
        """Logits `[B, T, V]` (bf16) for `ids` at positions start..; optionally the cache.

        past: per layer (k, v) `[B, Hkv, Tc, hd]` pre-RoPE. Without `replace` the new keys are
        appended after them (prefix cache; the past covers positions 0..start-1); with
        `replace=(s, e)` the past covers the whole sequence and the new keys overwrite its
        entries s..e-1 in place (dual cache).
        """
        b, t = ids.shape
        x = self.embed[ids]
        present = [] if use_cache else None
        for i, lp in enumerate(self.layers):
            h = self._norm(x, lp["attn_norm"])
            q = (h @ lp["q_proj"]).view(b, t, self.h, self.hd).transpose(1, 2)
            k = (h @ lp["k_proj"]).view(b, t, self.hkv, self.hd).transpose(1, 2)
            v = (h @ lp["v_proj"]).view(b, t, self.hkv, self.hd).transpose(1, 2)
            kstart = start
            if past is not None:
                pk, pv = past[i]
                if replace is None:
                    k = torch.cat([pk, k], dim=2)
                    v = torch.cat([pv, v], dim=2)
                    kstart = 0
                else:
                    pk[:, :, replace[0]:replace[1]] = k
                    pv[:, :, replace[0]:replace[1]] = v
                    k, v, kstart = pk, pv, 0
            if use_cache:
                present.append((k, v))
            q = self._rope(q, start)
            k = self._rope(k, kstart)
            if self.hkv != self.h:
                k = k.repeat_interleave(self.h // self.hkv, dim=1)
                v = v.repeat_interleave(self.h // self.hkv, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False)
            x = x + a.transpose(1, 2).reshape(b, t, self.h * self.hd) @ lp["o_proj"]
            h = self._norm(x, lp["mlp_norm"])
            x = x + (F.silu(h @ lp["gate_proj"]) * (h @ lp["up_proj"])) @ lp["down_proj"]
        logits = self._norm(x, self.final_norm) @ self.lm_head
        return logits, present


# ---------------------------------------------------------------------------- samplers
def _transfer_counts(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    n = mask_index.sum(dim=1, keepdim=True)
    base, rem = n // steps, n % steps
    out = torch.zeros(n.size(0), steps, device=mask_index.device, dtype=torch.int64) + base
    for i in range(n.size(0)):
        out[i, :rem[i]] += 1
    return out


def _commit(logits: torch.Tensor, x: torch.Tensor, mask_index: torch.Tensor,
            k: torch.Tensor, mask_id: int, float64: bool) -> torch.Tensor:
    """Greedy candidates; top-k (k per row) most confident masked positions -> transfer mask."""
    logits[..., mask_id] = -torch.inf
    x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float64) if float64 else logits, dim=-1)
    x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    x0 = torch.where(mask_index, x0, x)
    conf = torch.where(mask_index, x0_p, torch.tensor(-math.inf, device=x.device, dtype=x0_p.dtype))
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    for j in range(conf.shape[0]):
        _, sel = torch.topk(conf[j], k=int(k[j]))
        transfer[j, sel] = True
    x[transfer] = x0[transfer]
    return x


@torch.no_grad()
def generate_llada(model: TorchLLaDA, prompt: torch.Tensor, steps: int, gen_length: int,
                   block_length: int, mask_id: int) -> tuple[torch.Tensor, int]:
    """LLaDA's generate (no cache, temperature 0, low_confidence). Returns (x, nfe)."""
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :p] = prompt
    nb = gen_length // block_length
    spb = steps // nb
    nfe = 0
    for blk in range(nb):
        s, e = p + blk * block_length, p + (blk + 1) * block_length
        counts = _transfer_counts(x[:, s:e] == mask_id, spb)
        for i in range(spb):
            mask_index = x == mask_id
            mask_index[:, e:] = False          # LLaDA: confidence -inf after the block
            logits, _ = model.forward(x)
            x = _commit(logits, x, mask_index, counts[:, i], mask_id, float64=False)
            nfe += 1
    return x, nfe


@torch.no_grad()
def generate_fastdllm(model: TorchLLaDA, prompt: torch.Tensor, steps: int, gen_length: int,
                      block_length: int, mask_id: int, cache: str) -> tuple[torch.Tensor, int]:
    """Fast-dLLM's prefix / dual cache loops at a fixed number of steps per block."""
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :p] = prompt
    nb = gen_length // block_length
    spb = steps // nb
    nfe = 0
    for blk in range(nb):
        s, e = p + blk * block_length, p + (blk + 1) * block_length
        counts = _transfer_counts(x[:, s:e] == mask_id, spb)
        logits, past = model.forward(x, use_cache=True)
        mask_index = x == mask_id
        mask_index[:, e:] = False
        x = _commit(logits, x, mask_index, counts[:, 0], mask_id, float64=True)
        nfe += 1
        if cache == "prefix":
            past = [(k[:, :, :s], v[:, :, :s]) for k, v in past]
        for i in range(1, spb):
            if cache == "prefix":
                region = x[:, s:]
                mask_index = region == mask_id
                mask_index[:, block_length:] = False
                logits, _ = model.forward(region, start=s, past=past)
                x[:, s:] = _commit(logits, region.clone(), mask_index, counts[:, i], mask_id,
                                   float64=True)
            else:
                region = x[:, s:e]
                mask_index = region == mask_id
                logits, _ = model.forward(region, start=s, past=past, replace=(s, e))
                x[:, s:e] = _commit(logits, region.clone(), mask_index, counts[:, i], mask_id,
                                    float64=True)
            nfe += 1
    return x, nfe
