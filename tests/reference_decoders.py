"""Independent reference implementations of the original dLLM decoding algorithms.

These are written from a reading of the public originals (never copied) and follow their
rules step for step, so that the jit-compiled decode in ``dllm_jax`` can be checked token
for token against them. They run on numpy (float64 where the original uses float64) or,
for Dream, on torch (so that the float32 time grid and ``int()`` truncation are bit-exact).

Sources (read at these locations; rules verified there, see each function's docstring):

* LLaDA: ``ML-GSAI/LLaDA`` ``generate.py`` -- ``add_gumbel_noise``, ``get_num_transfer_tokens``,
  ``generate`` (the current version with ``attention_mask``, ``logits_eos_inf`` and
  ``confidence_eos_eot_inf``; the older version without them computed the softmax in float64
  and had no attention mask).
* Fast-dLLM: ``NVlabs/Fast-dLLM`` ``llada/generate.py`` -- ``generate`` (no cache),
  ``get_transfer_index`` (threshold), ``get_transfer_index_dynamic`` (factor).
* Dream: ``generation_utils.py`` of the Dream-v0 Hugging Face model repository
  (``DreamGenerationMixin._sample`` and ``sample_tokens``, ``top_p_logits``, ``top_k_logits``);
  the current, batch-aware version (per-row top-k over a ``[B, T]`` confidence map).

Common conventions
------------------
``model_fn(tokens)`` takes an integer array ``[B, T]`` and returns logits ``[B, T, V]`` for
every position (for Dream the callable must already return the *shifted* logits, i.e. the
prediction for position ``i`` read from output ``i - 1``, position 0 keeping its own).
With an attention mask the LLaDA references call ``model_fn(tokens, attention_mask)``
(``attention_mask`` bool ``[B, T]``) and the Dream reference calls
``model_fn(tokens, attention_mask, position_ids)`` (see ``dream_generate``).

Every reference returns ``(answer [B, gen_length] int64, nfe)`` where ``nfe`` is the
number of ``model_fn`` calls (one per forward pass; with classifier-free guidance the
conditional and unconditional rows go through ONE call of batch ``2B``, as in the original,
and count as one NFE).

Ties in a top-k selection: ``torch.topk`` leaves the order of equal values unspecified; here
equal confidences are taken lowest position first (a stable sort), which is also what
``jax.lax.top_k`` does.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

ModelFn = Callable[..., np.ndarray]

LLADA_MASK_ID = 126336
LLADA_EOS_ID = 126081  # <|endoftext|>; hard-coded in LLaDA's generate.py
LLADA_EOT_ID = 126348  # <|eot_id|>; hard-coded in LLaDA's generate.py
DREAM_MASK_ID = 151666


# ----------------------------------------------------------------------------- helpers


def topk_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries of a 1-D array, largest first.

    Ties are broken lowest index first (stable sort). ``-inf`` entries sort last.

    Args:
        values: ``[L]`` float array.
        k: number of indices to return (``0 <= k <= L``).
    Returns:
        ``[k]`` int64 indices.
    """
    k = int(k)
    if k <= 0:
        return np.zeros((0,), dtype=np.int64)
    order = np.argsort(-np.asarray(values), kind="stable")
    return order[:k].astype(np.int64)


def softmax(logits: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Numerically stable softmax over the last axis, computed in ``dtype``.

    ``-inf`` logits get probability exactly 0.
    """
    z = np.asarray(logits, dtype=dtype)
    m = np.max(z, axis=-1, keepdims=True)
    e = np.exp(z - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def _call(model_fn: ModelFn, x: np.ndarray, *extra) -> np.ndarray:
    out = model_fn(x, *extra) if extra else model_fn(x)
    out = np.asarray(out)
    if out.ndim != 3 or out.shape[:2] != x.shape:
        raise ValueError(f"model_fn returned shape {out.shape}, expected [B, T, V] with [B, T] = {x.shape}")
    return out


def gumbel_max_scores(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """LLaDA's ``add_gumbel_noise``: the scores whose argmax is the sampled token.

    Rule (LLaDA ``generate.py`` / Fast-dLLM ``llada/generate.py``, ``add_gumbel_noise``):
    temperature 0 returns the logits themselves (no cast). Otherwise, in float64,
    ``exp(logits) / (-log(u)) ** temperature`` with ``u ~ U[0, 1)`` of the logits' shape.

    Args:
        logits: ``[..., V]``.
    Returns:
        ``[..., V]`` scores (the same array object when ``temperature == 0``).
    """
    if temperature == 0:
        return logits
    l64 = np.asarray(logits, dtype=np.float64)
    u = rng.random(l64.shape)  # float64 in [0, 1), like torch.rand_like(float64)
    with np.errstate(divide="ignore", over="ignore"):
        return np.exp(l64) / (-np.log(u)) ** temperature


def llada_num_transfer_tokens(block_mask: np.ndarray, steps: int) -> np.ndarray:
    """LLaDA ``get_num_transfer_tokens``: how many tokens each step of a block commits.

    Per row with ``M`` masks in the block and ``S`` steps: ``M // S`` every step, plus one
    for the first ``M % S`` steps.

    Args:
        block_mask: ``[B, L]`` bool, True where the block is still masked.
        steps: steps for this block.
    Returns:
        ``[B, steps]`` int64, each row summing to that row's mask count.
    """
    m = np.asarray(block_mask).sum(axis=1).astype(np.int64)
    base = m // steps
    rem = m % steps
    out = np.repeat(base[:, None], steps, axis=1)
    out += (np.arange(steps)[None, :] < rem[:, None]).astype(np.int64)
    return out


def llada_canvas(prompt: np.ndarray, gen_length: int, block_length: int, steps: int,
                 mask_id: int) -> tuple[np.ndarray, int]:
    """LLaDA's starting canvas ``[prompt | MASK * gen_length]`` (int64 ``[B, P + G]``) and its
    steps per block, with the originals' assertions (G a multiple of the block length, steps a
    multiple of the number of blocks)."""
    prompt = np.asarray(prompt, dtype=np.int64)
    b, p = prompt.shape
    x = np.full((b, p + gen_length), mask_id, dtype=np.int64)
    x[:, :p] = prompt
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    return x, steps // num_blocks


# ----------------------------------------------------------------------------- LLaDA


def llada_generate(
    model_fn: ModelFn,
    prompt: np.ndarray,
    *,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = LLADA_MASK_ID,
    attention_mask: Optional[np.ndarray] = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    eos_id: int = LLADA_EOS_ID,
    eot_id: int = LLADA_EOT_ID,
    softmax_dtype=None,
    rng: Optional[np.random.Generator] = None,
) -> tuple[np.ndarray, int]:
    """Reference of LLaDA's ``generate`` (ML-GSAI/LLaDA ``generate.py``).

    Rules, as in the original:

    * ``x = [prompt | MASK * gen_length]``; ``gen_length % block_length == 0`` and
      ``steps % num_blocks == 0`` (asserted); each block gets ``steps // num_blocks`` steps
      and a fixed per-row schedule from ``llada_num_transfer_tokens`` computed at block start.
    * Every step runs (even a step that commits 0 tokens), so ``nfe == steps``.
    * CFG (``cfg_scale > 0``): ``prompt_index = (x != MASK)`` is taken ONCE before decoding
      (the prompt, pads included); the unconditional copy has those positions set to MASK
      (tokens committed later are NOT masked). One forward over ``concat([x, un_x])``
      (batch ``2B``, conditional rows first), then
      ``logits = un + (cfg_scale + 1) * (cond - un)``. Counted as ONE NFE.
      (In the current original, ``cfg_scale > 0`` without an attention mask raises
      ``UnboundLocalError``; the older version ran it without a mask, as done here.)
    * ``logits_eos_inf``: ``logits[..., eos_id] = -inf`` (before noise and argmax).
    * Candidates ``x0 = argmax(gumbel_max_scores(logits))``.
    * ``confidence_eos_eot_inf`` (applied AFTER the argmax, so it never changes ``x0``):
      the original runs ``logits_with_noise[..., EOS] = logits[..., EoT] = -inf``. The
      noisy scores are not used again, so with ``temperature > 0`` only the EoT logit is
      removed from the confidence softmax; with ``temperature == 0`` the noisy scores ARE
      the logits tensor (same object), so both EOS and EoT are removed. A candidate that is
      itself EOS/EoT then gets confidence 0 (not -inf) and the others are renormalised.
    * ``'low_confidence'``: confidence = softmax(logits)[x0]; the current original takes
      the softmax in the logits' dtype (``softmax_dtype=None`` here; the older version
      and Fast-dLLM use float64). ``'random'``: uniform ``U[0, 1)`` per position.
    * Confidence is -inf after the current block and on every non-masked position;
      per row, the ``k = schedule[row, step]`` most confident positions are committed.

    Args:
        model_fn: ``tokens [B, T] -> logits [B, T, V]``; called as
            ``model_fn(tokens, attention_mask [B, T] bool)`` when ``attention_mask`` is given.
        prompt: ``[B, P]`` int token ids (left-padded when ``attention_mask`` is given).
        attention_mask: optional ``[B, P]`` (1 = real token, 0 = pad); the answer part is
            appended as ones, as in the original.
        rng: numpy Generator for the Gumbel noise and ``'random'`` remasking.
    Returns:
        ``(answer [B, gen_length] int64, nfe)``.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    x, steps_per_block = llada_canvas(prompt, gen_length, block_length, steps, mask_id)
    b, p = np.shape(prompt)
    num_blocks = gen_length // block_length
    attn = None
    if attention_mask is not None:
        attn = np.concatenate([np.asarray(attention_mask).astype(bool), np.ones((b, gen_length), bool)], axis=1)
    prompt_index = x != mask_id

    nfe = 0
    for blk in range(num_blocks):
        start = p + blk * block_length
        end = start + block_length
        schedule = llada_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.copy()
                un_x[prompt_index] = mask_id
                both = np.concatenate([x, un_x], axis=0)
                extra = (np.concatenate([attn, attn], axis=0),) if attn is not None else ()
                out = _call(model_fn, both, *extra)
                cond, un = out[:b], out[b:]
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                extra = (attn,) if attn is not None else ()
                logits = _call(model_fn, x, *extra).copy()
            nfe += 1

            if logits_eos_inf:
                logits[:, :, eos_id] = -np.inf
            scores = gumbel_max_scores(logits, temperature, rng)
            x0 = np.argmax(scores, axis=-1)
            if confidence_eos_eot_inf:
                if temperature == 0:  # scores is logits: the EOS write lands in the logits too
                    logits[:, :, eos_id] = -np.inf
                logits[:, :, eot_id] = -np.inf

            if remasking == "low_confidence":
                probs = softmax(logits, dtype=softmax_dtype or logits.dtype)
                x0_p = np.take_along_axis(probs, x0[..., None], axis=-1)[..., 0].astype(np.float64)
            elif remasking == "random":
                x0_p = rng.random((b, x.shape[1]))
            else:
                raise NotImplementedError(remasking)
            x0_p[:, end:] = -np.inf

            x0 = np.where(mask_index, x0, x)
            confidence = np.where(mask_index, x0_p, -np.inf)
            for j in range(b):
                sel = topk_indices(confidence[j], schedule[j, i])
                x[j, sel] = x0[j, sel]
    return x[:, p:], nfe


# ----------------------------------------------------------------------------- Fast-dLLM


def fastdllm_threshold_transfer(confidence: np.ndarray, mask_index: np.ndarray, threshold: float) -> np.ndarray:
    """Fast-dLLM ``get_transfer_index`` with ``threshold`` (NVlabs/Fast-dLLM ``llada/generate.py``).

    Per row with ``n`` masked positions: take the top-``n`` by confidence; the first (most
    confident) is always committed; each of the others is dropped iff
    ``confidence < threshold`` -- so a confidence EQUAL to the threshold commits (``>=``).
    A row with no masked position commits nothing.

    Args:
        confidence: ``[B, L]`` float, -inf where not a candidate.
        mask_index: ``[B, L]`` bool, candidate positions (masked, inside the block).
    Returns:
        ``[B, L]`` bool commit mask.
    """
    out = np.zeros(mask_index.shape, dtype=bool)
    for j in range(mask_index.shape[0]):
        n = int(mask_index[j].sum())
        sel = topk_indices(confidence[j], n)
        for r, idx in enumerate(sel):
            if r == 0 or not confidence[j, idx] < threshold:
                out[j, idx] = True
    return out


def fastdllm_factor_transfer(confidence: np.ndarray, mask_index: np.ndarray, factor: float) -> np.ndarray:
    """Fast-dLLM ``get_transfer_index_dynamic`` (the ``factor`` rule), same file.

    Per row with ``n`` masked positions, confidences sorted descending ``c_1 >= ... >= c_n``
    and thresholds ``th_1 = -1`` (always commit one), ``th_m = 1 - factor / (m + 1)``:
    find the first 1-based ``m`` with ``c_m < th_m`` (strict ``<``: equality passes).
    Commit ``m - 1`` tokens, EXCEPT (original quirk: ``if top_i == 0 or top_i == len - 1:
    top_i += 1``) when that first failure is the LAST one (``m == n``): then all ``n``
    commit. With no failure all ``n`` commit. ``n == 1`` commits 1. A row with no masked
    position commits nothing (the original would reuse the previous row's count, or raise
    ``NameError`` on row 0, but the extra picks are non-masked positions whose "new" token
    equals the old one, so nothing changes).

    Args:
        confidence: ``[B, L]`` float, -inf where not a candidate.
        mask_index: ``[B, L]`` bool.
    Returns:
        ``[B, L]`` bool commit mask.
    """
    out = np.zeros(mask_index.shape, dtype=bool)
    for j in range(mask_index.shape[0]):
        n = int(mask_index[j].sum())
        if n == 0:
            continue
        sorted_conf = np.sort(confidence[j][mask_index[j]])[::-1]
        thresh = [-1.0] + [1.0 - factor / (m + 1) for m in range(2, n + 1)]  # index i <-> m = i + 1
        top_i = n - 1  # value left by a loop that never breaks
        for i in range(n):
            if sorted_conf[i] < thresh[i]:
                top_i = i
                break
        if top_i == 0 or top_i == n - 1:
            top_i += 1
        out[j, topk_indices(confidence[j], top_i)] = True
    return out


def entropy_bound_transfer(logits: np.ndarray, mask_index: np.ndarray, bound: float
                           ) -> np.ndarray:
    """DiffusionGemma's entropy-bound rule on masked positions: per row, take the masked
    positions in increasing entropy (float64 softmax, nats; numpy's stable order on ties)
    while the taken ones' entropy sum minus their largest stays <= ``bound``."""
    probs = softmax(logits, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(-1)
    transfer = np.zeros(mask_index.shape, bool)
    for r in range(mask_index.shape[0]):
        cand = np.flatnonzero(mask_index[r])
        total, largest = 0.0, -np.inf
        for i in cand[np.argsort(ent[r, cand], kind="stable")]:
            total, largest = total + ent[r, i], max(largest, ent[r, i])
            if total - largest > bound:
                break
            transfer[r, i] = True
    return transfer


def fastdllm_generate(
    model_fn: ModelFn,
    prompt: np.ndarray,
    *,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = LLADA_MASK_ID,
    threshold: Optional[float] = None,
    factor: Optional[float] = None,
    rng: Optional[np.random.Generator] = None,
    after_step=None,
    entropy_bound: Optional[float] = None,
) -> tuple[np.ndarray, int]:
    """Reference of Fast-dLLM's uncached ``generate`` (NVlabs/Fast-dLLM ``llada/generate.py``).

    Rules, as in the original:

    * Same canvas, block split and assertions as LLaDA; the fixed schedule
      (``llada_num_transfer_tokens`` with ``steps // num_blocks``) is used only when both
      ``threshold`` and ``factor`` are None. ``factor`` wins over ``threshold``.
    * Per block: ``while True``: one full forward (``nfe += 1``), candidates = masked
      positions before the block end, select, write; stop when NO row has a MASK left in
      the block (checked after the write, over the whole batch). So a block can end before
      its step budget (e.g. fixed schedule with more steps than masks: the trailing
      zero-commit steps of LLaDA are skipped), and with threshold/factor the step count
      is data-dependent; rows that finished the block early commit nothing meanwhile.
    * Candidates ``x0`` from ``gumbel_max_scores``; confidence = float64 softmax of the
      logits at ``x0`` (``'low_confidence'``) or ``U[0, 1)`` (``'random'``); -inf off the
      candidates. Selection: ``fastdllm_threshold_transfer`` / ``fastdllm_factor_transfer`` /
      top-``schedule[row, i]``.

    Args:
        model_fn: ``tokens [B, T] -> logits [B, T, V]``.
        prompt: ``[B, P]`` int token ids.
        after_step: optional ``f(x_block, x0_block, conf_block, logits_block, masked_block,
            block_index)`` called after each step's write with ``[B, Lb(, V)]`` views of the
            block (``x_block`` writable): where rules that add commits (R2) run.
    Returns:
        ``(answer [B, gen_length] int64, nfe)``.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    x, steps_per_block = llada_canvas(prompt, gen_length, block_length, steps, mask_id)
    b, p = np.shape(prompt)
    num_blocks = gen_length // block_length

    nfe = 0
    for blk in range(num_blocks):
        start = p + blk * block_length
        end = start + block_length
        schedule = llada_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        i = 0
        while True:
            nfe += 1
            mask_index = x == mask_id
            logits = _call(model_fn, x)
            mask_index[:, end:] = False

            scores = gumbel_max_scores(logits, temperature, rng)
            x0 = np.argmax(scores, axis=-1)
            if remasking == "low_confidence":
                probs = softmax(logits, dtype=np.float64)
                x0_p = np.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
            elif remasking == "random":
                x0_p = rng.random((b, x.shape[1]))
            else:
                raise NotImplementedError(remasking)
            x0 = np.where(mask_index, x0, x)
            confidence = np.where(mask_index, x0_p, -np.inf)

            if entropy_bound is not None:   # not Fast-dLLM's: DiffusionGemma's rule
                transfer = entropy_bound_transfer(logits, mask_index, entropy_bound)
            elif factor is not None:
                transfer = fastdllm_factor_transfer(confidence, mask_index, factor)
            elif threshold is not None:
                transfer = fastdllm_threshold_transfer(confidence, mask_index, threshold)
            else:
                transfer = np.zeros_like(mask_index)
                for j in range(b):
                    transfer[j, topk_indices(confidence[j], schedule[j, i])] = True
            x[transfer] = x0[transfer]
            if after_step is not None:
                after_step(x[:, start:end], x0[:, start:end], confidence[:, start:end],
                           logits[:, start:end], mask_index[:, start:end], blk)

            i += 1
            if not (x[:, start:end] == mask_id).any():
                break
    return x[:, p:], nfe


# ----------------------------------------------------------------------------- Dream


def _dream_top_p(logits, top_p: float):
    """Dream ``top_p_logits``: keep the smallest prefix of the sorted distribution whose
    cumulative probability exceeds ``top_p`` (the token crossing it is kept); the rest get
    ``finfo(dtype).min`` (not -inf)."""
    import torch

    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    remove_sorted = cum > top_p
    remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def _dream_top_k(logits, top_k: int):
    """Dream ``top_k_logits``: drop logits strictly below the k-th largest (ties kept)."""
    import torch

    k = min(int(top_k), logits.shape[-1])
    kth = torch.topk(logits, k)[0][..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def dream_sample_tokens(
    logits,
    *,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    margin_confidence: bool = False,
    neg_entropy: bool = False,
    generator=None,
):
    """Dream ``sample_tokens``: candidates and confidence for ``N`` masked positions.

    Order of operations, as in the original: divide by ``temperature`` if > 0; top-p if
    ``top_p < 1``; top-k if given (both ALSO applied at temperature 0, so they shape the
    confidence even when decoding greedily); ``probs = softmax``; with ``temperature > 0``
    sample ``x0 ~ probs`` and confidence = ``probs[x0]``, else ``(confidence, x0) =
    max(probs)``. ``margin_confidence``: top-1 minus top-2 prob; ``neg_entropy``:
    ``sum(p * log(p + 1e-10))``.

    Args:
        logits: torch ``[N, V]``.
        generator: ``torch.Generator`` for the categorical sample (the original uses the
            global RNG through ``torch.distributions.Categorical``).
    Returns:
        ``(confidence [N], x0 [N] int64)`` torch tensors.
    """
    import torch

    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _dream_top_p(logits, top_p)
    if top_k is not None:
        logits = _dream_top_k(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0 and probs.shape[0] > 0:
        try:
            x0 = torch.multinomial(probs, 1, generator=generator)[:, 0]
            confidence = torch.gather(probs, -1, x0[:, None])[:, 0]
        except RuntimeError:  # the original falls back to the argmax when sampling fails
            confidence, x0 = probs.max(dim=-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs = torch.sort(probs, dim=-1, descending=True)[0]
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def dream_transfer_count(num_mask_token: float, s: float, t: float, is_last: bool) -> int:
    """Dream's per-step commit count, bit-exact (float32 arithmetic, then ``int()``).

    ``int(num_mask_token * (1 - s / t))`` before the last step -- TRUNCATION toward zero,
    not rounding, so e.g. ``8 * (1 - 0.75025) = 1.998 -> 1`` -- and ``int(num_mask_token)``
    (everything left) at the last step. ``num_mask_token`` is the batch MEAN of the mask
    counts (``mask_index.sum() / B``, a float32 tensor), ``s, t`` are float32 entries of
    ``torch.linspace(1, eps, steps + 1)``.
    """
    import torch

    n = torch.tensor(num_mask_token, dtype=torch.float32)
    if is_last:
        return int(n)
    s_t = torch.tensor(s, dtype=torch.float32)
    t_t = torch.tensor(t, dtype=torch.float32)
    return int(n * (1 - s_t / t_t))


def dream_generate(
    model_fn: ModelFn,
    prompt: np.ndarray,
    *,
    gen_length: int,
    steps: int = 512,
    eps: float = 1e-3,
    alg: str = "origin",
    alg_temp: Optional[float] = None,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    mask_id: int = DREAM_MASK_ID,
    attention_mask: Optional[np.ndarray] = None,
    generator=None,
) -> tuple[np.ndarray, int]:
    """Reference of Dream's ``diffusion_generate`` -> ``_sample`` (Dream-v0 ``generation_utils.py``).

    Rules, as in the original:

    * ``x = [prompt | MASK * gen_length]`` (``max_new_tokens = gen_length``). NOT
      semi-autoregressive: the whole answer is one block. ``timesteps =
      torch.linspace(1, eps, steps + 1)`` (float32); ``for i in range(steps)`` with
      ``t, s = timesteps[i], timesteps[i + 1]``; every step runs a forward (no early exit),
      so ``nfe == steps``.
    * ``alg='origin'``: every masked position (flattened over the batch, row-major) is
      revealed independently with probability ``1 - s / t`` (``1`` at the last step):
      ``rand < p``; revealed tokens come from ``dream_sample_tokens`` on those positions.
    * ``alg in {'maskgit_plus', 'topk_margin', 'entropy'}``: confidence = top-1 prob /
      top-1 minus top-2 prob / ``sum p log p`` (see ``dream_sample_tokens``); count
      ``n = dream_transfer_count(mask_index.sum() / B, s, t, i == steps - 1)``; a ``[B, T]``
      confidence map is -inf off the masks; if ``n > 0`` each row commits its top-``n``
      (``alg_temp`` None or 0) or ``n`` positions drawn without replacement from
      ``softmax(conf / alg_temp)`` over the row. (The count is a batch mean: rows are
      assumed to hold equal mask counts, which holds without hooks since every row starts
      with ``gen_length`` masks and commits ``n`` per step. The older, non-batched version
      took one top-``n`` over the flattened masked positions of the whole batch.)
    * Attention mask (left-padded batch), only if it has a zero: the mask is extended with
      ones over the answer, ``position_ids = cumsum(mask) - 1`` with pads set to 1, and the
      model gets the pairwise mask ``mask[:, None, :, None] & mask[:, None, None, :]``;
      here ``model_fn(tokens, attention_mask [B, T] bool, position_ids [B, T] int64)`` is
      called and must build that pairwise mask itself. Otherwise ``model_fn(tokens)``.

    Args:
        model_fn: ``tokens [B, T] -> SHIFTED logits [B, T, V]`` (float32 recommended).
        prompt: ``[B, P]`` int token ids.
        generator: ``torch.Generator`` for all randomness (sampling, ``origin``'s reveal
            draws, ``alg_temp`` draws).
    Returns:
        ``(answer [B, gen_length] int64, nfe)``.
    """
    import torch

    if generator is None:
        generator = torch.Generator().manual_seed(0)
    prompt_t = torch.as_tensor(np.asarray(prompt, dtype=np.int64))
    b, p = prompt_t.shape
    x = torch.nn.functional.pad(prompt_t, (0, gen_length), value=mask_id)

    extra: tuple = ()
    if attention_mask is not None and np.any(np.asarray(attention_mask) == 0):
        am = torch.as_tensor(np.asarray(attention_mask)).long()
        am = torch.nn.functional.pad(am, (0, gen_length), value=1)
        tok_idx = am.cumsum(-1) - 1
        tok_idx.masked_fill_(am == 0, 1)
        extra = (am.bool().numpy(), tok_idx.numpy())

    timesteps = torch.linspace(1, eps, steps + 1)
    nfe = 0
    for i in range(steps):
        mask_index = x == mask_id
        logits = torch.as_tensor(_call(model_fn, x.numpy().copy(), *extra))
        nfe += 1
        mask_logits = logits[mask_index]
        t = timesteps[i]
        s = timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.full((int(mask_index.sum()),), mask_id, dtype=torch.long)
            reveal = torch.rand(x0.shape, generator=generator) < p_transfer
            _, x0[reveal] = dream_sample_tokens(
                mask_logits[reveal], temperature=temperature, top_p=top_p, top_k=top_k, generator=generator
            )
            x[mask_index] = x0
            continue
        if alg == "maskgit_plus":
            confidence, x0 = dream_sample_tokens(
                mask_logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator
            )
        elif alg == "topk_margin":
            confidence, x0 = dream_sample_tokens(
                mask_logits, temperature=temperature, top_p=top_p, top_k=top_k, margin_confidence=True,
                generator=generator,
            )
        elif alg == "entropy":
            confidence, x0 = dream_sample_tokens(
                mask_logits, temperature=temperature, top_p=top_p, top_k=top_k, neg_entropy=True,
                generator=generator,
            )
        else:
            raise RuntimeError(f"Unknown alg: {alg}")
        n = dream_transfer_count(float(mask_index.sum() / b), float(s), float(t), i == steps - 1)
        full_conf = torch.full(x.shape, -torch.inf, dtype=logits.dtype)
        full_conf[mask_index] = confidence.to(logits.dtype)
        if n > 0:
            if alg_temp is None or alg_temp == 0:
                idx = torch.stack([torch.as_tensor(topk_indices(full_conf[j].numpy(), n)) for j in range(b)])
            else:
                probs = torch.softmax(full_conf / alg_temp, dim=-1)
                idx = torch.multinomial(probs, num_samples=n, generator=generator)
            cand = torch.full_like(x, mask_id)
            cand[mask_index] = x0
            rows = torch.arange(b)[:, None].expand_as(idx)
            x[rows, idx] = cand[rows, idx]
    return x[:, p:].numpy().astype(np.int64), nfe
