"""Independent reference of SDAR's block-diffusion decoding, for one prompt, in numpy.

Read (not copied) from JetAstra/SDAR, the Hugging Face evaluation path
``evaluation/opencompass/opencompass/models/huggingface_bd3.py``, ``block_diffusion_generate``
(and the top-level ``generate.py`` for the strategy names). Its rules, as read there:

* ``num_blocks = ceil((P + G) / B)``; the canvas ``x`` is ``num_blocks * B`` positions, the
  prompt at ``[0, P)``, MASK after it; positions ``0 .. total - 1``; attention block-causal
  over blocks of the decode's ``B``.
* Prefill of ``[0, P // B * B)`` (keys/values only). Decoding runs the blocks
  ``P // B .. num_blocks - 1``: the first holds the prompt's tail and ``B - P % B`` masks.
* Every block gets the same schedule, computed for a FULL block:
  ``get_num_transfer_tokens(B, steps)`` = ``B // steps`` per step, one more in the first
  ``B % steps``. Per step (at most ``steps + 1`` iterations, the last only to store the
  block's keys/values once no MASK is left, which is no denoising step): one forward of the
  block over the cache; ``x0`` and its probability ``x0_p``; confidence ``x0_p`` on masked
  positions, ``-inf`` elsewhere; ``low_confidence_static``: the ``quota`` most confident (the
  top-k may pick already-decoded positions when the quota exceeds the masks left; ``x0`` is
  ``where(mask, x0, x)`` there, so they keep their token); ``low_confidence_dynamic``: the
  positions with confidence ``> threshold`` when they are at least ``quota``, else the top
  ``quota``.
* The answer is ``x[P : P + G]``.

Greedy only (the temperature -> 0 limit: ``x0`` = argmax, ``x0_p`` its softmax probability).
``model_fn(tokens [1, T]) -> logits [1, T, V]`` must be the block-causal model over positions
``0 .. T - 1``: with a block-causal mask a forward over ``x[:, :end]`` gives the block exactly
what the original's cached forward gives it. Ties: lowest position first (stable sort).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tests.reference_decoders import softmax, topk_indices


def num_transfer_tokens(block_length: int, steps: int) -> np.ndarray:
    """``get_num_transfer_tokens``: ``[steps]`` commits per step of a full block."""
    out = np.full(steps, block_length // steps, np.int64)
    out[: block_length % steps] += 1
    return out


def sdar_generate(model_fn: Callable[[np.ndarray], np.ndarray], prompt: np.ndarray,
                  mask_id: int, gen_length: int, block_length: int, steps: int,
                  remasking: str = "low_confidence_static", threshold: float = 0.85
                  ) -> tuple[np.ndarray, int]:
    """One prompt ``[P]`` -> (answer ``[G]`` int64, denoising forwards)."""
    prompt = np.asarray(prompt, np.int64)
    p, b = prompt.shape[0], block_length
    num_blocks = -(-(p + gen_length) // b)
    x = np.full(num_blocks * b, mask_id, np.int64)
    x[:p] = prompt
    quota = num_transfer_tokens(b, steps)
    nfe = 0
    for blk in range(p // b, num_blocks):
        lo, hi = blk * b, (blk + 1) * b
        for i in range(steps + 1):
            cur = x[lo:hi]
            masked = cur == mask_id
            if not masked.any():
                break                      # the original's store-kv forward
            assert i < steps, "the schedule commits a whole block in `steps` steps"
            logits = np.asarray(model_fn(x[None, :hi]))[0, lo:hi]
            nfe += 1
            probs = softmax(logits)
            x0 = probs.argmax(-1)
            conf = np.where(masked, probs[np.arange(b), x0], -np.inf)
            x0 = np.where(masked, x0, cur)
            transfer = np.zeros(b, bool)
            if remasking == "low_confidence_dynamic" and (conf > threshold).sum() >= quota[i]:
                transfer = conf > threshold
            elif remasking in ("low_confidence_static", "low_confidence_dynamic"):
                transfer[topk_indices(conf, quota[i])] = True
            else:
                raise ValueError(remasking)
            cur[transfer] = x0[transfer]
    return x[p: p + gen_length], nfe
