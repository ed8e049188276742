"""TSPD: reduction to the threshold rule, decode properties, no retracing on new parameter
values, features replayed by fit.py == features seen at decode time, JSON round trip, the fit
lowering its loss, and `dllm-jax train-controller`."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controllers import TSPD, TSPDParams, make_controller
from controllers.base import at_least_one
from controllers.ce import py_logit
from dllm_jax.train.controller_fit import fit_tspd, record, replay_features
from controllers.tspd import (FEATURES, TSPDError, distance_to_committed, feature_names,
                              load_tspd, read_tspd, save_tspd)
from dllm_jax.config import GenerateConfig
from dllm_jax.decode import generate
from dllm_jax.features import CEFilter, update_trajectory
from dllm_jax.state import BlockContext, Features, Trajectory
from tests.controller_props import (CFG, GEN, PARAMS, check_batch_equals_rows,
                                    check_compiles_once, check_decode_properties, prompts)


def random_params(seed: int, use_ce: bool = True, hidden: int = 4) -> TSPDParams:
    f = len(feature_names(use_ce))
    k = jax.random.split(jax.random.key(seed), 5)
    n = lambda i, *s: jax.random.normal(k[i], s, jnp.float32)  # noqa: E731
    return TSPDParams(x_mean=jnp.zeros((f,)), x_scale=jnp.ones((f,)), w=n(0, f), b=n(1),
                      w1=n(2, f, hidden), b1=n(3, hidden), w2=n(4, hidden))


def _random_step(seed: int, b: int = 4, lb: int = 16):
    rng = np.random.default_rng(seed)
    masked = rng.random((b, lb)) < 0.7
    masked[0] = False                                        # a finished row
    conf = rng.uniform(0, 1, (b, lb)).astype(np.float32)
    feats = Features(candidate=jnp.asarray(rng.integers(0, 5, (b, lb)), jnp.int32),
                     confidence=jnp.asarray(np.where(masked, conf, -np.inf), jnp.float32),
                     entropy=jnp.asarray(rng.uniform(0, 4, (b, lb)), jnp.float32),
                     margin=jnp.asarray(rng.uniform(0, 1, (b, lb)), jnp.float32),
                     masked=jnp.asarray(masked))
    traj = update_trajectory(Trajectory.zeros(b, lb), feats, 0.5, CEFilter())
    ctx = BlockContext(step=jnp.int32(0), block_step=jnp.int32(0), block=jnp.int32(0),
                       masked_at_block_start=jnp.full((b,), lb), active=jnp.asarray(masked.any(1)),
                       key=jax.random.key(0), steps_per_block=lb)
    return feats, traj, ctx


@pytest.mark.parametrize("use_ce", [False, True])
@pytest.mark.parametrize("hidden", [0, 3])
@pytest.mark.parametrize("thr", [0.3, 0.9])
def test_hand_set_params_reduce_to_threshold(use_ce: bool, hidden: int, thr: float) -> None:
    p = TSPDParams.threshold_rule(thr, len(feature_names(use_ce)), hidden)
    tspd = TSPD(params=p, tau=0.5, vocab_size=64, use_ce=use_ce)
    thresh = make_controller("threshold", threshold=thr)
    for seed in range(5):
        feats, traj, ctx = _random_step(seed)
        a, _ = jax.jit(tspd.decide)(feats, traj, ctx, ())
        b, _ = thresh.decide(feats, traj, ctx, ())
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind", ["peaked", "flat"])
def test_hand_set_tspd_decodes_like_threshold(kind: str) -> None:
    prompt, valid = prompts()
    tspd = TSPD(params=TSPDParams.threshold_rule(0.3), tau=0.5, vocab_size=64, use_ce=False)
    a = generate(PARAMS[kind], CFG, prompt, GEN, tspd, prompt_valid=valid)
    b = generate(PARAMS[kind], CFG, prompt, GEN, make_controller("threshold", threshold=0.3),
                 prompt_valid=valid)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.stats.fix_step), np.asarray(b.stats.fix_step))
    np.testing.assert_array_equal(np.asarray(a.stats.nfe), np.asarray(b.stats.nfe))


def test_distance_to_committed() -> None:
    masked = jnp.asarray([[True, True, False, True, True, True],
                          [True, True, True, True, True, True]])
    np.testing.assert_array_equal(np.asarray(distance_to_committed(masked)),
                                  [[1, 1, 0, 1, 2, 3], [1, 2, 3, 4, 5, 6]])


def test_features_in_documented_order() -> None:
    feats, traj, _ = _random_step(0)
    ctrl = TSPD(params=random_params(0), vocab_size=64)
    x = np.asarray(ctrl.features_of(feats, traj))
    assert x.shape == (4, 16, len(FEATURES) + 2) and np.isfinite(x).all()
    m = np.asarray(feats.masked)
    c = np.clip(np.asarray(feats.confidence), 1e-6, 1 - 1e-6)
    np.testing.assert_allclose(x[..., 0][m], np.log(c / (1 - c))[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x[..., 1], np.asarray(feats.entropy) / np.log(64), rtol=1e-6)
    np.testing.assert_allclose(x[..., 6][0], np.arange(16) / 15, rtol=1e-6)
    np.testing.assert_allclose(x[..., 8][:, 0], (~m).sum(1) / 16, rtol=1e-6)


@pytest.mark.parametrize("use_ce", [True, False])
@pytest.mark.parametrize("kind", ["peaked", "flat"])
@pytest.mark.parametrize("tau", [0.2, 0.9])
def test_tspd_decode_properties(use_ce: bool, kind: str, tau: float) -> None:
    ctrl = TSPD(params=random_params(1, use_ce), tau=tau, vocab_size=64, use_ce=use_ce)
    check_decode_properties(ctrl, kind)


def test_tspd_batch_equals_rows_and_new_params_do_not_retrace() -> None:
    ctrl = TSPD(params=random_params(2), tau=0.5, vocab_size=64)
    check_batch_equals_rows(ctrl)
    check_compiles_once(ctrl, other=ctrl.replace(params=random_params(3)))


def test_tspd_composes_with_cache() -> None:
    gen = GenerateConfig(gen_length=16, block_length=8, steps=8, trace=True, cache="prefix")
    check_decode_properties(TSPD(params=random_params(4), tau=0.5, vocab_size=64), "peaked", gen)


@pytest.mark.parametrize("use_ce", [True, False])
def test_replayed_features_are_the_decode_features(use_ce: bool) -> None:
    """fit.py's replay of a trace recomputes exactly the decisions TSPD took while decoding."""
    ctrl = TSPD(params=random_params(5, use_ce), tau=0.6, vocab_size=64, use_ce=use_ce)
    prompt, valid = prompts()
    out = generate(PARAMS["peaked"], CFG, prompt, GEN, ctrl, prompt_valid=valid)
    steps = int(out.stats.steps)
    x, live, _ = replay_features(out.stats.trace, gen=GEN, vocab_size=64, use_ce=use_ce,
                                 horizon=ctrl.horizon, ce_filter=ctrl.ce_filter)
    z = ctrl.params.logit(x)
    for s in range(steps):
        want = at_least_one(live[s] & (z[s] > py_logit(0.6)), z[s], live[s])
        np.testing.assert_array_equal(np.asarray(want), np.asarray(out.stats.trace["commit"][s]))
    assert not np.asarray(live[steps:]).any()


def test_json_round_trip_and_errors(tmp_path) -> None:
    ctrl = TSPD(params=random_params(6, hidden=5), tau=0.7, vocab_size=64, horizon=3,
                ce_filter=CEFilter(q=0.1, r=0.3, slope_var0=2.0))
    path = save_tspd(tmp_path, ctrl, {"loss": 0.5})
    assert os.path.basename(path) == "tspd.json"
    back = load_tspd(tmp_path)
    assert (back.tau, back.vocab_size, back.use_ce, back.horizon, back.ce_filter) == \
        (0.7, 64, True, 3, CEFilter(q=0.1, r=0.3, slope_var0=2.0))
    for a, b in zip(jax.tree_util.tree_leaves(ctrl.params), jax.tree_util.tree_leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert make_controller("tspd", model_dir=tmp_path, tau=0.4).tau == 0.4
    assert make_controller("tspd", tspd=path).tau == 0.7
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\)"):
        make_controller("tspd", tspd=path, tau=1.0)
    with pytest.raises(TSPDError, match="train-controller"):
        make_controller("tspd", model_dir=tmp_path / "nowhere")
    d = json.loads(open(path).read())
    d["params"]["w1"] = d["params"]["w1"][:-1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(TSPDError, match="shapes"):
        read_tspd(bad)
    d = json.loads(open(path).read())
    d["features"] = d["features"][:-1]
    bad.write_text(json.dumps(d))
    with pytest.raises(TSPDError, match="fitted on features"):
        read_tspd(bad)
    bad.write_text("{not json")
    with pytest.raises(TSPDError, match="cannot read"):
        read_tspd(bad)


def test_fit_lowers_loss_on_a_recorded_set() -> None:
    rng = np.random.default_rng(0)
    prompts_ = rng.integers(2, 60, size=(6, 5))
    gen = GenerateConfig(gen_length=16, block_length=8, steps=16)
    rec = record(PARAMS["peaked"], CFG, prompts_, gen=gen, thresholds=(0.5,), batch_size=4)
    assert rec.x.shape == (len(rec), len(feature_names(True))) and np.isfinite(rec.x).all()
    assert set(np.unique(rec.source)) == {0, 1} and rec.sources == ("reference", "threshold 0.5")
    assert set(np.unique(rec.group)) == set(range(6))
    assert 0 < rec.y.mean() < 1
    ctrl, m = fit_tspd(rec, vocab_size=CFG.vocab_size, hidden=4, steps=150, lr=0.05)
    assert m["loss_fit"] < m["loss_init"] - 0.01, m
    assert m["objective_last"] < m["objective_first"]
    assert m["n_val"] > 0 and 0 <= m["accuracy_eval"] <= 1
    assert ctrl.params.hidden == 4 and ctrl.vocab_size == CFG.vocab_size
    check_decode_properties(ctrl.replace(vocab_size=64), "peaked")


def test_train_controller_cli(tmp_path) -> None:
    from dllm_jax.checkpoint import save_model
    from dllm_jax.cli import main
    from dllm_jax.config import ModelConfig
    from dllm_jax.models import init_params
    from dllm_jax.tasks.vocab import EOS_ID, MASK_ID, PAD_ID, build_task_tokenizer, task_vocabulary

    tok_dir = tmp_path / "tok"
    build_task_tokenizer(tok_dir)
    cfg = ModelConfig.tiny("llada", vocab_size=len(task_vocabulary()), mask_token_id=MASK_ID,
                           eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_position=64)
    model = tmp_path / "model"
    save_model(model, cfg, init_params(cfg, jax.random.key(0), std=0.3),
               extra_files={n: tok_dir / n for n in ("tokenizer.json", "tokenizer_config.json")})
    out = tmp_path / "fit" / "tspd.json"
    out.parent.mkdir()  # an --out folder must exist (a missing one is a one-line error)
    rc = main(["train-controller", "--model", str(model), "--out", str(out), "--tasks", "copy",
               "--n", "3", "--steps", "20", "--gen-length", "16", "--block-length", "8",
               "--thresholds", "0.7", "--hidden", "2", "--batch-size", "4",
               "--drop", "momentum,position"])
    assert rc == 0 and out.exists()
    meta = json.loads(out.read_text())
    assert meta["metrics"]["tasks"] == ["copy"] and meta["metrics"]["split"] == "train"
    assert meta["metrics"]["positions"] == "content"            # the default rows
    assert meta["metrics"]["dropped"] == ["momentum", "position"]
    ctrl = make_controller("tspd", tspd=out)
    assert ctrl.vocab_size == cfg.vocab_size and ctrl.params.hidden == 2
    assert main(["train-controller", "--model", str(tmp_path / "none")]) == 2
    assert main(["train-controller", "--model", str(model), "--tasks", "nope"]) == 2


def test_content_only_rows_and_feature_ablations() -> None:
    """Content rows stop at the reference's first EOS; a dropped feature group gets zero
    weights, so the fitted rule does not change when that feature's value changes."""
    from dllm_jax.config import ConfigError, ModelConfig
    from dllm_jax.models import init_params
    from dllm_jax.train.controller_fit import content_end, dropped_columns

    assert content_end(np.array([[5, 1, 1], [5, 6, 7], [1, 1, 1]]), 1).tolist() == [1, 2, 0]
    cfg = ModelConfig.tiny("llada", vocab_size=32, mask_token_id=31, eos_token_id=1)
    params = init_params(cfg, jax.random.key(2), std=0.6)
    ids = np.array([[4, 5, 6], [7, 8, 9], [10, 11, 12], [13, 14, 15]], np.int32)
    gen = GenerateConfig(gen_length=8, block_length=8, steps=8)
    full = record(params, cfg, ids, gen=gen, thresholds=(0.9,), use_ce=True)
    content = record(params, cfg, ids, gen=gen, thresholds=(0.9,), use_ce=True,
                     content_only=True)
    assert 0 < len(content) <= len(full)
    ctrl, metrics = fit_tspd(content, vocab_size=32, hidden=4, steps=30, drop=("ce", "momentum"))
    cols = dropped_columns(content.features, ("ce", "momentum"))
    assert sorted(content.features[i] for i in cols) == ["ce_log_sd", "ce_mean", "momentum"]
    w, w1 = np.asarray(ctrl.params.w), np.asarray(ctrl.params.w1)
    assert np.all(w[cols] == 0) and np.all(w1[cols] == 0) and metrics["dropped"] == ["ce", "momentum"]
    x = content.x[:5].copy()
    z0 = np.asarray(ctrl.params.logit(jnp.asarray(x)))
    x[:, cols] += 7.0
    np.testing.assert_allclose(np.asarray(ctrl.params.logit(jnp.asarray(x))), z0, atol=1e-5)
    with pytest.raises(ConfigError, match="unknown feature groups"):
        fit_tspd(content, vocab_size=32, drop=("colour",))
