"""DiffusionGemma (text) against transformers' own `DiffusionGemmaForBlockDiffusion`, float32.

The reference is transformers' model itself (`transformers.models.diffusion_gemma`, 5.25)
on its eager kernels (and once on its default sdpa / grouped_mm ones), a tiny random model
saved in the Hugging Face layout and converted by the CLI (`tests/diffusion_gemma_models.py`:
both layer types with a sliding window shorter than the prompt, MoE on every layer, a small
soft-cap, every weight and buffer randomised).

Compared, max abs diff <= 1e-4, on a left-padded batch (rows with 0, 3 and 7 pad tokens) and
on an unpadded one (transformers then takes its no-mask path): the encoder's last hidden
state (real positions), the denoiser's logits without and with self-conditioning logits, and
after a second encoder pass over the first canvas (the cache extended), the denoiser's
logits on the next canvas. Routing: the expert ids of every decoder layer equal
transformers' exactly, weights within 1e-6. Both MoE implementations ("ragged", "dense").
"""

from __future__ import annotations

import copy
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers.models.diffusion_gemma")
from transformers import DynamicCache  # noqa: E402

from dllm_jax.checkpoint import CheckpointError  # noqa: E402
from dllm_jax.config import ConfigError, ModelConfig  # noqa: E402
from dllm_jax.models import diffusion_gemma as DG  # noqa: E402
from dllm_jax.models.moe import route  # noqa: E402


# the references' seeds hold for the 2-core machines' torch thread count (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("torch_threads_2")


try:  # tests/ as a package or as pytest's rootdir-inserted path
    from tests.diffusion_gemma_models import CANVAS, TEXT, build_and_convert
except ImportError:
    from diffusion_gemma_models import CANVAS, TEXT, build_and_convert

ATOL = 1e-4
T, C = 12, CANVAS
PADS = (0, 3, 7)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """(torch model, our config, our params, converter stderr, folder)."""
    tmp = tmp_path_factory.mktemp("dg")
    return (*build_and_convert(tmp), tmp)


def _inputs(pads: tuple[int, ...], seed: int):
    rng = np.random.default_rng(seed)
    b, v = len(pads), TEXT["vocab_size"]
    ids = rng.integers(3, v, size=(b, T))
    valid = np.ones((b, T), bool)
    for r, p in enumerate(pads):
        ids[r, :p] = 0
        valid[r, :p] = False
    canvases = rng.integers(0, v, size=(2, b, C))
    sc = (3.0 * rng.standard_normal((b, C, v))).astype(np.float32)
    return ids, valid, canvases, sc


def _torch_run(model, ids, valid, canvases, sc):
    """transformers: encoder hidden, denoiser logits (no sc, sc), second-canvas logits, and the
    routing (weights, ids) of the decoder layers in the second-canvas call."""
    t = torch.as_tensor
    mask = t(valid)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    with torch.no_grad():
        h = model.model.encoder(input_ids=t(ids), attention_mask=mask, cache=cache).last_hidden_state
        dmask = torch.nn.functional.pad(mask, (0, C), value=True)
        l0 = model(decoder_input_ids=t(canvases[0]), cache=cache, decoder_attention_mask=dmask).logits
        l1 = model(decoder_input_ids=t(canvases[0]), cache=cache, self_conditioning_logits=t(sc),
                   decoder_attention_mask=dmask).logits
        model.model.encoder(input_ids=t(canvases[0]), attention_mask=dmask, cache=cache,
                            position_ids=torch.arange(T, T + C)[None])
        routes = []
        hooks = [layer.router.register_forward_hook(
            lambda mod, args, out: routes.append((args[0].numpy(), out[1].numpy(), out[2].numpy())))
            for layer in model.model.decoder.layers]
        try:
            l2 = model(decoder_input_ids=t(canvases[1]), cache=cache,
                       self_conditioning_logits=l1,
                       decoder_attention_mask=torch.nn.functional.pad(dmask, (0, C), value=True)).logits
        finally:
            for hk in hooks:
                hk.remove()
    return h.numpy(), l0.numpy(), l1.numpy(), l2.numpy(), routes


@functools.lru_cache(maxsize=None)
def _jitted(moe_impl: str):
    enc = jax.jit(functools.partial(DG.encode, attn_impl="xla", moe_impl=moe_impl),
                  static_argnums=1)
    den = jax.jit(functools.partial(DG.denoise, attn_impl="xla", moe_impl=moe_impl),
                  static_argnums=1)
    return enc, den


def _ours(cfg, params, ids, valid, canvases, sc, l1_ref, moe_impl):
    enc, den = _jitted(moe_impl)
    h, cache = enc(params, cfg, jnp.asarray(ids), jnp.asarray(valid))
    l0 = den(params, cfg, jnp.asarray(canvases[0]), cache)
    l1 = den(params, cfg, jnp.asarray(canvases[0]), cache, jnp.asarray(sc))
    _, cache = enc(params, cfg, jnp.asarray(canvases[0]), cache=cache)
    l2 = den(params, cfg, jnp.asarray(canvases[1]), cache, jnp.asarray(l1_ref))
    return [np.asarray(a) for a in (h, l0, l1, l2)]


def _check(model, cfg, params, pads, moe_impl) -> dict[str, float]:
    ids, valid, canvases, sc = _inputs(pads, seed=7)
    h_ref, l0_ref, l1_ref, l2_ref, _ = _torch_run(model, ids, valid, canvases, sc)
    h, l0, l1, l2 = _ours(cfg, params, ids, valid, canvases, sc, l1_ref, moe_impl)
    err = {"encoder": float(np.abs(h - h_ref)[valid].max()),
           "denoiser": float(np.abs(l0 - l0_ref).max()),
           "denoiser_sc": float(np.abs(l1 - l1_ref).max()),
           "second_canvas": float(np.abs(l2 - l2_ref).max())}
    print(f"max abs diff ({moe_impl}, pads {pads}): {err}")
    assert max(err.values()) <= ATOL, err
    assert float(np.abs(l0_ref).max()) > 1.0  # the soft-cap (5) is exercised, not ~linear
    return err


@pytest.mark.parametrize("moe_impl", ["ragged", "dense"])
@pytest.mark.parametrize("pads", [PADS, (0, 0, 0)], ids=["left_padded", "unpadded"])
def test_logits_match_transformers(converted, moe_impl, pads):
    model, cfg, params, _, _ = converted
    _check(model, cfg, params, pads, moe_impl)


def test_logits_match_transformers_default_kernels(converted):
    """The same model on transformers' default kernels (sdpa attention, grouped_mm experts)."""
    model, cfg, params, _, _ = converted
    model = copy.deepcopy(model)
    model.set_attn_implementation("sdpa")
    model.set_experts_implementation("grouped_mm")
    _check(model, cfg, params, PADS, "ragged")


def test_float32_error_is_transformers_float32_noise(converted):
    """Against transformers in float64 (unpadded: its padded rows are NaN in float64), our
    float32 error is at most twice transformers' own float32 error: what the 1e-4 bound
    absorbs is float32 rounding, not a systematic difference."""
    model, cfg, params, _, _ = converted
    ids, valid, canvases, sc = _inputs((0, 0, 0), seed=7)
    ref32 = _torch_run(model, ids, valid, canvases, sc)[:4]
    ref64 = _torch_run(copy.deepcopy(model).double(), ids, valid, canvases,
                       sc.astype(np.float64))[:4]
    ours = _ours(cfg, params, ids, valid, canvases, sc, ref64[2].astype(np.float32), "ragged")
    err_ours = max(float(np.abs(a - b).max()) for a, b in zip(ours, ref64))
    err_torch = max(float(np.abs(a - b).max()) for a, b in zip(ref32, ref64))
    print(f"max abs diff to float64: ours {err_ours:.2e}, transformers float32 {err_torch:.2e}")
    assert err_ours <= 2 * err_torch, (err_ours, err_torch)


def test_routing_matches_transformers(converted):
    """Expert ids of every decoder layer identical to transformers', weights within 1e-6."""
    model, cfg, params, _, _ = converted
    ids, valid, canvases, sc = _inputs(PADS, seed=11)
    *_, routes = _torch_run(model, ids, valid, canvases, sc)
    assert len(routes) == cfg.num_layers
    for i, (x, w_ref, idx_ref) in enumerate(routes):
        lp = {k: a[i] for k, a in params["layers"].items()}
        w, idx = route(lp, jnp.asarray(x), cfg.top_k_experts, cfg.rms_norm_eps)
        np.testing.assert_array_equal(np.asarray(idx), idx_ref, err_msg=f"layer {i}")
        np.testing.assert_allclose(np.asarray(w), w_ref, atol=1e-6, err_msg=f"layer {i}")


# ----------------------------------------------------------------------------- config, converter
def test_config_read_from_config_json(converted):
    _, cfg, _, stderr, tmp = converted
    hf = json.loads((tmp / "hf" / "config.json").read_text())
    assert ModelConfig.from_hf_config(hf) == cfg
    assert cfg.layer_types == ("sliding", "sliding", "full", "sliding", "full")
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.global_head_dim, cfg.global_num_kv_heads) == (8, 2, 16, 1)
    assert (cfg.sliding_window, cfg.canvas_length, cfg.logit_softcap) == (5, C, 5.0)
    assert (cfg.global_rope_theta, cfg.global_rope_fraction, cfg.rope_theta) == (1e6, 0.25, 1e4)
    # without the saved per_layer_config, transformers resolves global_head_dim / kv heads
    text = dict(hf["text_config"])
    text.pop("per_layer_config")
    text.update(global_head_dim=16, num_global_key_value_heads=1)
    assert ModelConfig.from_hf_config(dict(hf, text_config=text)) == cfg
    assert "skipped" in stderr and "vision tower" in stderr


@pytest.mark.parametrize("change, words", [
    ({"use_bidirectional_attention": "all"}, "bidirectional"),
    ({"hidden_activation": "silu"}, "GELU"),
    ({"num_experts": None}, "MoE"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6}}}, "RoPE"),
    ({"per_layer_config": {"2": {"head_dim": 16}, "4": {"head_dim": 32}}}, "one shape per type"),
])
def test_config_refusals(converted, change, words):
    _, _, _, _, tmp = converted
    hf = json.loads((tmp / "hf" / "config.json").read_text())
    hf["text_config"].update(change)
    with pytest.raises(ConfigError, match=words):
        ModelConfig.from_hf_config(hf)


def test_converter_reports_a_missing_tensor(converted, tmp_path):
    from safetensors.numpy import load_file, save_file
    from checkpoints_convert import convert

    _, _, _, _, tmp = converted
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text((tmp / "hf" / "config.json").read_text())
    tensors = load_file(str(tmp / "hf" / "model.safetensors"))
    del tensors["model.decoder.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match="layers.2.self_attn.k_proj"):
        convert(src, tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out").exists()


def test_bfloat16_no_noisier_than_transformers_bfloat16(converted, tmp_path):
    """A bfloat16 conversion runs through every cast of the forward, and its logits are no
    further from float32 (mean abs) than transformers' own bfloat16 model's (on this tiny
    model both move a lot: a bfloat16 router picks other experts for some tokens)."""
    from checkpoints_convert import convert
    from dllm_jax.checkpoint import load_model

    model, cfg, params32, _, tmp = converted
    convert(tmp / "hf", tmp_path / "bf16", dtype="bfloat16")
    cfg16, params16 = load_model(tmp_path / "bf16")
    assert cfg16 == cfg and params16["embed"].dtype == jnp.bfloat16
    ids, valid, canvases, sc = _inputs(PADS, seed=3)
    enc, den = _jitted("ragged")
    ours = []
    for p in (params32, params16):
        _, cache = enc(p, cfg, jnp.asarray(ids), jnp.asarray(valid))
        ours.append(np.asarray(den(p, cfg, jnp.asarray(canvases[0]), cache, jnp.asarray(sc))))
    ref = []
    for m in (model, copy.deepcopy(model).to(torch.bfloat16)):
        cache = DynamicCache(config=m.config.get_text_config(decoder=True))
        with torch.no_grad():
            m.model.encoder(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(valid),
                            cache=cache)
            ref.append(m(decoder_input_ids=torch.as_tensor(canvases[0]), cache=cache,
                         self_conditioning_logits=torch.as_tensor(sc).to(m.dtype),
                         decoder_attention_mask=torch.nn.functional.pad(
                             torch.as_tensor(valid), (0, C), value=True)).logits.float().numpy())
    ours_err, ref_err = np.abs(ours[1] - ours[0]).mean(), np.abs(ref[1] - ref[0]).mean()
    print(f"mean |bf16 - f32| logits: ours {ours_err:.3f}, transformers {ref_err:.3f}")
    assert ours[1].dtype == np.float32 and np.isfinite(ours[1]).all()
    assert ours_err <= 1.5 * ref_err, (ours_err, ref_err)


def test_sharded_over_eight_devices_gives_the_same_logits_and_routing() -> None:
    """tests/diffusion_gemma_sharding_check.py in a subprocess (8 simulated CPU devices):
    meshes data=2,model=4 / data=4,model=2 / model=8, experts split over `model`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(root), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(root / "tests" / "diffusion_gemma_sharding_check.py")],
                          capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and set(out["meshes"]) == {"data=2,model=4", "data=4,model=2",
                                                          "model=8"}
    for spec, row in out["meshes"].items():
        assert row["encoder"] <= 1e-4 and row["denoiser"] <= 1e-4, (spec, row)
        assert row["routing_equal"], spec
        assert row["expert_specs"] == ["P(None, 'model')"], (spec, row)  # experts split
