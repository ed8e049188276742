"""Sanity tests of the reference decoders themselves (tests/reference_decoders.py) on toy models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

try:  # tests/ as a package (tests/__init__.py) or as a plain folder on sys.path
    from tests import reference_decoders as ref
except ImportError:
    import reference_decoders as ref

V = 16
MASK = 15  # toy mask id (inside the toy vocabulary, never predicted: its logit is very low)


class ToyModel:
    """Logits = a fixed random table per position + a term depending on the left neighbour.

    Records every input it sees, so that tests can check what the decoder did step by step.
    ``position_only=True`` drops the neighbour term (logits independent of the tokens).
    """

    def __init__(self, t: int, seed: int = 0, position_only: bool = False, scale: float = 3.0):
        r = np.random.default_rng(seed)
        self.table = (scale * r.standard_normal((t, V))).astype(np.float32)
        self.pair = (scale * r.standard_normal((V, V))).astype(np.float32)
        self.table[:, MASK] = -30.0
        self.position_only = position_only
        self.calls: list[np.ndarray] = []
        self.extras: list[tuple] = []

    def __call__(self, tokens: np.ndarray, *extra) -> np.ndarray:
        tokens = np.asarray(tokens)
        self.calls.append(tokens.copy())
        self.extras.append(extra)
        b, t = tokens.shape
        logits = np.broadcast_to(self.table[:t], (b, t, V)).copy()
        if not self.position_only:
            left = np.concatenate([np.full((b, 1), MASK), tokens[:, :-1]], axis=1)
            logits += 0.5 * self.pair[left]
            logits[:, :, MASK] = -30.0
        return logits


def _prompt(b: int = 2, p: int = 3) -> np.ndarray:
    return (np.arange(b * p).reshape(b, p) % 10).astype(np.int64)


def _commits_per_call(model: ToyModel, final: np.ndarray, p: int, b: int) -> list[np.ndarray]:
    """Number of answer positions newly unmasked between consecutive forward inputs (per row)."""
    seq = [c[:b, p:] for c in model.calls] + [final]
    return [((seq[k] == MASK) & (seq[k + 1] != MASK)).sum(axis=1) for k in range(len(seq) - 1)]


# ----------------------------------------------------------------------------- LLaDA


def test_num_transfer_tokens_schedule():
    mask = np.zeros((3, 12), bool)
    mask[0, :10] = True
    mask[1, :12] = True
    mask[2, :3] = True
    out = ref.llada_num_transfer_tokens(mask, 4)
    np.testing.assert_array_equal(out, [[3, 3, 2, 2], [3, 3, 3, 3], [1, 1, 1, 0]])
    np.testing.assert_array_equal(out.sum(1), mask.sum(1))


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_llada_fills_all_and_follows_schedule(remasking):
    b, p, g, bl, steps = 2, 3, 12, 4, 9
    model = ToyModel(p + g)
    ans, nfe = ref.llada_generate(
        model, _prompt(b, p), steps=steps, gen_length=g, block_length=bl, mask_id=MASK, remasking=remasking
    )
    assert ans.shape == (b, g) and nfe == steps == len(model.calls)
    assert not (ans == MASK).any()
    commits = _commits_per_call(model, ans, p, b)
    # 3 steps per block, 4 masks per block -> 2, 1, 1
    for k, c in enumerate(commits):
        np.testing.assert_array_equal(c, [2, 1, 1][k % 3])
        # nothing after the current block is touched
        blk = k // 3
        after = model.calls[k + 1][:, p + (blk + 1) * bl:] if k + 1 < len(model.calls) else ans[:, (blk + 1) * bl:]
        assert (after == MASK).all()


def test_llada_greedy_order_is_descending_confidence():
    p, g = 2, 8
    model = ToyModel(p + g, position_only=True)
    ans, nfe = ref.llada_generate(model, _prompt(1, p), steps=g, gen_length=g, block_length=g, mask_id=MASK)
    assert nfe == g
    conf = ref.softmax(model.table[p:]).max(-1)
    np.testing.assert_array_equal(ans[0], model.table[p:].argmax(-1))
    # the position committed at call k is the k-th most confident one
    order = [int(np.flatnonzero((model.calls[k][0, p:] == MASK) & (nxt[0] != MASK))[0])
             for k, nxt in enumerate([c[:, p:] for c in model.calls[1:]] + [ans])]
    np.testing.assert_array_equal(order, np.argsort(-conf, kind="stable"))


def test_llada_steps_more_than_masks_still_runs_every_step():
    p, g = 2, 4
    model = ToyModel(p + g)
    ans, nfe = ref.llada_generate(model, _prompt(1, p), steps=8, gen_length=g, block_length=g, mask_id=MASK)
    assert nfe == 8 and not (ans == MASK).any()


def test_llada_deterministic_and_seeded_sampling():
    p, g = 3, 8
    kw = dict(steps=4, gen_length=g, block_length=4, mask_id=MASK)
    a1, _ = ref.llada_generate(ToyModel(p + g), _prompt(2, p), **kw)
    a2, _ = ref.llada_generate(ToyModel(p + g), _prompt(2, p), **kw)
    np.testing.assert_array_equal(a1, a2)
    s1, _ = ref.llada_generate(ToyModel(p + g), _prompt(2, p), temperature=1.0, rng=np.random.default_rng(5), **kw)
    s2, _ = ref.llada_generate(ToyModel(p + g), _prompt(2, p), temperature=1.0, rng=np.random.default_rng(5), **kw)
    np.testing.assert_array_equal(s1, s2)
    assert not (s1 == MASK).any()


def test_llada_gumbel_scores_float64_and_identity_at_zero():
    logits = np.random.default_rng(0).standard_normal((2, 3, V)).astype(np.float32)
    assert ref.gumbel_max_scores(logits, 0.0, np.random.default_rng(0)) is logits
    s = ref.gumbel_max_scores(logits, 0.7, np.random.default_rng(0))
    assert s.dtype == np.float64
    u = np.random.default_rng(0).random(logits.shape)
    np.testing.assert_allclose(s, np.exp(logits.astype(np.float64)) / (-np.log(u)) ** 0.7)


def test_llada_cfg_batches_cond_and_uncond():
    b, p, g = 2, 3, 4
    model = ToyModel(p + g)
    ans, nfe = ref.llada_generate(
        model, _prompt(b, p), steps=4, gen_length=g, block_length=g, cfg_scale=1.5, mask_id=MASK
    )
    assert nfe == 4 and len(model.calls) == 4 and not (ans == MASK).any()
    for x in model.calls:
        assert x.shape == (2 * b, p + g)
        np.testing.assert_array_equal(x[:b, :p], _prompt(b, p))
        assert (x[b:, :p] == MASK).all()  # prompt masked in the unconditional half
        np.testing.assert_array_equal(x[b:, p:], x[:b, p:])  # committed answer tokens kept
    # guidance formula: with cond == uncond the result equals the plain decode
    plain, _ = ref.llada_generate(ToyModel(p + g, position_only=True), _prompt(b, p), steps=4, gen_length=g,
                                  block_length=g, mask_id=MASK)
    guided, _ = ref.llada_generate(ToyModel(p + g, position_only=True), _prompt(b, p), steps=4, gen_length=g,
                                   block_length=g, mask_id=MASK, cfg_scale=2.0)
    np.testing.assert_array_equal(plain, guided)


def test_llada_logits_eos_inf():
    p, g, eos = 2, 6, 3
    model = ToyModel(p + g, position_only=True)
    model.table[:, eos] = 50.0  # EOS would win everywhere
    ans, _ = ref.llada_generate(model, _prompt(1, p), steps=6, gen_length=g, block_length=g, mask_id=MASK)
    assert (ans == eos).all()
    model = ToyModel(p + g, position_only=True)
    model.table[:, eos] = 50.0
    ans, _ = ref.llada_generate(model, _prompt(1, p), steps=6, gen_length=g, block_length=g, mask_id=MASK,
                                logits_eos_inf=True, eos_id=eos)
    assert not (ans == eos).any()


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_llada_confidence_eos_eot_inf(temperature):
    """EOS/EoT candidates get confidence 0 (committed last); EOS only at temperature 0."""
    p, g, eos, eot = 2, 6, 3, 4
    model = ToyModel(p + g, position_only=True)
    model.table[:, [eos, eot]] = -5.0  # no other position predicts EOS / EoT
    model.table[p + 0, eos] = 40.0  # the most confident positions predict EOS / EoT
    model.table[p + 1, eot] = 40.0
    ans, _ = ref.llada_generate(model, _prompt(1, p), steps=g, gen_length=g, block_length=g, mask_id=MASK,
                                confidence_eos_eot_inf=True, eos_id=eos, eot_id=eot, temperature=temperature,
                                rng=np.random.default_rng(0))
    assert ans[0, 0] == eos and ans[0, 1] == eot  # x0 is unchanged by the option
    commit_call = {}
    for k, x in enumerate(model.calls[1:] + [np.concatenate([_prompt(1, p), ans], 1)]):
        for pos in np.flatnonzero((model.calls[k][0, p:] == MASK) & (x[0, p:] != MASK)):
            commit_call[int(pos)] = k
    assert commit_call[1] >= g - 2  # EoT always deprioritised
    if temperature == 0.0:
        assert commit_call[0] >= g - 2  # EOS too, through the aliasing of the noisy scores
    else:
        assert commit_call[0] == 0  # EOS keeps its (high) confidence


def test_llada_attention_mask_passed_with_ones_for_answer():
    p, g = 3, 4
    model = ToyModel(p + g)
    am = np.array([[0, 1, 1], [1, 1, 1]])
    ref.llada_generate(model, _prompt(2, p), steps=2, gen_length=g, block_length=g, mask_id=MASK, attention_mask=am)
    (mask,) = model.extras[0]
    assert mask.dtype == bool and mask.shape == (2, p + g)
    np.testing.assert_array_equal(mask[:, :p], am.astype(bool))
    assert mask[:, p:].all()


# ----------------------------------------------------------------------------- Fast-dLLM


def test_threshold_transfer_rule():
    conf = np.array([[0.95, 0.9, 0.5, -np.inf, 0.91], [0.2, 0.3, 0.1, -np.inf, -np.inf], [-np.inf] * 5])
    mask = np.isfinite(conf)
    out = ref.fastdllm_threshold_transfer(conf, mask, 0.9)
    np.testing.assert_array_equal(out[0], [True, True, False, False, True])  # 0.9 == threshold commits
    np.testing.assert_array_equal(out[1], [False, True, False, False, False])  # none above: the best one
    assert not out[2].any()


def test_factor_transfer_rule():
    # factor 1: thresholds per rank n (1-based): -1, 1-1/3, 1-1/4, 1-1/5, ...
    conf = np.array([[0.9, 0.7, 0.76, 0.1, 0.2]])
    out = ref.fastdllm_factor_transfer(conf, np.ones_like(conf, bool), 1.0)
    # sorted 0.9, 0.76, 0.7 (< 0.75 -> stop at rank 3): commit 2
    np.testing.assert_array_equal(out[0], [True, False, True, False, False])
    # quirk: only the LAST one fails -> all commit
    conf = np.array([[0.99, 0.98, 0.1]])
    out = ref.fastdllm_factor_transfer(conf, np.ones_like(conf, bool), 1.0)
    assert out.all()
    # equality passes (strict < to fail): rank 3 exactly at 1 - 1/4
    conf = np.array([[0.9, 0.8, 1 - 1 / 4, 0.0, 0.0]])
    out = ref.fastdllm_factor_transfer(conf, np.ones_like(conf, bool), 1.0)
    np.testing.assert_array_equal(out[0], [True, True, True, False, False])
    # a single candidate always commits; rows without candidates commit nothing
    conf = np.array([[0.01, -np.inf], [-np.inf, -np.inf]])
    out = ref.fastdllm_factor_transfer(conf, np.isfinite(conf), 1.0)
    np.testing.assert_array_equal(out, [[True, False], [False, False]])


def test_fastdllm_fixed_schedule_equals_llada():
    p, g = 3, 8
    kw = dict(steps=8, gen_length=g, block_length=4, mask_id=MASK)
    a, n1 = ref.llada_generate(ToyModel(p + g), _prompt(2, p), softmax_dtype=np.float64, **kw)
    f, n2 = ref.fastdllm_generate(ToyModel(p + g), _prompt(2, p), **kw)
    np.testing.assert_array_equal(a, f)
    assert n1 == n2 == 8


def test_fastdllm_fixed_schedule_stops_block_early():
    p, g = 2, 4
    model = ToyModel(p + g)
    ans, nfe = ref.fastdllm_generate(model, _prompt(1, p), steps=8, gen_length=g, block_length=g, mask_id=MASK)
    assert nfe == 4 and not (ans == MASK).any()  # LLaDA would run 8 steps


def test_fastdllm_threshold_extremes_and_commits():
    p, g, bl = 2, 8, 4
    _, nfe = ref.fastdllm_generate(ToyModel(p + g), _prompt(2, p), steps=2, gen_length=g, block_length=bl,
                                   mask_id=MASK, threshold=1.01)
    assert nfe == g  # one token per step
    _, nfe = ref.fastdllm_generate(ToyModel(p + g), _prompt(2, p), steps=2, gen_length=g, block_length=bl,
                                   mask_id=MASK, threshold=0.0)
    assert nfe == g // bl  # a whole block per step

    model = ToyModel(p + g, seed=3)
    ans, nfe = ref.fastdllm_generate(model, _prompt(2, p), steps=2, gen_length=g, block_length=bl, mask_id=MASK,
                                     threshold=0.6)
    assert not (ans == MASK).any() and nfe == len(model.calls)
    seq = model.calls + [np.concatenate([_prompt(2, p), ans], 1)]
    for k in range(len(model.calls)):
        x, nxt = seq[k], seq[k + 1]
        logits = model(x)  # re-evaluate (appends to calls; already copied into seq)
        probs = ref.softmax(logits)
        blk_end = p + ((np.flatnonzero((x[0, p:] == MASK) | (x[1, p:] == MASK))[0]) // bl + 1) * bl
        for j in range(2):
            cand = np.zeros(x.shape[1], bool)
            cand[p:blk_end] = x[j, p:blk_end] == MASK
            if not cand.any():
                continue
            conf = np.where(cand, probs[j].max(-1), -np.inf)
            committed = cand & (nxt[j] != MASK)
            expect = cand & (conf >= 0.6)
            expect[np.argmax(conf)] = True
            np.testing.assert_array_equal(committed, expect)


def test_fastdllm_factor_runs_and_fills():
    p, g = 2, 8
    ans, nfe = ref.fastdllm_generate(ToyModel(p + g), _prompt(2, p), steps=2, gen_length=g, block_length=4,
                                     mask_id=MASK, factor=1.0)
    assert not (ans == MASK).any() and 2 <= nfe <= g


# ----------------------------------------------------------------------------- Dream


def test_dream_transfer_count_truncates():
    ts = torch.linspace(1, 1e-3, 5)
    counts, left = [], 8
    for i in range(4):
        n = ref.dream_transfer_count(left, float(ts[i + 1]), float(ts[i]), i == 3)
        counts.append(n)
        left -= n
    assert counts == [1, 2, 2, 3]  # 8 * 0.24975 = 1.998 -> 1 (truncation, not rounding)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_schedule_and_fill(alg):
    b, p, g, steps = 2, 3, 8, 4
    model = ToyModel(p + g)
    ans, nfe = ref.dream_generate(model, _prompt(b, p), gen_length=g, steps=steps, alg=alg, mask_id=MASK)
    assert nfe == steps == len(model.calls) and not (ans == MASK).any()
    commits = _commits_per_call(model, ans, p, b)
    for c in commits:
        assert c[0] == c[1]
    assert [int(c[0]) for c in commits] == [1, 2, 2, 3]


def test_dream_maskgit_order_and_confidences():
    p, g = 2, 6
    model = ToyModel(p + g, position_only=True)
    ans, _ = ref.dream_generate(model, _prompt(1, p), gen_length=g, steps=g, alg="maskgit_plus", mask_id=MASK)
    np.testing.assert_array_equal(ans[0], model.table[p:].argmax(-1))
    logits = torch.tensor(model.table[p:])
    c, x0 = ref.dream_sample_tokens(logits)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(c, probs.max(-1).values)
    c, _ = ref.dream_sample_tokens(logits, margin_confidence=True)
    top2 = probs.topk(2).values
    torch.testing.assert_close(c, top2[:, 0] - top2[:, 1])
    c, _ = ref.dream_sample_tokens(logits, neg_entropy=True)
    torch.testing.assert_close(c, (probs * torch.log(probs + 1e-10)).sum(-1))
    # top-k / top-p filter the distribution even when greedy: the argmax is kept, confidence rises
    c1, x1 = ref.dream_sample_tokens(logits, top_k=2)
    torch.testing.assert_close(x1, x0)
    assert (c1 >= probs.max(-1).values - 1e-6).all()
    c2, x2 = ref.dream_sample_tokens(logits, top_p=1e-3)
    torch.testing.assert_close(x2, x0)
    torch.testing.assert_close(c2, torch.ones_like(c2))


def test_dream_origin_and_sampling_determinism():
    b, p, g = 2, 3, 8
    for alg, kw in [("origin", {}), ("maskgit_plus", dict(temperature=0.8, top_p=0.9)), ("entropy", dict(alg_temp=0.5))]:
        outs = []
        for _ in range(2):
            ans, nfe = ref.dream_generate(ToyModel(p + g), _prompt(b, p), gen_length=g, steps=5, alg=alg,
                                          mask_id=MASK, generator=torch.Generator().manual_seed(7), **kw)
            assert nfe == 5 and not (ans == MASK).any()
            outs.append(ans)
        np.testing.assert_array_equal(outs[0], outs[1])


def test_dream_attention_mask_positions():
    p, g = 3, 2
    model = ToyModel(p + g)
    am = np.array([[0, 0, 1], [1, 1, 1]])
    ref.dream_generate(model, _prompt(2, p), gen_length=g, steps=2, alg="maskgit_plus", mask_id=MASK,
                       attention_mask=am)
    mask, pos = model.extras[0]
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(pos, [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    model = ToyModel(p + g)
    ref.dream_generate(model, _prompt(2, p), gen_length=g, steps=2, alg="maskgit_plus", mask_id=MASK,
                       attention_mask=np.ones((2, p)))
    assert model.extras[0] == ()  # an all-ones mask is dropped, as in the original
