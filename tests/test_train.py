"""dllm_jax.train: data pipeline, LLaDA / block-diffusion objective, training and resume (CPU, tiny)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax import models as M
from dllm_jax.checkpoint import load_model
from dllm_jax.tasks import split_of
from dllm_jax.tasks.vocab import EOS_ID, MASK_ID, PAD_ID, build_backend
from dllm_jax.tokenizer import Tokenizer
from dllm_jax.train import (TrainConfig, TrainError, batch_at, block_diffusion_logits,
                            build_pool, data_key, loss_fn, lr_schedule, masked_diffusion_loss,
                            sample_noise, tiny_model_config, train)

TASKS3 = ("copy", "reverse", "add")
apply_jit = jax.jit(M.apply, static_argnums=(1,))


def small_cfg(**kw) -> TrainConfig:
    # every training test shares one StepSpec (batch 16) and chunks of 4 steps: one compile
    base = dict(steps=16, batch_size=16, lr=3e-3, warmup=2, seed=0, ckpt_every=4, log_every=4,
                pool_size=48, tasks=TASKS3, prompt_length=16, answer_length=16)
    base.update(kw)
    return TrainConfig(**base)


def tiny(cfg: TrainConfig, block_size: int = 0):
    return tiny_model_config(prompt_length=cfg.prompt_length, answer_length=cfg.answer_length,
                             block_size=block_size).replace(hidden_size=32, head_dim=8,
                                                            intermediate_size=64)


# ----------------------------------------------------------------------------- data
def test_pool_is_deterministic_per_seed_and_well_formed():
    cfg = small_cfg()
    (a, names), (b, _) = build_pool(cfg), build_pool(cfg)
    assert names == TASKS3
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    c, _ = build_pool(cfg.replace(seed=1))
    assert not np.array_equal(np.asarray(a.prompts), np.asarray(c.prompts))

    prompts, answers, counts = (np.asarray(v) for v in (a.prompts, a.answers, a.counts))
    assert prompts.shape[:2] == answers.shape[:2] and prompts.shape[2] == 16
    backend = build_backend()
    for t, name in enumerate(names):
        for i in range(int(counts[t])):
            p, ans = prompts[t, i], answers[t, i]
            real = p != PAD_ID
            n = int(real.sum())
            assert n > 0 and real[-n:].all(), "prompts are left-padded"
            assert MASK_ID not in p and MASK_ID not in ans
            k = int(np.argmax(ans == EOS_ID)) if EOS_ID in ans else len(ans)
            assert (ans[k:] == EOS_ID).all(), "answers are padded with <eos>"
            text = backend.decode(p[real].tolist(), skip_special_tokens=True)
            assert text.startswith(f"{name}:") and split_of(name, text) == "train"

    key = data_key(0)
    b1 = batch_at(a, key, 5, 8)
    b2 = batch_at(a, key, 5, 8)
    b3 = batch_at(a, key, 6, 8)
    for x, y in zip(b1[:2], b2[:2]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(b1[0]), np.asarray(b3[0]))


# ----------------------------------------------------------------------------- objective
def test_loss_equals_hand_computation_and_prompt_is_never_masked():
    cfg = small_cfg()
    mcfg = tiny(cfg)
    params = M.init_params(mcfg, jax.random.key(3), std=0.2)
    prompt = np.array([[PAD_ID, PAD_ID, 10, 11, 12, 13], [20, 21, 22, 23, 24, 25]], np.int32)
    answer = np.array([[30, 31, 32, EOS_ID, EOS_ID], [40, 41, 42, 43, 44]], np.int32)
    eps = 0.05
    loss, aux = loss_fn(params, mcfg, jnp.asarray(prompt), jnp.asarray(answer),
                        jax.random.key(7), eps=eps)
    t, masked, tokens = (np.asarray(aux[k]) for k in ("t", "masked", "tokens"))
    # one t per sequence, in [eps, 1)
    assert (t == t[:, :1]).all() and (t >= eps).all() and (t < 1).all()
    # the prompt is the input unchanged; masked answer tokens are <mask>, the others unchanged
    np.testing.assert_array_equal(tokens[:, :6], prompt)
    np.testing.assert_array_equal(tokens[:, 6:], np.where(masked, MASK_ID, answer))
    assert masked.any()

    # independent forward on the noisy sequence, then CE / t on masked answer positions
    valid = np.concatenate([prompt != PAD_ID, np.ones_like(answer, bool)], axis=1)
    logits = np.asarray(M.apply(params, mcfg, jnp.asarray(tokens), key_valid=jnp.asarray(valid)),
                        np.float64)[:, 6:]
    m = logits.max(-1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
    want = 0.0
    for b in range(2):
        for i in range(5):
            if masked[b, i]:
                want += -logp[b, i, answer[b, i]] / t[b, i]
    want /= answer.size
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)

    # the weighting itself, on numbers: uniform logits -> CE = log V on every masked token
    V = 7
    tt = np.array([[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]], np.float32)
    mk = np.array([[True, False, True], [False, False, True]])
    got = masked_diffusion_loss(jnp.zeros((2, 3, V)), jnp.zeros((2, 3), jnp.int32),
                                jnp.asarray(mk), jnp.asarray(tt))
    np.testing.assert_allclose(float(got), np.log(V) * (2 / 0.5 + 1 / 0.25) / 6, rtol=1e-6)


def test_noise_rates_follow_t():
    pos = jnp.broadcast_to(jnp.arange(1000), (64, 1000))
    t, masked = sample_noise(jax.random.key(0), pos, 1e-3)
    frac = np.asarray(masked).mean(1)
    np.testing.assert_allclose(frac, np.asarray(t)[:, 0], atol=0.06)
    # per block: t constant inside a block of positions, different across blocks
    tb, _ = sample_noise(jax.random.key(0), pos[:2, :16], 1e-3, block_size=4, max_position=16)
    tb = np.asarray(tb)
    assert (tb.reshape(2, 4, 4) == tb.reshape(2, 4, 4)[:, :, :1]).all()
    assert len(np.unique(tb[0])) == 4


def test_block_diffusion_forward_sees_clean_past_blocks_only():
    """The [noisy | clean] forward equals, block by block, the block-causal model on a sequence
    whose earlier blocks are clean and whose own block is noisy (later blocks do not matter)."""
    bs = 4
    mcfg = tiny(small_cfg(), block_size=bs)
    params = M.init_params(mcfg, jax.random.key(1), std=0.2)
    rng = np.random.default_rng(0)
    clean = rng.integers(5, 100, (2, 14)).astype(np.int32)
    valid = np.ones((2, 14), bool)
    valid[0, :3] = False  # left padding shifts the blocks of row 0
    clean[0, :3] = PAD_ID
    noisy = np.where(rng.random((2, 14)) < 0.5, MASK_ID, clean).astype(np.int32)
    noisy[~valid] = PAD_ID
    q = jnp.broadcast_to(jnp.arange(14), (2, 14))
    got = np.asarray(block_diffusion_logits(params, mcfg, jnp.asarray(noisy), jnp.asarray(clean),
                                            jnp.asarray(valid), q))
    pos = np.asarray(M.default_positions(jnp.asarray(valid)))
    for r in range(2):
        for blk in range(int(pos[r].max()) // bs + 1):
            seq = np.where(pos[r] // bs < blk, clean[r], noisy[r])
            seq = np.where(pos[r] // bs > blk, MASK_ID, seq)  # later blocks: anything
            ref = np.asarray(apply_jit(params, mcfg, jnp.asarray(seq[None]),
                                       key_valid=jnp.asarray(valid[r][None])))[0]
            sel = valid[r] & (pos[r] // bs == blk)
            np.testing.assert_allclose(got[r][sel], ref[sel], rtol=2e-5, atol=2e-5)


def test_schedule_is_warmup_cosine():
    cfg = small_cfg(steps=100, warmup=10, lr=1e-3, end_lr_ratio=0.1)
    s = np.asarray(lr_schedule(cfg)(np.arange(101)))
    assert s[0] == 0 and abs(s[10] - 1e-3) < 1e-9 and abs(s[100] - 1e-4) < 1e-9
    assert (np.diff(s[:11]) > 0).all() and (np.diff(s[10:]) <= 1e-12).all()


# ----------------------------------------------------------------------------- training
def test_loss_decreases_on_a_tiny_run():
    cfg = small_cfg(steps=48, lr=1e-2, warmup=4)
    res = train(cfg, tiny(cfg), None, quiet=True)
    assert res.step == 48 and res.losses.shape == (48,)
    assert np.isfinite(res.losses).all()
    first, last = res.losses[:8].mean(), res.losses[-8:].mean()
    assert last < 0.75 * first, (first, last)


def test_resume_continues_the_same_run(tmp_path):
    cfg = small_cfg()
    mcfg = tiny(cfg)
    pool = build_pool(cfg)
    straight = train(cfg, mcfg, tmp_path / "a", pool=pool, quiet=True)
    part1 = train(cfg, mcfg, tmp_path / "b", pool=pool, stop_at=8, quiet=True)
    assert part1.step == 8 and part1.out_dir is None
    with pytest.raises(TrainError, match="resume"):
        train(cfg, mcfg, tmp_path / "b", pool=pool, quiet=True)  # refuses to clobber the run
    with pytest.raises(TrainError, match="configured differently"):
        train(cfg.replace(lr=1e-3), mcfg, tmp_path / "b", pool=pool, resume=True, quiet=True)
    part2 = train(cfg, mcfg, tmp_path / "b", pool=pool, resume=True, quiet=True)
    assert part2.first_step == 8 and part2.step == 16
    np.testing.assert_array_equal(np.concatenate([part1.losses, part2.losses]), straight.losses)
    for x, y in zip(jax.tree.leaves(straight.params), jax.tree.leaves(part2.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)

    # the model folder is complete: config, params, tokenizer, run record
    cfg_loaded, params = load_model(tmp_path / "b")
    assert cfg_loaded == mcfg
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(part2.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    tok = Tokenizer.from_dir(tmp_path / "b")
    assert tok.eos_id == EOS_ID and tok.token_id("mask_token") == MASK_ID
    record = json.loads((tmp_path / "b" / "train_config.json").read_text())
    assert record["train"]["steps"] == 16 and record["steps_done"] == 16


def test_block_diffusion_training_runs():
    cfg = small_cfg(steps=4, block_diffusion=True)
    res = train(cfg, tiny(cfg, block_size=4), None, quiet=True)
    assert np.isfinite(res.losses).all() and res.step == 4
    with pytest.raises(TrainError, match="block"):
        train(cfg, tiny(cfg), None, quiet=True)


def test_cli_train_errors_are_one_line(tmp_path, capsys):
    from dllm_jax.cli import main

    assert main(["train", "--out", str(tmp_path / "m"), "--steps", "10", "--warmup", "20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --warmup")
    assert main(["train", "--out", str(tmp_path / "m"), "--steps", "10", "--attn-impl",
                 "cudnn"]) == 2                      # CPU, float32: refused in one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--attn-impl cudnn" in err[0] and not (tmp_path / "m").exists()


def test_bundled_model_is_the_generate_default(capsys):
    """`dllm-jax generate` without --model decodes with the shipped model (CPU, offline)."""
    from dllm_jax.checkpoint import load_config
    from dllm_jax.cli import main
    from dllm_jax.pretrained import bundled_model_dir

    path = bundled_model_dir()
    cfg, dtype = load_config(path)
    assert cfg.arch == "llada" and dtype == "float32" and cfg.mask_token_id == MASK_ID
    assert Tokenizer.from_dir(path).vocab_size == cfg.vocab_size
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    assert main(["generate", "sort: Zoe Bob Eve Alice", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == "Alice Bob Eve Zoe" and out["nfe"] == 32
