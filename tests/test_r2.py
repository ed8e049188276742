"""`r2` (R2-dLLM's rules as its authors wrote them) against an independent loop reference
(`tests/r2_reference.py`): hand-made steps exercising each rule, its order and edge cases,
then token-for-token whole decodes on tiny LLaDA and Dream models, uncached and with the
dual cache (against the torch Fast-dLLM cached loop)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controllers import make_controller
from controllers.r2 import StreakState, token_clusters, window_sweep
from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.decode import generate
from dllm_jax.state import BlockContext, Features, Trajectory

try:
    from tests import reference_decoders as ref
    from tests.r2_reference import R2Reference
except ImportError:  # pytest run from inside tests/
    import reference_decoders as ref
    from r2_reference import R2Reference

M = 99  # MASK id of the hand-made steps
OPTS = dict(threshold=0.9, r2_window=3, r2_spatial_threshold=0.8, r2_max_unmasked=1,
            r2_token_cluster="confidence", r2_temporal_steps=3, r2_temporal_threshold=0.8,
            r2_temporal_eval="last")


def _ref_of(opts: dict) -> R2Reference:
    return R2Reference(M, window=opts["r2_window"], spatial_threshold=opts["r2_spatial_threshold"],
                       max_unmasked=opts["r2_max_unmasked"], token_cluster=opts["r2_token_cluster"],
                       cluster_size=opts.get("r2_cluster_size", 2),
                       temporal_steps=opts["r2_temporal_steps"],
                       temporal_threshold=opts["r2_temporal_threshold"],
                       temporal_eval=opts["r2_temporal_eval"])


def _ref_step(r: R2Reference, tokens: np.ndarray, cand: np.ndarray, conf: np.ndarray,
              thr: float, block: int = 0) -> np.ndarray:
    """One step of the reference on a `[B, Lb]` block: threshold, then rules 2-4, with the
    top-1 of the 'logits' equal to (cand, conf). Returns the committed positions."""
    masked = tokens == M
    cf = np.where(masked, conf, -np.inf)
    x = tokens.copy()
    t = ref.fastdllm_threshold_transfer(cf, masked, thr)
    x[t] = cand[t]
    if block != r.block:
        r(x, cand, cf, np.zeros(x.shape + (2,)), masked, block)  # resets; then undo: no logits
        x[:] = np.where(t, cand, tokens)
    r.window_sweep(x, np.where(masked, cand, x), cf)
    r.token_clusters(x, cand, conf)
    r.temporal(x, masked, cand, conf)
    return masked & (x != M)


def _jax_step(ctrl, state, tokens, cand, conf, block_step: int):
    masked = jnp.asarray(tokens == M)
    feats = Features(candidate=jnp.asarray(cand, jnp.int32),
                     confidence=jnp.where(masked, jnp.asarray(conf, jnp.float32), -jnp.inf),
                     entropy=jnp.zeros(tokens.shape), margin=jnp.zeros(tokens.shape),
                     masked=masked)
    ctx = BlockContext(step=jnp.int32(block_step), block_step=jnp.int32(block_step),
                       block=jnp.int32(0), masked_at_block_start=jnp.zeros(tokens.shape[:1], jnp.int32),
                       active=jnp.ones(tokens.shape[:1], bool), key=jax.random.key(0))
    commit, state = ctrl.decide(feats, Trajectory.zeros(*tokens.shape), ctx, state)
    return np.asarray(commit & masked), state


def _both(opts, steps):
    """Run a sequence of (tokens, cand, conf) steps through both; the tokens of each step are
    given (the caller's canvas). Returns the per-step commits of each."""
    ctrl = make_controller("r2", **opts)
    r = _ref_of(opts)
    state = ctrl.init(*steps[0][0].shape)
    got, want = [], []
    for i, (tokens, cand, conf) in enumerate(steps):
        g, state = _jax_step(ctrl, state, tokens, cand, conf, i)
        got.append(g)
        want.append(_ref_step(r, tokens, cand, conf, opts["threshold"]))
    return got, want


def _row(*vals):
    """Hand-made block row: '#' -> decoded (token 5), a float -> masked with that confidence."""
    tokens = np.array([[5 if v == "#" else M for v in vals]])
    conf = np.array([[0.0 if v == "#" else v for v in vals]], np.float64)
    return tokens, conf


def test_the_docstring_drawing() -> None:
    tokens, conf = _row("#", .95, .85, .80, .10, .70, .88, "#")
    cand = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    got, want = _both(dict(OPTS, r2_token_cluster="none", r2_temporal_steps=0),
                      [(tokens, cand, conf)])
    np.testing.assert_array_equal(got[0], want[0])
    assert np.flatnonzero(got[0][0]).tolist() == [1, 2, 3]


@pytest.mark.parametrize("case", ["cap_counts_threshold_commits", "window_mean_equal",
                                  "block_shorter_than_window", "last_window", "no_cap"])
def test_window_sweep_edges(case: str) -> None:
    opts = dict(OPTS, r2_token_cluster="none", r2_temporal_steps=0)
    cand = np.arange(1, 7)[None]
    if case == "cap_counts_threshold_commits":      # .95 commits by threshold -> [0-2] has 2
        tokens, conf = _row("#", .95, .85, .85, .2, .2)
    elif case == "window_mean_equal":               # mean == spatial threshold commits (>=)
        tokens, conf = _row(.5, .5, .5, .5, .5, .5)
        opts["r2_spatial_threshold"] = 0.5
    elif case == "block_shorter_than_window":
        tokens, conf = _row(.85, .85)
        cand = cand[:, :2]
    elif case == "last_window":                     # only the window at the block end qualifies
        tokens, conf = _row(.95, .1, .1, .1, .85, .85, .85)
        cand = np.arange(1, 8)[None]
    else:                                           # -1: any number of decoded tokens
        tokens, conf = _row("#", "#", .85, "#", .2, .2)
        opts["r2_max_unmasked"] = -1
    got, want = _both(opts, [(tokens, cand, conf)])
    np.testing.assert_array_equal(got[0], want[0])
    fired = {"cap_counts_threshold_commits": [1, 2, 3], "window_mean_equal": list(range(6)),
             "block_shorter_than_window": [0], "last_window": [0, 4, 5, 6], "no_cap": [2]}[case]
    assert np.flatnonzero(got[0][0]).tolist() == fired


@pytest.mark.parametrize("mode", ["confidence", "mid"])
def test_token_clusters_after_the_window_sweep(mode: str) -> None:
    opts = dict(OPTS, r2_token_cluster=mode, r2_temporal_steps=0, r2_spatial_threshold=0.6)
    # run of 3 same-token masked positions (2..4), best .65 > .6; a run of 1 (pos 6) never (window [6-8] mean .54);
    # a 2-run at the threshold exactly (.6, strict) never; window means stay below .6
    tokens, conf = _row(.3, .92, .5, .65, .55, .1, .41, .6, .6)
    cand = np.array([[1, 2, 7, 7, 7, 3, 4, 9, 9]])
    got, want = _both(opts, [(tokens, cand, conf)])
    np.testing.assert_array_equal(got[0], want[0])
    assert np.flatnonzero(got[0][0]).tolist() == [1, 3]   # threshold 1; cluster: 3 (best / mid)


def test_cluster_size_option() -> None:
    opts = dict(OPTS, r2_temporal_steps=0, r2_spatial_threshold=0.6, r2_cluster_size=3)
    tokens, conf = _row(.3, .3, .65, .5, .1, .65, .5, .5)
    cand = np.array([[1, 2, 7, 7, 3, 8, 8, 8]])
    got, want = _both(opts, [(tokens, cand, conf)])
    np.testing.assert_array_equal(got[0], want[0])
    assert np.flatnonzero(got[0][0]).tolist() == [2, 5] or got[0][0, 5]


@pytest.mark.parametrize("ev", ["last", "ave", "max"])
def test_temporal_streaks(ev: str) -> None:
    opts = dict(OPTS, r2_window=0, r2_temporal_eval=ev)
    # positions 0-2 take each step's always-one commit (confidence .95 at step i, position i);
    # position 3: same candidate 3 steps (conf .7, .85, .82) -> last .82 >= .8, ave .79 < .8,
    # max .85 >= .8. position 4: its candidate changes at step 1 -> the streak restarts, 2 < 3.
    steps = []
    for i, (c1, c2, cand4) in enumerate([(.7, .81, 4), (.85, .83, 5), (.82, .84, 5)]):
        sink = ["#"] * i + [.95] + [.1] * (2 - i)
        tokens, conf = _row(*sink, c1, c2, .1)
        cand = np.array([[1, 1, 1, 2, cand4, 3]])
        steps.append((tokens, cand, conf))
    got, want = _both(opts, steps)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert [np.flatnonzero(g[0]).tolist() for g in got[:2]] == [[0], [1]]
    assert got[2][0, 3] == (ev in ("last", "max"))
    assert not got[2][0, 4]


def test_vectorised_pieces_equal_loops_on_random_steps() -> None:
    rng = np.random.default_rng(0)
    r = _ref_of(dict(OPTS, r2_spatial_threshold=0.55))
    sweep = jax.jit(window_sweep, static_argnums=(2, 3, 4))
    clusters = jax.jit(token_clusters, static_argnums=(3, 4))
    for lb in (1, 2, 3, 5, 9):
        for _ in range(25):
            masked = rng.random((3, lb)) < 0.7
            # window means: continuous values (a mean exactly at the threshold may round either
            # way in float32 vs float64, the deviation the module states); clusters: ties, to
            # check "first of equals"
            conf_w = rng.random((3, lb)).astype(np.float32).astype(np.float64)
            conf = np.round(rng.random((3, lb)), 1)
            cand = rng.integers(0, 3, (3, lb))
            x = np.where(masked, M, 5)
            want_w = x.copy()
            r.window_sweep(want_w, np.where(masked, cand, x), np.where(masked, conf_w, -np.inf))
            got_w = np.asarray(sweep(jnp.asarray(conf_w, jnp.float32), jnp.asarray(masked),
                                     3, 0.55, 1))
            np.testing.assert_array_equal(got_w, masked & (want_w != M))
            want_c = x.copy()
            r.token_clusters(want_c, cand, conf)
            got_c = np.asarray(clusters(jnp.asarray(conf, jnp.float32), jnp.asarray(cand),
                                        jnp.asarray(masked), 0.55, "confidence",
                                        jax.random.key(0)))
            np.testing.assert_array_equal(got_c, masked & (want_c != M))


def test_random_cluster_picks_one_member_of_the_run() -> None:
    conf = jnp.asarray([[.3, .9, .5, .5, .1]], jnp.float32)
    cand = jnp.asarray([[1, 7, 7, 7, 2]])
    masked = jnp.ones((1, 5), bool)
    picks = set()
    for s in range(20):
        got = np.asarray(token_clusters(conf, cand, masked, 0.6, "random", jax.random.key(s)))
        assert got.sum() == 1 and got[0, 1:4].sum() == 1
        picks.add(int(np.flatnonzero(got[0])[0]))
    assert picks == {1, 2, 3}


def test_new_block_clears_streaks() -> None:
    ctrl = make_controller("r2", **OPTS)
    st = StreakState(ids=jnp.full((1, 4), 3), count=jnp.full((1, 4), 2),
                     total=jnp.ones((1, 4)), peak=jnp.ones((1, 4)))
    tokens, conf = _row(.5, .85, .5, .5)
    _, st2 = _jax_step(ctrl, st, tokens, np.full((1, 4), 3), conf, block_step=0)
    assert int(st2.count.max()) == 1            # restarted, not 3


# ------------------------------------------------------------------ whole decodes
# vocab 12: candidates repeat often, so that same-token runs (rule 3) occur
CFGS = {"llada": ModelConfig.tiny("llada", vocab_size=12, mask_token_id=11),
        "dream": ModelConfig.tiny("dream", vocab_size=12, mask_token_id=11)}
PROMPT = np.array([[7, 2, 3, 4, 9, 5], [8, 8, 4, 2, 6, 1]], np.int32)
# chosen so that every rule fires on both tiny models (the test asserts it)
LOOSE = dict(threshold=0.95, r2_window=3, r2_spatial_threshold=0.7, r2_max_unmasked=1,
             r2_token_cluster="confidence", r2_temporal_steps=2, r2_temporal_threshold=0.3,
             r2_temporal_eval="ave")


@functools.lru_cache(maxsize=None)
def _params(arch: str):
    from dllm_jax.models import init_params
    return init_params(CFGS[arch], jax.random.key(5), std=0.5)


def _model_fn(cfg, params):
    from dllm_jax.models import apply
    fwd = jax.jit(functools.partial(apply, params, cfg))

    def fn(tokens):
        logits = np.asarray(fwd(np.asarray(tokens, np.int32)), np.float64)
        logits[..., cfg.mask_token_id] = -1e9
        return logits
    return fn


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("opts", [OPTS, LOOSE])
def test_whole_decode_matches_the_reference(arch: str, opts: dict) -> None:
    cfg = CFGS[arch]
    params = _params(arch)
    r = R2Reference(cfg.mask_token_id, **_ref_kwargs(opts))
    want, nfe = ref.fastdllm_generate(_model_fn(cfg, params), PROMPT, steps=24, gen_length=24,
                                      block_length=8, mask_id=cfg.mask_token_id,
                                      threshold=opts["threshold"], after_step=r)
    gen = GenerateConfig(gen_length=24, block_length=8, steps=24)
    out = generate(params, cfg, PROMPT, gen, make_controller("r2", **opts))
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    assert int(out.stats.steps) == nfe
    if opts is LOOSE:
        assert min(r.fired.values()) > 0, r.fired   # every rule took part


def _ref_kwargs(opts: dict) -> dict:
    return dict(window=opts["r2_window"], spatial_threshold=opts["r2_spatial_threshold"],
                max_unmasked=opts["r2_max_unmasked"], token_cluster=opts["r2_token_cluster"],
                temporal_steps=opts["r2_temporal_steps"],
                temporal_threshold=opts["r2_temporal_threshold"],
                temporal_eval=opts["r2_temporal_eval"])


def test_dual_cache_decode_matches_the_cached_reference() -> None:
    try:
        from tests.test_cache_parity import MASK, PROMPT as P2, _models
        from tests.reference_cached import fastdllm_generate_cached
    except ImportError:
        from test_cache_parity import MASK, PROMPT as P2, _models
        from reference_cached import fastdllm_generate_cached
    tm, cfg, params = _models()
    r = R2Reference(MASK, **_ref_kwargs(LOOSE))
    want, nfe = fastdllm_generate_cached(tm, P2, mode="dual", steps=24, gen_length=24,
                                         block_length=8, mask_id=MASK, suppress_token_ids=(MASK,),
                                         threshold=LOOSE["threshold"], after_step=r)
    gen = GenerateConfig(gen_length=24, block_length=8, steps=24, cache="dual")
    out = generate(params, cfg, P2.astype(np.int32), gen, make_controller("r2", **LOOSE))
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    assert int(out.stats.steps) == nfe
    assert r.fired["window"] > 0 and r.fired["temporal"] > 0, r.fired
