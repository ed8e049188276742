"""Speculative draft-and-verify decoding (SimSD, `dllm_jax/speculative.py`): the reference
layout against a brute-force construction, each verification group against the plain step
the left-to-right baseline would run, the acceptance rules (greedy runs, the speculative
ratio preserving the target distribution), and whole decodes: lossless against
`left_to_right`, fewer forwards, always ending."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from controllers import make_controller
from dllm_jax import speculative as SP
from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.decode import GenerateError, generate
from dllm_jax.decode_step import Sequence, cached_logits
from dllm_jax.sequence_layout import canvas_length
from dllm_jax.models import apply, apply_refresh, default_positions, init_params
from dllm_jax.models.transformer import apply_with_references
from tests.controller_props import check_decode_properties

CFGS = {
    "llada": ModelConfig.tiny("llada", vocab_size=64, mask_token_id=63),
    "dream": ModelConfig.tiny("dream", vocab_size=64, mask_token_id=63),
    "sdar": ModelConfig.tiny("sdar", vocab_size=64, mask_token_id=63, block_size=4),
}
PARAMS = {a: init_params(c, jax.random.key(1), std=0.5) for a, c in CFGS.items()}
PROMPT = np.array([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13], [0, 0, 0, 0, 14]], np.int32)
VALID = np.arange(5)[None, :] >= np.array([[0], [2], [4]])
GEN = GenerateConfig(gen_length=8, block_length=4, steps=8)
LTR, SIMSD = make_controller("left_to_right"), make_controller("simsd")
# the references, jitted (one compile per shapes, reused by every group)
APPLY = jax.jit(apply, static_argnums=(1,))
CACHED = jax.jit(cached_logits, static_argnums=(1, 2, 6))


def _decode(arch, ctrl, gen=GEN, batch=3, **kw):
    prompt, valid = (PROMPT, VALID) if batch == 3 else (PROMPT[:1], VALID[:1])
    out = generate(kw.pop("params", PARAMS[arch]), CFGS[arch], prompt, gen, ctrl,
                   prompt_valid=valid, **kw)
    return np.asarray(out.tokens), np.asarray(out.stats.nfe), out


# ----------------------------------------------------------------------------- layout
def test_reference_layout_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    for (b, r, c, groups, bs, n_only) in [(2, 3, 5, 2, 0, 0), (2, 4, 6, 3, 2, 0),
                                          (1, 5, 0, 4, 3, 0), (2, 6, 4, 4, 0, 2)]:
        pos = np.sort(rng.integers(0, 9, size=(b, r)), axis=1)
        val = rng.random((b, r)) > 0.2
        cpos = rng.integers(0, 9, size=(b, c))
        cuse = rng.random((b, c)) > 0.3
        only = np.arange(r) >= r - n_only                # draft-only entries (the dual case)
        ctx = (jnp.asarray(cpos), jnp.asarray(cuse)) if c else (None, None)
        got_pos, got = SP.reference_layout(jnp.asarray(pos), jnp.asarray(val), groups, bs, *ctx,
                                           jnp.asarray(only) if n_only else None)
        rule = (lambda qp, kp: True) if bs == 0 else (lambda qp, kp: kp // bs <= qp // bs)
        want = np.zeros((b, groups * r, c + groups * r), bool)
        want_pos = np.zeros((b, groups * r), int)
        for row, g, i in itertools.product(range(b), range(groups), range(r)):
            q = g * r + i
            want_pos[row, q] = pos[row, i]
            for k in range(c):                       # a cached entry: usable and the rule
                want[row, q, k] = cuse[row, k] and rule(pos[row, i], cpos[row, k])
            for h, j in itertools.product(range(groups), range(r)):   # own group only
                want[row, q, c + h * r + j] = (h == g and val[row, j] and (only[i] or not only[j])
                                               and rule(pos[row, i], pos[row, j]))
        np.testing.assert_array_equal(np.asarray(got_pos), want_pos)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_hypotheses_and_ranks_equal_brute_force() -> None:
    block = np.array([[9, 63, 63, 63], [63, 7, 63, 63]])
    drafts = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    score = np.array([[0.0, 0.2, 0.9, 0.5], [0.3, 0.0, 0.1, 0.8]], np.float32)
    masked = block == 63
    ltr = np.asarray(SP.decoding_rank("left_to_right", jnp.asarray(masked), jnp.asarray(score)))
    conf = np.asarray(SP.decoding_rank("confidence", jnp.asarray(masked), jnp.asarray(score)))
    np.testing.assert_array_equal(ltr, [[4, 0, 1, 2], [0, 4, 1, 2]])
    np.testing.assert_array_equal(conf, [[4, 2, 0, 1], [1, 4, 2, 0]])
    hyp = np.asarray(SP.hypothesis_blocks(jnp.asarray(block), jnp.asarray(drafts),
                                          jnp.asarray(conf), 3))
    for row, g in itertools.product(range(2), range(3)):
        want = [drafts[row, i] if conf[row, i] < g else block[row, i] for i in range(4)]
        np.testing.assert_array_equal(hyp[row, g], want)


def _state(arch: str, committed: int = 1):
    """A batch in block 0 (its first `committed` answer tokens fixed) and drafts."""
    cfg = CFGS[arch]
    b, g, lb = 3, GEN.gen_length, GEN.block_length
    answer = np.full((b, g), cfg.mask_token_id, np.int32)
    answer[:, :committed] = 17
    tokens = jnp.asarray(np.concatenate([PROMPT, answer], axis=1))
    valid = jnp.asarray(np.concatenate([VALID, np.ones((b, g), bool)], axis=1))
    drafts = jnp.asarray(np.random.default_rng(1).integers(2, 60, size=(b, lb)), jnp.int32)
    masked = tokens[:, 5:5 + lb] == cfg.mask_token_id
    rank = SP.decoding_rank("left_to_right", masked, jnp.zeros((b, lb)))
    return cfg, tokens, default_positions(valid), valid, drafts, rank


@pytest.mark.parametrize("arch,mode,kind", [
    ("llada", "none", "whole"), ("dream", "dual", "cached"), ("sdar", "dual", "refresh"),
    ("dream", "prefix", "refresh")])
def test_each_group_is_the_baseline_step(arch: str, mode: str, kind: str) -> None:
    """Group g's predictions == the step the left-to-right baseline runs after committing
    the drafts of ranks < g: a full forward (no cache), a cached step (cache), or, at a
    block start (refresh), the full forward for group 0 and cached steps on the refreshed
    cache for the others, which the forward also returns. Whole-sequence groups (and the
    main sequence) also predict the next block (a completed block's drafts) exactly."""
    cfg, tokens, pos, valid, drafts, rank = _state(arch, 0 if kind == "refresh" else 1)
    params, start, lb = PARAMS[arch], 5, 4
    gen = GenerateConfig(gen_length=8, block_length=4, steps=8, cache=mode)
    groups = SP.n_groups(lb)
    hyp = SP.hypothesis_blocks(tokens[:, start:start + lb], drafts, rank, groups)
    qidx = lambda at: jnp.broadcast_to(at + jnp.arange(lb), (3, lb))  # noqa: E731
    fresh = jax.jit(apply_refresh, static_argnums=(1,))(params, cfg, tokens, pos, valid,
                                                        qidx(start))
    cache = None if mode == "none" else fresh[1]

    @jax.jit
    def groups_logits(cache):
        hb, hn, new = SP.group_hidden(params, cfg, gen, tokens, pos, valid, cache,
                                      jnp.int32(start), hyp, None, kind, True)
        read = lambda h: jnp.stack([SP.select_logits(params, cfg, gen, h,  # noqa: E731
                                                     jnp.full((3, lb), g))
                                    for g in range(groups)], axis=1)
        return read(hb), read(hn), new

    got, got_next, new_cache = groups_logits(cache)
    for g in range(groups):
        seq_g = tokens.at[:, start:start + lb].set(hyp[:, g])
        want_next = None
        if mode == "none" or (kind == "refresh" and g == 0):
            want = APPLY(params, cfg, seq_g, pos, valid, qidx(start))
            want_next = APPLY(params, cfg, seq_g, pos, valid, qidx(start + lb))
        else:
            want = CACHED(params, cfg, gen, Sequence(seq_g, pos, valid), cache,
                          jnp.int32(start), None)
        for got_g, w in ((got[:, g], want), (got_next[:, g], want_next)):
            if w is None:
                continue
            w = np.asarray(SP.finish_logits(cfg, gen, w))
            fin = np.isfinite(w)
            np.testing.assert_allclose(np.asarray(got_g)[fin], w[fin], atol=1e-4)  # f32 sums
            np.testing.assert_array_equal(np.asarray(got_g).argmax(-1), w.argmax(-1))
    if kind == "refresh":
        np.testing.assert_allclose(np.asarray(new_cache.k), np.asarray(fresh[1].k), atol=1e-5)
        np.testing.assert_allclose(np.asarray(new_cache.v), np.asarray(fresh[1].v), atol=1e-5)


def test_concatenated_groups_equal_batch_rows() -> None:
    """Without a cache the groups run as batch rows: the same as appending every group to one
    sequence under the block-diagonal reference mask (SDAR: block-causal inside groups)."""
    cfg, tokens, pos, valid, drafts, rank = _state("sdar")
    params, groups, t = PARAMS["sdar"], 3, tokens.shape[1]
    hyp = SP.hypothesis_blocks(tokens[:, 5:9], drafts, rank, groups)
    seqs = jnp.broadcast_to(tokens[:, None], (3, groups, t)).at[:, :, 5:9].set(hyp)
    ref_pos, mask = SP.reference_layout(pos, valid, groups, cfg.block_size)
    concat = apply_with_references(params, cfg, seqs.reshape(3, groups * t), ref_pos, mask)
    rows = apply_with_references(params, cfg, seqs.reshape(3 * groups, t),
                                 jnp.repeat(pos, groups, 0), jnp.repeat(mask[:, :t, :t], groups, 0))
    np.testing.assert_allclose(np.asarray(concat).reshape(3 * groups, t, -1), np.asarray(rows),
                               atol=2e-5)


# ----------------------------------------------------------------------------- acceptance
def _greedy_case(agree_until: list[int]):
    """Rows of a block of 5, all masked, LTR; the verifier's argmax is token 10 + i at
    position i; drafts agree up to (not including) `agree_until[row]`."""
    b, lb, v = len(agree_until), 5, 32
    want = np.broadcast_to(10 + np.arange(lb), (b, lb))
    logits = np.where(np.arange(v)[None, None] == want[..., None], 5.0, 0.0).astype(np.float32)
    drafts = want.copy()
    for row, j in enumerate(agree_until):
        if j < lb:
            drafts[row, j] = 3
    masked = jnp.ones((b, lb), bool)
    rank = SP.decoding_rank("left_to_right", masked, jnp.zeros((b, lb)))
    return rank, masked, jnp.asarray(drafts, jnp.int32), jnp.asarray(logits), want


def test_greedy_acceptance_full_agreement_and_first_disagreement() -> None:
    rank, masked, drafts, logits, want = _greedy_case([5, 0, 2, 4])
    a, tok = SP.accept("greedy", rank, masked, drafts, logits, None, jax.random.key(0), 0.0)
    np.testing.assert_array_equal(np.asarray(a), [5, 0, 2, 4])
    tok = np.asarray(tok)
    # full agreement: all 5; a disagreement at j: the run before j AND the verifier's token at j
    np.testing.assert_array_equal(tok[0], want[0])
    np.testing.assert_array_equal(tok[1], [10, -1, -1, -1, -1])
    np.testing.assert_array_equal(tok[2], [10, 11, 12, -1, -1])
    np.testing.assert_array_equal(tok[3], [10, 11, 12, 13, 14])
    # stop_at_eos: an accepted EOS ends the run (committed, nothing after it)
    logits_eos = logits.at[:, 1, 1].set(9.0)
    drafts_eos = drafts.at[:, 1].set(1)
    a, tok = SP.accept("greedy", rank, masked, drafts_eos, logits_eos, None, jax.random.key(0),
                       0.0, eos_id=1)
    np.testing.assert_array_equal(np.asarray(tok)[0], [10, 1, -1, -1, -1])


def test_greedy_acceptance_follows_the_decoding_order() -> None:
    """Confidence order: the run is a prefix of the ranks, not of the positions."""
    rank, masked, drafts, logits, want = _greedy_case([5])
    score = jnp.asarray([[0.1, 0.9, 0.5, 0.7, 0.2]])
    rank = SP.decoding_rank("confidence", masked, score)        # positions 1, 3, 2, 4, 0
    drafts = drafts.at[0, 2].set(3)                              # rank 2 disagrees
    a, tok = SP.accept("greedy", rank, masked, drafts, logits, None, jax.random.key(0), 0.0)
    assert int(a[0]) == 2
    np.testing.assert_array_equal(np.asarray(tok)[0], [-1, 11, 12, 13, -1])


def _p_q(v: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(v)), rng.dirichlet(np.ones(v) * 0.5)


def test_sampling_acceptance_preserves_the_target_distribution() -> None:
    """One rank: drafts ~ q, accept with min(1, p/q), else the residual: the committed token
    is ~ p. Two ranks whose second target depends on the first token: the pair is
    ~ p(x0) p(x1 | x0) (when the first is rejected, the second is drawn next step from its
    exact conditional, as the loop's next step does). Chi-square at 1e-3, fixed seeds."""
    v, n = 6, 60000
    p0, q0 = _p_q(v, 0)
    p1 = np.stack([_p_q(v, 10 + x)[0] for x in range(v)])      # p(x1 | x0)
    q1 = _p_q(v, 99)[1]
    k = jax.random.split(jax.random.key(7), 4)
    d0 = jax.random.categorical(k[0], jnp.log(jnp.asarray(q0, jnp.float32)), shape=(n,))
    d1 = jax.random.categorical(k[1], jnp.log(jnp.asarray(q1, jnp.float32)), shape=(n,))
    drafts = jnp.stack([d0, d1], axis=1).astype(jnp.int32)
    # the verifier of rank 1 sees draft d0 (group 1): p(. | d0)
    logits = jnp.log(jnp.stack([jnp.broadcast_to(jnp.asarray(p0, jnp.float32), (n, v)),
                                jnp.asarray(p1, jnp.float32)[d0]], axis=1))
    logq = jnp.log(jnp.asarray(np.stack([q0, q1]), jnp.float32))[None].repeat(n, 0)
    masked = jnp.ones((n, 2), bool)
    rank = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (n, 2))
    # one rank only (the second position not masked)
    m1 = masked.at[:, 1].set(False)
    r1 = rank.at[:, 1].set(2)
    _, tok1 = jax.jit(SP.accept, static_argnums=(0,))("sampling", r1, m1, drafts, logits, logq,
                                                     k[2], 1.0)
    counts = np.bincount(np.asarray(tok1)[:, 0], minlength=v)
    assert stats.chisquare(counts, p0 * n).pvalue > 1e-3
    # two ranks
    a, tok = jax.jit(SP.accept, static_argnums=(0,))("sampling", rank, masked, drafts, logits,
                                                    logq, k[2], 1.0)
    tok = np.asarray(tok)
    assert set(np.unique(np.asarray(a))) == {0, 1, 2}          # every branch was taken
    x0 = tok[:, 0]
    rest = tok[:, 1] < 0
    later = np.asarray(jax.random.categorical(k[3], jnp.log(jnp.asarray(p1, jnp.float32)[x0])))
    x1 = np.where(rest, later, tok[:, 1])
    counts = np.bincount(x0 * v + x1, minlength=v * v)
    want = (p0[:, None] * p1).ravel() * n
    assert stats.chisquare(counts, want).pvalue > 1e-3


def test_sampled_decode_has_the_left_to_right_distribution() -> None:
    """A whole sampled SimSD decode (4 answer tokens in 2 blocks of 2, vocabulary of 3 +
    MASK) on a tiny model: the answers' joint distribution over 20000 rows equals the
    left-to-right sampling distribution p(x0) p(x1 | x0) p(x2 | x0, x1) p(x3 | x0..x2),
    computed exactly (chi-square over the 81 cells, those expecting < 5 pooled, at 1e-3;
    drawing the rejected token from p instead of the residual fails it with p ~ 0). Block 1
    starts from drafts made when block 0 completed."""
    cfg = ModelConfig.tiny("llada", vocab_size=4, mask_token_id=3)
    params = init_params(cfg, jax.random.key(5), std=0.2)
    temp, n, m, g = 1.0, 20000, cfg.mask_token_id, 4
    prompt = np.array([2, 0, 2], np.int32)
    gen = GenerateConfig(gen_length=g, block_length=2, steps=g, temperature=temp)
    out = generate(params, cfg, np.tile(prompt, (n, 1)), gen, SIMSD, key=jax.random.key(3))
    got, nfe = np.asarray(out.tokens), np.asarray(out.stats.nfe)
    assert set(np.unique(nfe)) == {3, 4}       # block 1 in one forward, or in two

    prefixes = [q for k in range(g) for q in itertools.product(range(3), repeat=k)]
    seqs = np.array([list(prompt) + list(q) + [m] * (g - len(q)) for q in prefixes], np.int32)
    logits = np.asarray(jax.jit(lambda s: apply(params, cfg, s))(seqs), np.float64)
    probs = {}
    for q, row in zip(prefixes, logits):
        lg = row[3 + len(q), :3] / temp
        probs[q] = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
    want = np.array([np.prod([probs[x[:k]][x[k]] for k in range(g)])
                     for x in itertools.product(range(3), repeat=g)])
    counts = np.bincount(got @ (3 ** np.arange(g)[::-1]), minlength=3 ** g)
    small = want * n < 5
    counts = np.append(counts[~small], counts[small].sum())
    expect = np.append(want[~small], want[small].sum()) * n
    assert len(counts) > 30 and stats.chisquare(counts, expect).pvalue > 1e-3


# ----------------------------------------------------------------------------- decodes
@pytest.mark.parametrize("arch", ["llada", "dream", "sdar"])
@pytest.mark.parametrize("batch", [1, 3])
def test_lossless_against_left_to_right(arch: str, batch: int) -> None:
    want, nfe_ltr, _ = _decode(arch, LTR, batch=batch)
    got, nfe, out = _decode(arch, SIMSD, batch=batch)
    np.testing.assert_array_equal(got, want)
    assert (nfe <= nfe_ltr).all()
    assert not (got == CFGS[arch].mask_token_id).any()
    # one token per step at least: at most the canvas (SDAR's also decodes the tail of the
    # last block past the answer, sequence_layout)
    assert int(out.stats.steps) <= canvas_length(CFGS[arch], GEN)
    if batch == 3:
        assert (nfe < nfe_ltr).any(), "no draft was ever accepted"


@pytest.mark.parametrize("arch,mode", [("llada", "dual"), ("dream", "dual"), ("sdar", "dual"),
                                       ("sdar", "prefix")])
def test_lossless_with_cache(arch: str, mode: str) -> None:
    gen = GenerateConfig(gen_length=8, block_length=4, steps=8, cache=mode)
    want, nfe_ltr, _ = _decode(arch, LTR, gen)
    got, nfe, _ = _decode(arch, SIMSD, gen)
    np.testing.assert_array_equal(got, want)
    assert (nfe <= nfe_ltr).all()


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_per_layer_refresh_writes_into_the_carried_cache(arch: str) -> None:
    """The GPU layout (per-layer, fused weights): the verification refresh writes the main
    sequence's keys/values into the carried cache; the decode equals the stacked layout's."""
    from dllm_jax.models import unstack_layers

    gen = GenerateConfig(gen_length=8, block_length=4, steps=8, cache="dual")
    want, nfe_want, _ = _decode(arch, SIMSD, gen)
    got, nfe, _ = _decode(arch, SIMSD, gen, params=unstack_layers(PARAMS[arch], fuse=True))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(nfe, nfe_want)


def test_lossless_with_guidance_and_eos() -> None:
    params = dict(PARAMS["llada"], lm_head=PARAMS["llada"]["lm_head"].at[:, 1].add(0.6))
    for gen in (GenerateConfig(gen_length=8, block_length=4, steps=8, cfg_scale=1.0),
                GenerateConfig(gen_length=8, block_length=4, steps=8, stop_at_eos=True)):
        want, nfe_ltr, _ = _decode("llada", LTR, gen, params=params)
        got, nfe, _ = _decode("llada", SIMSD, gen, params=params)
        np.testing.assert_array_equal(got, want)
        assert (nfe <= nfe_ltr).all()
    assert (want == 1).any(), "the test should commit EOS"


def test_drafts_the_verifier_agrees_with_are_accepted_in_one_forward() -> None:
    """Attention switched off (o_proj = 0): every masked position predicts the same token
    whatever the context, so every draft is right: the decode's first (plain) step commits
    one token, ONE verification the other three of block 0 and drafts block 1, and ONE
    verification all four of block 1."""
    params = dict(PARAMS["llada"])
    params["layers"] = dict(params["layers"], o_proj=jnp.zeros_like(params["layers"]["o_proj"]))
    got, nfe, out = _decode("llada", SIMSD, params=params)
    np.testing.assert_array_equal(nfe, [3, 3, 3])
    want, _, _ = _decode("llada", LTR, params=params)
    np.testing.assert_array_equal(got, want)


def test_draft_model() -> None:
    """Drafts from a second model: the target itself as draft model gets every draft
    accepted (one verification per block); any draft model stays lossless; draft forwards
    are counted apart."""
    want, nfe_ltr, _ = _decode("llada", LTR)
    same, nfe, out = _decode("llada", SIMSD, draft_params=PARAMS["llada"],
                             draft_cfg=CFGS["llada"])
    np.testing.assert_array_equal(same, want)
    np.testing.assert_array_equal(nfe, [2, 2, 2])
    assert (np.asarray(out.stats.draft_nfe) == 8).all()        # 4 drafts in each of 2 blocks
    other = init_params(CFGS["llada"], jax.random.key(9), std=0.5)
    got, nfe, _ = _decode("llada", SIMSD, draft_params=other, draft_cfg=CFGS["llada"])
    np.testing.assert_array_equal(got, want)
    assert (nfe <= nfe_ltr).all()


def test_greedy_commits_are_sequential_greedy_predictions() -> None:
    """Confidence order, greedy, no cache: at every step the committed tokens, taken in some
    order, are each the model's argmax given the tokens fixed before the step and those
    before it in that order (what a one-token-per-step greedy decode in that order would
    commit), including the steps that start block 1 from block 0's drafts."""
    ctrl = make_controller("simsd", draft_order="confidence")
    cfg, params, gen = CFGS["llada"], PARAMS["llada"], GEN
    tokens, nfe, out = _decode("llada", ctrl)
    fix = np.asarray(out.stats.fix_step)
    argmax = jax.jit(lambda t, v: SP.finish_logits(cfg, gen, apply(params, cfg, t[None], None,
                                                                   v[None])).argmax(-1)[0])
    assert (nfe < gen.gen_length).all()
    for row in range(3):
        valid = np.concatenate([VALID[row], np.ones(gen.gen_length, bool)])
        for step in range(int(out.stats.steps)):
            done = np.where((fix[row] >= 0) & (fix[row] < step), tokens[row], cfg.mask_token_id)
            now = list(np.flatnonzero(fix[row] == step))
            base = np.concatenate([PROMPT[row], done]).astype(np.int32)

            def consistent(order):
                seq = base.copy()
                for j in order:
                    if int(argmax(jnp.asarray(seq), jnp.asarray(valid))[5 + j]) != tokens[row, j]:
                        return False
                    seq[5 + j] = tokens[row, j]
                return True
            assert any(consistent(o) for o in itertools.permutations(now)), (row, step, now)


def test_confidence_order_sampled_decode_ends() -> None:
    """Every step commits >= 1 token of every unfinished row, nothing is rewritten, the loop
    ends with no MASK (the shared decode properties), for the confidence order, sampled
    (tests/test_decode.py checks the same for the default simsd, greedy)."""
    gen = GenerateConfig(gen_length=12, block_length=4, steps=12, trace=True, temperature=1.0)
    out = check_decode_properties(make_controller("simsd", draft_order="confidence"), "peaked",
                                  gen)
    assert int(out.stats.steps) < gen.gen_length


def test_errors_are_sentences() -> None:
    with pytest.raises(GenerateError, match="temperature"):
        _decode("llada", make_controller("simsd", acceptance="sampling"))
    with pytest.raises(GenerateError, match="speculative controller"):
        _decode("llada", LTR, draft_params=PARAMS["llada"], draft_cfg=CFGS["llada"])
    with pytest.raises(GenerateError, match="tokenizer"):
        _decode("llada", SIMSD, draft_params=PARAMS["llada"],
                draft_cfg=CFGS["llada"].replace(vocab_size=65))
    with pytest.raises(ValueError, match="draft_order"):
        make_controller("simsd", draft_order="random")
