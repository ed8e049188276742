"""DiffusionGemma's canvas sampler (`dllm_jax.diffusion_gemma_sampler`) against transformers'
own `DiffusionGemmaForBlockDiffusion.generate`, with the randomness fed identically: one
precomputed stream (starting canvases, re-randomised tokens, Gumbel noise, indexed by canvas
and step) given to ours as `CanvasNoise` and patched into transformers'
`EntropyBoundSampler.initialize_canvas` (starting and re-noise draws) and `torch.multinomial`
(Gumbel-max over the same noise). The model (`tests/diffusion_gemma_models.py`, embeddings std
2 and soft-cap 30, so that predictions are confident enough to stop) decodes two canvases
after a left-padded batch, EOS = a token it produces often.

Step by step (teacher-forced): every step transformers' generate runs, given the same inputs
(canvas, argmax canvas, self-conditioning logits, stopped rows, stability history, and the
cache of the prompt and transformers' previous canvases), `denoise_step` accepts the same
positions, makes the same next canvas and argmax canvas and stops the same rows; its
processed logits are within 2e-3 of transformers' (logits ~ 75; transformers' own eager and
sdpa kernels differ by ~1e-4 before the temperature).

End to end (`generate`, free running): same tokens (PAD after EOS), same steps per canvas,
same forward passes per row and tokens per forward. Free running, float32 differences
compound through self-conditioning (~1e-3 after 3 steps, ~3e-2 after 6 on this model), so
the end-to-end setting stops within 3 steps.

Both checks first assert that transformers' decisions are not within float32 noise of
flipping (argmax and Gumbel gaps, the acceptance bound and cut, the confidence threshold):
decisions closer than our logits' error to transformers' cannot be compared.

The pieces are also checked against independent loop re-implementations: the entropy-bound
acceptance on random and tied entropies, and the stable-and-confident stop on hand-made
argmax sequences.
"""

from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers.models.diffusion_gemma")
from transformers import DiffusionGemmaGenerationConfig, EntropyBoundSamplerConfig  # noqa: E402
from transformers.models.diffusion_gemma import generation_diffusion_gemma as hf_gen  # noqa: E402

from dllm_jax.config import ConfigError  # noqa: E402
from dllm_jax.diffusion_gemma_sampler import (CanvasConfig, CanvasNoise, StepState,  # noqa: E402
                                              adaptive_stop, denoise_step, generate)
from controllers.entropy_bound import entropy_bound_accept  # noqa: E402
from dllm_jax.models import diffusion_gemma as DG  # noqa: E402


# the references' seeds hold for the 2-core machines' torch thread count (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("torch_threads_2")


try:  # tests/ as a package or as pytest's rootdir-inserted path
    from tests.diffusion_gemma_models import CANVAS, build_and_convert
except ImportError:
    from diffusion_gemma_models import CANVAS, build_and_convert

T, PADS = 12, (0, 3, 7)
EOS = 69      # a token this model produces often, so that EOS handling is exercised
# transformers' decisions must be this far from flipping: logit gaps (our processed logits
# are within ~6e-4 of transformers' per step), entropy distances
MARGIN = {"argmax": 5e-3, "sample": 5e-3, "bound": 2e-3, "cut": 2e-3, "confidence": 2e-3}
SETTINGS = {  # (options, seed of the noise stream)
    # rows stop at different steps on confidence alone; partial acceptance; EOS in a canvas
    "confident": (CanvasConfig(max_new_tokens=16, max_denoising_steps=8, entropy_bound=2.0,
                               stability_threshold=0, confidence_threshold=0.45), 9),
    # six steps of the stability history; acceptance from 1 token to the whole canvas
    "stable": (CanvasConfig(max_new_tokens=2 * CANVAS, max_denoising_steps=6, entropy_bound=0.5,
                            stability_threshold=1, confidence_threshold=2.0, t_min=0.3,
                            t_max=0.9), 9),
}


@pytest.fixture(scope="module")
def peaky_build(tmp_path_factory: pytest.TempPathFactory):
    """(transformers model, our config, our params, our converted model folder)."""
    tmp = tmp_path_factory.mktemp("dgs")
    model, cfg, params, _ = build_and_convert(tmp, embed_std=2.0,
                                              final_logit_softcapping=30.0, eos_token_id=EOS)
    # transformers 5.25's generate builds the denoiser's padding mask from the integer canvas
    # (`_prepare_denoiser_inputs`), which its eager mask cannot cast: generate runs on sdpa
    model.set_attn_implementation("sdpa")
    return model, cfg, params, tmp / "ours"


@pytest.fixture(scope="module")
def peaky(peaky_build):
    return peaky_build[:3]


def _prompt(vocab: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(len(PADS), T))
    valid = np.ones(ids.shape, bool)
    for r, p in enumerate(PADS):
        ids[r, :p], valid[r, :p] = 0, False
    return ids, valid


def _noise(gen: CanvasConfig, b: int, vocab: int, seed: int) -> CanvasNoise:
    rng = np.random.default_rng(seed)
    k, n = gen.num_canvases(CANVAS), gen.max_denoising_steps
    return CanvasNoise(init=rng.integers(0, vocab, size=(k, b, CANVAS)).astype(np.int32),
                       renoise=rng.integers(0, vocab, size=(k, n, b, CANVAS)).astype(np.int32),
                       gumbel=rng.gumbel(size=(k, n, b, CANVAS, vocab)).astype(np.float32))


def _margins(logits: torch.Tensor, gumbel: np.ndarray, gen: CanvasConfig) -> dict[str, float]:
    """How far transformers' decisions of one step are from flipping: the smallest gap
    between the best two (processed) logits (argmax canvas) and the best two Gumbel scores
    (sample), the distance of the acceptance rule to its bound and between the entropies
    either side of the cut, and the distance of a mean entropy to the confidence threshold."""
    def gap(x: torch.Tensor) -> float:
        top = torch.topk(x, 2, dim=-1).values
        return float((top[..., 0] - top[..., 1]).min())

    ent = torch.distributions.Categorical(logits=logits).entropy()
    srt = torch.sort(ent, dim=-1).values
    rule = torch.cumsum(srt, -1) - srt - gen.entropy_bound
    k = (rule <= 0).sum(-1, keepdim=True)
    cut = torch.gather(srt, -1, k.clamp(max=srt.shape[-1] - 1)) - torch.gather(srt, -1, k - 1)
    cut = torch.where(k < srt.shape[-1], cut, torch.full_like(cut, np.inf))
    out = {"argmax": gap(logits), "sample": gap(torch.log_softmax(logits, -1) + torch.as_tensor(gumbel)),
           "bound": float(rule.abs().min()), "cut": float(cut.min())}
    if gen.confidence_threshold is not None:
        out["confidence"] = float((ent.mean(-1) - gen.confidence_threshold).abs().min())
    return out


def _transformers_generate(model, ids, valid, gen: CanvasConfig, noise: CanvasNoise,
                           monkeypatch: pytest.MonkeyPatch):
    """transformers' generate with the draws of `noise`. Returns its output and one record per
    denoising step: canvas k, step s, the step's inputs and outputs, its decision margins."""
    state = {"k": -1, "s": 0, "renoise": False}
    records: list[dict] = []
    orig_renoise = hf_gen.EntropyBoundSampler.renoise_canvas
    orig_step = model._denoising_step
    num = lambda x: None if x is None else x.detach().clone().numpy()  # noqa: E731

    def initialize_canvas(self, batch_size, device):
        if state["renoise"]:
            return torch.as_tensor(noise.renoise[state["k"], state["s"]], dtype=torch.long)
        state["k"], state["s"] = state["k"] + 1, 0
        return torch.as_tensor(noise.init[state["k"]], dtype=torch.long)

    def renoise_canvas(self, *args):
        state["renoise"] = True
        try:
            return orig_renoise(self, *args)
        finally:
            state["renoise"], state["s"] = False, state["s"] + 1

    def multinomial(probs, num_samples):
        g = torch.as_tensor(noise.gumbel[state["k"], state["s"]]).reshape(probs.shape)
        return torch.argmax(torch.log(probs) + g, dim=-1, keepdim=True)

    def denoising_step(**kw):
        stopper = kw["diffusion_stopping_criteria"]
        rec = dict(k=state["k"], s=state["s"], canvas=num(kw["current_canvas"]),
                   argmax=num(kw["argmax_canvas"]), sc=num(kw["self_conditioning_logits"]),
                   finished=num(kw["finished_denoising"]),
                   history=None if stopper is None else num(stopper.argmax_canvas_history))
        canvas, argmax, sc, finished = orig_step(**kw)
        rec.update(out_canvas=num(canvas), out_argmax=num(argmax), out_sc=num(sc),
                   out_finished=num(finished), accepted=num(kw["sampler"].accepted_token_mask),
                   margins=_margins(sc, noise.gumbel[rec["k"], rec["s"]], gen))
        records.append(rec)
        return canvas, argmax, sc, finished

    monkeypatch.setattr(hf_gen.EntropyBoundSampler, "initialize_canvas", initialize_canvas)
    monkeypatch.setattr(hf_gen.EntropyBoundSampler, "renoise_canvas", renoise_canvas)
    monkeypatch.setattr(torch, "multinomial", multinomial)
    monkeypatch.setattr(model, "_denoising_step", denoising_step)
    config = DiffusionGemmaGenerationConfig(
        max_new_tokens=gen.max_new_tokens, max_denoising_steps=gen.max_denoising_steps,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=gen.entropy_bound),
        t_min=gen.t_min, t_max=gen.t_max, stability_threshold=gen.stability_threshold,
        confidence_threshold=gen.confidence_threshold, eos_token_id=EOS, pad_token_id=0)
    out = model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(valid),
                         generation_config=config)
    return out, records


def _check_margins(records: list[dict], seed: int) -> None:
    worst = {key: min(r["margins"][key] for r in records) for key in records[0]["margins"]}
    print("decision margins:", worst)
    assert all(worst[key] > MARGIN[key] for key in worst), (
        f"noise seed {seed}: a transformers decision is within float32 noise of flipping "
        f"({worst}); choose another seed")


def _run(model, cfg, gen, seed, monkeypatch):
    ids, valid = _prompt(cfg.vocab_size)
    noise = _noise(gen, len(PADS), cfg.vocab_size, seed)
    ref, records = _transformers_generate(model, ids, valid, gen, noise, monkeypatch)
    _check_margins(records, seed)
    return ids, valid, noise, ref, records


@functools.lru_cache(maxsize=None)
def _jitted_step(cfg, gen):
    return jax.jit(lambda params, cache, st, g, r, done: denoise_step(
        params, cfg, gen, cache, st, g, r, done, attn_impl="xla"))


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_steps_match_transformers(peaky, setting, monkeypatch):
    model, cfg, params = peaky
    gen, seed = SETTINGS[setting]
    ids, valid, noise, ref, records = _run(model, cfg, gen, seed, monkeypatch)
    step = _jitted_step(cfg, gen)
    b, n = len(PADS), gen.max_denoising_steps
    seq = ref.sequences.numpy()
    caches = {}
    for rec in records:
        k, s = rec["k"], rec["s"]
        if k not in caches:   # the prompt and transformers' previous canvases, encoded by us
            tokens = seq[:, :T + k * CANVAS]
            ok = np.concatenate([valid, np.ones((b, k * CANVAS), bool)], axis=1)
            caches[k] = DG.encode(params, cfg, jnp.asarray(tokens), jnp.asarray(ok),
                                  attn_impl="xla")[1]
        hist = rec["history"]
        if hist is None:
            hist = np.full((max(gen.stability_threshold or 0, 1), b, CANVAS), -1)
        sc = rec["sc"] if rec["sc"] is not None else np.zeros((b, CANVAS, cfg.vocab_size))
        st = StepState(jnp.int32(s), jnp.asarray(rec["canvas"], jnp.int32),
                       jnp.asarray(rec["argmax"], jnp.int32), jnp.asarray(sc, jnp.float32),
                       jnp.asarray(rec["finished"]), jnp.asarray(hist, jnp.int32),
                       jnp.zeros((b,), jnp.int32), jnp.zeros((n, b, CANVAS), bool))
        out = step(params, caches[k], st, jnp.asarray(noise.gumbel[k, s]),
                   jnp.asarray(noise.renoise[k, s]), jnp.zeros((b,), bool))
        where = f"canvas {k} step {s}"
        np.testing.assert_array_equal(np.asarray(out.accepted[s]), rec["accepted"], where)
        np.testing.assert_array_equal(np.asarray(out.canvas), rec["out_canvas"], where)
        np.testing.assert_array_equal(np.asarray(out.argmax), rec["out_argmax"], where)
        np.testing.assert_array_equal(np.asarray(out.finished), rec["out_finished"], where)
        np.testing.assert_allclose(np.asarray(out.sc_logits), rec["out_sc"], atol=2e-3,
                                   rtol=0, err_msg=where)
    assert len(records) > 2 * 2 and len({r["k"] for r in records}) == 2


def test_generate_matches_transformers(peaky, monkeypatch):
    model, cfg, params = peaky
    gen, seed = SETTINGS["confident"]
    ids, valid, noise, ref, records = _run(model, cfg, gen, seed, monkeypatch)
    ours = generate(params, cfg, jnp.asarray(ids), jnp.asarray(valid), gen,
                    noise=jax.tree.map(jnp.asarray, noise), attn_impl="xla")
    np.testing.assert_array_equal(np.asarray(ours.tokens), ref.sequences[:, T:].numpy())
    ran = [sum(r["k"] == k for r in records) for k in range(gen.num_canvases(CANVAS))]
    assert [int(np.asarray(ours.accepted)[k].any(axis=(1, 2)).sum()) for k in range(2)] == ran
    real = (ref.sequences[:, T:] != 0).sum(-1).numpy()
    np.testing.assert_array_equal(np.asarray(ours.nfe),
                                  np.round(real / ref.tokens_per_forward.numpy()).astype(int))
    np.testing.assert_allclose(np.asarray(ours.tokens_per_forward),
                               ref.tokens_per_forward.numpy(), rtol=1e-6)
    st = np.asarray(ours.steps)                       # what the setting is there to exercise
    assert len(set(st[0].tolist())) > 1 and st[0].max() < gen.max_denoising_steps
    assert (np.asarray(ours.tokens) == 0).any()       # an EOS padded a row
    print("steps per canvas and row:", st.tolist(), "nfe:", np.asarray(ours.nfe).tolist())


# ----------------------------------------------------------------------------- the pieces
def _accept_reference(ent: np.ndarray, bound: float) -> np.ndarray:
    """Take positions in increasing entropy while the taken ones' sum minus their maximum
    stays <= bound (ties in the order numpy's stable sort gives)."""
    out = np.zeros(ent.shape, bool)
    for r, row in enumerate(ent):
        total, largest = 0.0, -np.inf
        for i in np.argsort(row, kind="stable"):
            total, largest = total + row[i], max(largest, row[i])
            if total - largest > bound:
                break
            out[r, i] = True
    return out


@pytest.mark.parametrize("bound", [1e-3, 0.1, 1.0, 5.0, 1e3])
def test_entropy_bound_acceptance(bound):
    rng = np.random.default_rng(0)
    ent = rng.exponential(0.5, size=(6, 32)).astype(np.float32)
    ent[0, :8] = 0.25                                       # ties
    ent[1] = 0.0                                             # a certain row: all accepted
    got = np.asarray(entropy_bound_accept(jnp.asarray(ent), bound))
    np.testing.assert_array_equal(got, _accept_reference(ent, bound))
    assert got.any(axis=1).all() and got[1].all()


class _StopReference:
    """transformers' stable-and-confident rule written as a list of past argmax canvases."""

    def __init__(self, stability: int, confidence: float):
        self.stability, self.confidence, self.past = stability, confidence, []

    def __call__(self, argmax: np.ndarray, ent: np.ndarray) -> np.ndarray:
        recent = self.past[-self.stability:] if self.stability else []
        stable = np.array([len(recent) == self.stability
                           and all((p[r] == argmax[r]).all() for p in recent)
                           for r in range(argmax.shape[0])])
        self.past.append(argmax.copy())
        return stable & (ent.mean(-1) < self.confidence)


@pytest.mark.parametrize("stability", [0, 1, 2, 3])
def test_adaptive_stop(stability):
    rng = np.random.default_rng(stability)
    b, c = 4, 5
    seq = [rng.integers(0, 3, size=(b, c)) for _ in range(3)]
    seq += [seq[-1]] * 4                                    # settles: stable after `stability`
    seq += [rng.integers(0, 3, size=(b, c))]
    ref = _StopReference(stability, confidence=0.5)
    hist = jnp.full((max(stability, 1), b, c), -1, jnp.int32)
    fired = []
    for t, argmax in enumerate(seq):
        ent = rng.uniform(0, 1.0, size=(b, c)).astype(np.float32)
        ent[t % b] = 0.1                                    # one confident row per step
        stop, hist = adaptive_stop(hist, jnp.asarray(argmax, jnp.int32), jnp.asarray(ent),
                                   stability, 0.5)
        want = ref(argmax, ent)
        np.testing.assert_array_equal(np.asarray(stop), want, err_msg=f"step {t}")
        fired.append(bool(want.any()))
    assert any(fired) and (stability == 0 or not all(fired))


def test_canvas_config_refusals():
    for bad in (dict(entropy_bound=0.0), dict(t_min=0.9, t_max=0.8), dict(max_denoising_steps=0),
                dict(stability_threshold=-1), dict(confidence_threshold=0.0)):
        with pytest.raises(ConfigError):
            CanvasConfig(**bad)
    with pytest.raises(ValueError, match="exactly one"):
        generate({}, None, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool), CanvasConfig())


def test_decode_generate_refuses_diffusion_gemma_with_a_sentence() -> None:
    from controllers import make_controller
    from dllm_jax.config import GenerateConfig, ModelConfig
    from dllm_jax.decode import GenerateError, generate as masked_generate

    cfg = ModelConfig.tiny("diffusion_gemma")
    with pytest.raises(GenerateError, match="decode_canvas"):
        masked_generate(None, cfg, np.array([[3, 4]]), GenerateConfig(gen_length=8, block_length=8, steps=8),
                        make_controller("threshold"))


# ----------------------------------------------------------------------------- front door
def test_session_and_cli_decode_diffusion_gemma_with_entropy_bound(peaky_build, capsys):
    """`session.generate_ids` / `dllm-jax generate` run the canvas sampler with the
    entropy_bound controller's options, and refuse what does not apply to a canvas."""
    import json

    from controllers import make_controller
    from dllm_jax import cli, session
    from dllm_jax.canvas_decode import canvas_config
    from dllm_jax.config import GenerateConfig

    _, cfg, params, folder = peaky_build
    s = session.load(folder)
    ids, valid = _prompt(cfg.vocab_size)
    ctrl = make_controller("entropy_bound", entropy_bound=0.5, stability_threshold=1,
                           confidence_threshold=2.0, canvas_t_min=0.3, canvas_t_max=0.9)
    gen = GenerateConfig(gen_length=2 * CANVAS, block_length=CANVAS, steps=12)
    canvas = canvas_config(s.cfg, gen, ctrl)
    assert canvas == CanvasConfig(max_new_tokens=2 * CANVAS, max_denoising_steps=6,
                                  entropy_bound=0.5, stability_threshold=1,
                                  confidence_threshold=2.0, t_min=0.3, t_max=0.9)
    key = jax.random.key(3)
    out = s.generate_ids(ids, valid, gen, ctrl, key=key)
    want = generate(params, cfg, jnp.asarray(ids), jnp.asarray(valid), canvas, key=key)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(want.tokens)[:, :gen.gen_length])
    np.testing.assert_array_equal(np.asarray(out.stats.nfe), np.asarray(want.nfe))
    assert int(out.stats.steps) == int(np.asarray(want.steps).max(axis=1).sum())
    fix = np.asarray(out.stats.fix_step)
    assert fix.shape == (3, gen.gen_length) and (np.diff(fix, axis=1) >= 0).all()

    prompt = ",".join(str(int(t)) for t in ids[0])
    # one canvas, the answer cut to 5 of its 8 tokens
    base = ["generate", "--model", str(folder), "--prompt-ids", prompt, "--gen-length",
            str(CANVAS - 3), "--controller", "entropy_bound", "--steps", "5", "--seed", "3"]
    capsys.readouterr()
    assert cli.main(base + ["--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    one = s.generate([ids[0].tolist()], GenerateConfig(gen_length=CANVAS - 3,
                                                       block_length=CANVAS - 3, steps=5),
                     make_controller("entropy_bound"), key=jax.random.key(3))[0]
    assert rec["tokens"] == one.tokens and rec["nfe"] == one.nfe >= 1
    assert len(one.tokens) <= CANVAS - 3
    for extra, needle in ((["--controller", "threshold"], "entropy_bound"),
                          (["--cache", "dual"], "--cache"),
                          (["--temperature", "0.5"], "--temperature")):
        args = base + extra if extra[0] != "--controller" else base[:-6] + extra
        assert cli.main(args) == 2, extra
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_entropy_bound_canvas_options_are_refused_on_masked_models(capsys):
    from dllm_jax import cli

    rc = cli.main(["generate", "sort: 9 4 7 1", "--controller", "entropy_bound",
                   "--canvas-t-min", "0.2"])
    err = capsys.readouterr().err
    assert rc == 2 and "--canvas-t-min" in err and "DiffusionGemma" in err
