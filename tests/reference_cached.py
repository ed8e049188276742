"""Independent torch reference of Fast-dLLM's CACHED LLaDA decodes.

Written from a reading of NVlabs/Fast-dLLM (never copied):
``llada/generate.py`` -- ``generate_with_prefix_cache``, ``generate_with_dual_cache``,
``get_transfer_index``, ``get_transfer_index_dynamic``; and the cache handling of its
``llada/model/modeling_llada.py`` (``LLaDABlock.attention``, ``RotaryEmbedding.forward``,
``LLaDAModel.forward``). The NVlabs copy of the modeling file is not in our search index;
it was read in the fork NickCheng0921/Fast-dLLM (same file path), and the query-position
rule of ``RotaryEmbedding.forward`` cross-checked in other copies of the file.

The model side (``CachedTorchLLaDA.forward_cache``)
---------------------------------------------------
Fast-dLLM's LLaDA forward takes ``past_key_values`` (one ``(k, v)`` per layer, shape
``[B, n_kv_heads, L, head_dim]``) and ``replace_position`` (bool ``[B, T]``):

* The cache holds keys **before RoPE** (``present = (k, v)`` is taken right after the
  concatenation / replacement, before the rotary embedding is applied).
* Without ``replace_position`` (prefix cache): the fresh keys/values of the fed tokens are
  appended to the past ones, ``k = cat(past_k, k)``; RoPE is then applied to ALL keys with
  positions ``0 .. key_len - 1`` and to the queries with positions
  ``key_len - query_len .. key_len - 1`` (the fed tokens are the sequence's tail).
* With ``replace_position`` (dual cache): per row, the cache entries at the True columns are
  overwritten IN PLACE by the fresh keys/values (the past tensors themselves are mutated),
  and the whole (full-length) cache is the key set; queries get positions
  ``block_end - query_len .. block_end - 1`` with ``block_end`` = the last True column + 1
  over the batch; keys ``0 .. key_len - 1``.
* Attention is bidirectional with NO mask at all (``attn_mask=None`` is passed to SDPA even
  though a causal bias is built when a cache is given); GQA by ``repeat_interleave``.

Caching pre-RoPE keys and rotating them each step (Fast-dLLM) or caching post-RoPE keys
(dllm_jax) give the same attention: the rotation of a key depends only on its absolute
position, which is the same whenever it is applied. This reference follows Fast-dLLM
(pre-RoPE cache, rotation at every forward).

The decode side
---------------
Both cached loops (``fastdllm_generate_cached(mode='prefix' | 'dual')``), per block
``[start, end)`` of ``x = [prompt | MASK * gen_length]``:

1. ``schedule = get_num_transfer_tokens(x[:, start:end] == MASK, steps // num_blocks)``
   (only used by the fixed schedule, i.e. when both ``threshold`` and ``factor`` are None).
2. **Refresh step**: one full forward over the whole ``x`` with ``use_cache=True``; its
   logits commit tokens right away with schedule index ``0`` (candidates: masked positions
   before ``end``; every earlier position is already decoded). ``nfe += 1``.
   prefix: the cache is then truncated to the positions before ``start`` (every layer);
   dual: the full-length cache is kept and ``replace_position = [start, end)``.
3. ``i = 1``; loop: **stop first** if no row of the batch has a MASK in ``[start, end)``
   (checked over the whole batch, before the forward); else ``nfe += 1`` and one cached
   forward: prefix feeds ``x[:, start:]`` (the block AND everything after it, fresh keys
   appended to the truncated prefix cache; candidates = the masked positions among the
   first ``block_length`` of the fed tokens); dual feeds ``x[:, start:end]`` only (the
   block's cache entries replaced); commit with schedule index ``i``; ``i += 1``.
   The cache is never refreshed inside a block (the cached steps' returned keys are
   discarded: prefix keeps the truncated cache, dual's block entries are overwritten at
   every step anyway).
4. Selection (``get_transfer_index`` / ``get_transfer_index_dynamic``): greedy candidates
   ``x0 = argmax(logits)``; confidence = float64 softmax probability of ``x0`` on the
   candidate positions, -inf elsewhere; ``factor`` (if not None) wins over ``threshold``;
   threshold: top-1 always, others iff ``conf >= threshold``; factor: the dynamic rule
   (see ``reference_decoders.fastdllm_factor_transfer``, quirk included); fixed schedule:
   the ``schedule[:, i]`` most confident.
5. ``nfe`` = number of model forwards (refreshes included): batched, one per loop pass.

Only greedy (``temperature = 0``) ``'low_confidence'`` decoding is reproduced: that is what
the parity tests compare. ``suppress_token_ids`` get logit -inf before the selection (the
tests pass the MASK id, since dllm_jax never proposes MASK as a candidate).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

try:  # tests/ as a package or as pytest's rootdir-inserted path
    from tests.reference_decoders import (fastdllm_factor_transfer, fastdllm_threshold_transfer,
                                          llada_canvas,
                                          llada_num_transfer_tokens, softmax, topk_indices)
    from tests.torch_llada import TorchLLaDA, _rotate_half, rope_sin_cos
except ImportError:  # pragma: no cover
    from reference_decoders import (fastdllm_factor_transfer, fastdllm_threshold_transfer,
                                    llada_canvas,
                                    llada_num_transfer_tokens, softmax, topk_indices)
    from torch_llada import TorchLLaDA, _rotate_half, rope_sin_cos

PastKV = list  # list over layers of (k, v), each [B, n_kv_heads, L, head_dim], pre-RoPE


class CachedTorchLLaDA(TorchLLaDA):
    """`TorchLLaDA` plus a Fast-dLLM-style cached forward (same parameters, same names)."""

    @torch.no_grad()
    def forward_cache(self, input_ids: torch.Tensor, past_key_values: Optional[PastKV] = None,
                      replace_position: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, PastKV]:
        """Logits `[B, t, V]` of the fed tokens and every layer's pre-RoPE `(k, v)`.

        past_key_values: None (plain forward over `input_ids`, positions 0..t-1), or one
          `(k, v)` per layer. Without `replace_position` the fed tokens continue the past
          (positions L..L+t-1); with it (bool `[B, T]`, `t` True columns per row, the past
          of full length T) the fed tokens' keys/values overwrite the True columns in place.
        Returns:
          (logits, present): present[l] = (k, v) as Fast-dLLM's `present` (pre-RoPE; the
          concatenation, or the mutated full-length past).
        """
        cfg = self.config
        tr = self.model.transformer
        b, t = input_ids.shape
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        x = tr["wte"](input_ids)
        present: PastKV = []
        for li, blk in enumerate(tr["blocks"]):
            h = blk.attn_norm(x)
            q = blk.q_proj(h).view(b, t, nh, hd).transpose(1, 2)
            k = blk.k_proj(h).view(b, t, nkv, hd).transpose(1, 2)
            v = blk.v_proj(h).view(b, t, nkv, hd).transpose(1, 2)
            if past_key_values is not None:
                pk, pv = past_key_values[li]
                if replace_position is None:
                    k = torch.cat((pk, k), dim=-2)
                    v = torch.cat((pv, v), dim=-2)
                else:
                    for row in range(replace_position.shape[0]):
                        cols = replace_position[row].nonzero(as_tuple=True)[0]
                        if len(cols) > 0:
                            pk[row, :, cols] = k[row, :, :len(cols)]
                            pv[row, :, cols] = v[row, :, :len(cols)]
                    k, v = pk, pv
            present.append((k, v))
            key_len = k.shape[-2]
            if replace_position is not None and bool(replace_position.any()):
                q_end = int(replace_position.nonzero(as_tuple=True)[1].max()) + 1
            else:
                q_end = key_len
            sin, cos = rope_sin_cos(torch.arange(key_len)[None], hd, cfg.rope_theta)
            qs, qc = sin[:, :, q_end - t:q_end], cos[:, :, q_end - t:q_end]
            qf, kf = q.float(), k.float()
            q = (qf * qc + _rotate_half(qf) * qs).to(q.dtype)
            k = (kf * cos + _rotate_half(kf) * sin).to(k.dtype)
            if nh != nkv:
                k = k.repeat_interleave(nh // nkv, dim=1)
                v = v.repeat_interleave(nh // nkv, dim=1)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False)
            x = x + blk.attn_out(att.transpose(1, 2).reshape(b, t, nh * hd))
            h = blk.ff_norm(x)
            x = x + blk.ff_out(F.silu(blk.ff_proj(h)) * blk.up_proj(h))
        x = tr["ln_f"](x)
        logits = F.linear(x, tr["wte"].weight) if cfg.weight_tying else tr["ff_out"](x)
        return logits, present


def _suppressed(logits: torch.Tensor, suppress: Sequence[int]) -> np.ndarray:
    """float64 numpy logits with the `suppress` ids at -inf (never candidates)."""
    lg = logits.detach().double().numpy().copy()
    for tok in suppress:
        lg[..., tok] = -np.inf
    return lg


def _select(logits: torch.Tensor, mask_index: np.ndarray, x: np.ndarray,
            num_transfer: Optional[np.ndarray], threshold: Optional[float],
            factor: Optional[float], suppress: Sequence[int]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`get_transfer_index` (factor None) / `get_transfer_index_dynamic`, greedy,
    low_confidence. Returns (x0 [B, L], transfer [B, L] bool, confidence [B, L])."""
    lg = _suppressed(logits, suppress)
    x0 = np.argmax(lg, axis=-1)
    p = softmax(lg, dtype=np.float64)
    x0_p = np.take_along_axis(p, x0[..., None], axis=-1)[..., 0]
    x0 = np.where(mask_index, x0, x)
    confidence = np.where(mask_index, x0_p, -np.inf)
    if factor is not None:
        return x0, fastdllm_factor_transfer(confidence, mask_index, factor), confidence
    if threshold is not None:
        return x0, fastdllm_threshold_transfer(confidence, mask_index, threshold), confidence
    transfer = np.zeros(mask_index.shape, bool)
    for j in range(mask_index.shape[0]):
        transfer[j, topk_indices(confidence[j], int(num_transfer[j]))] = True
    return x0, transfer, confidence


@torch.no_grad()
def fastdllm_generate_cached(
    model: CachedTorchLLaDA,
    prompt: np.ndarray,
    *,
    mode: str,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    mask_id: int = 126336,
    threshold: Optional[float] = None,
    factor: Optional[float] = None,
    suppress_token_ids: Sequence[int] = (),
    trace: Optional[list] = None,
    after_step=None,
) -> tuple[np.ndarray, int]:
    """Fast-dLLM's `generate_with_prefix_cache` (mode='prefix') / `generate_with_dual_cache`
    (mode='dual'), greedy low_confidence; rules in the module docstring.

    Args:
        model: a `CachedTorchLLaDA` (float32).
        prompt: `[B, P]` int token ids (no padding: Fast-dLLM's cached loops take none).
        trace: if a list, one `(block, i, kind)` tuple is appended per forward
            (kind 'refresh' or 'cached').
        after_step: as in `reference_decoders.fastdllm_generate` (R2's added rules).
    Returns:
        `(answer [B, gen_length] int64, nfe)`.
    """
    if mode not in ("prefix", "dual"):
        raise ValueError(f"mode must be 'prefix' or 'dual', got {mode!r}")
    x, steps_per_block = llada_canvas(prompt, gen_length, block_length, steps, mask_id)
    b, p = np.shape(prompt)
    num_blocks = gen_length // block_length
    fixed = threshold is None and factor is None

    nfe = 0
    for blk in range(num_blocks):
        start = p + blk * block_length
        end = start + block_length
        schedule = llada_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)

        # refresh: full forward, stores the cache, commits with schedule index 0
        logits, past = model.forward_cache(torch.from_numpy(x))
        mask_index = x == mask_id
        mask_index[:, end:] = False
        x0, transfer, conf = _select(logits, mask_index, x, schedule[:, 0] if fixed else None,
                                     threshold, factor, suppress_token_ids)
        x[transfer] = x0[transfer]
        if after_step is not None:
            lg = _suppressed(logits, suppress_token_ids)
            after_step(x[:, start:end], x0[:, start:end], conf[:, start:end], lg[:, start:end],
                       mask_index[:, start:end], blk)
        nfe += 1
        if trace is not None:
            trace.append((blk, 0, "refresh"))
        if mode == "prefix":
            past = [(k[:, :, :start], v[:, :, :start]) for k, v in past]
            replace = None
        else:
            replace = torch.zeros(x.shape, dtype=torch.bool)
            replace[:, start:end] = True

        i = 1
        while True:
            if not (x[:, start:end] == mask_id).any():
                break
            nfe += 1
            if trace is not None:
                trace.append((blk, i, "cached"))
            if mode == "prefix":
                view = x[:, start:]
                mask_index = view == mask_id
                mask_index[:, block_length:] = False
                logits, _ = model.forward_cache(torch.from_numpy(view.copy()), past)
            else:
                view = x[:, start:end]
                mask_index = view == mask_id
                logits, _ = model.forward_cache(torch.from_numpy(view.copy()), past, replace)
            x0, transfer, conf = _select(logits, mask_index, view,
                                         schedule[:, i] if fixed else None, threshold, factor,
                                         suppress_token_ids)
            view[transfer] = x0[transfer]  # a view: writes into x
            if after_step is not None:
                lg = _suppressed(logits, suppress_token_ids)
                after_step(view[:, :block_length], x0[:, :block_length], conf[:, :block_length],
                           lg[:, :block_length], mask_index[:, :block_length], blk)
            i += 1
    return x[:, p:], nfe
