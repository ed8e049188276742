"""int8 weight-only quantisation (dllm_jax/quant.py): the int8 matmul equals the float matmul
of the dequantised weights, every weight is within scale/2 of its float, layouts (scan
slicing, per-layer, fused) agree, a quantised folder round-trips, decoding a tiny random
LLaDA with int8 weights stays close to float, and the --quantize flags.

Tolerances (float32): the int8 matmul vs `x @ dequantize(w)`: 1e-5 relative (only the
order of the float32 sums and of the scale differ); int8 vs float logits of the tiny random
LLaDA (std 0.1 weights, D = 64, logits up to ~3 in magnitude, mean ~0.7): max abs diff < 0.1,
mean abs diff < 0.02 (measured 0.070 and 0.012).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controllers import make_controller
from dllm_jax import models, quant, session
from dllm_jax.checkpoint import CONFIG_FILE, load_model, load_quantization, save_model
from dllm_jax.cli import main
from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.decode import generate
from dllm_jax.models.layers import dense

try:
    from tests.hf_checkpoints import hf_config, random_state_dict, write_hf_checkpoint
except ImportError:  # tests/ not a package
    from hf_checkpoints import hf_config, random_state_dict, write_hf_checkpoint

CFG = ModelConfig.tiny("llada", vocab_size=64, mask_token_id=63)
PARAMS = models.init_params(CFG, jax.random.key(3), std=0.1)
QPARAMS = quant.quantize_params(PARAMS)
PROMPT = np.array([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]], np.int32)
GEN = GenerateConfig(gen_length=8, block_length=4, steps=4)


def _w(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_int8_matmul_equals_dequantized_reference() -> None:
    w = _w((2, 48, 40))
    w[1, :, 7] = 0.0                                   # an all-zero column: scale 1, q 0
    qw = quant.quantize(jnp.asarray(w))
    assert qw.q.dtype == jnp.int8 and qw.scale.dtype == jnp.float32
    assert qw.q.shape == (2, 48, 40) and qw.scale.shape == (2, 40)
    x = jnp.asarray(_w((3, 5, 48), 1))
    for layer in range(2):
        ref = jnp.einsum("...i,io->...o", x, qw[layer].dequantize(),
                         precision=jax.lax.Precision.HIGHEST)
        got = dense(x, qw[layer])
        assert got.dtype == x.dtype
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # bfloat16 activations: the result is bfloat16 and within bfloat16 rounding of float32
    xb = x.astype(jnp.bfloat16)
    got = dense(xb, qw[0])
    assert got.dtype == jnp.bfloat16
    ref = jnp.einsum("...i,io->...o", xb.astype(jnp.float32), qw[0].dequantize(),
                     precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=2e-2, atol=5e-2)


def test_quantization_error_within_half_a_step_per_channel() -> None:
    w = _w((2, 48, 40)) * np.linspace(0.01, 3.0, 40, dtype=np.float32)   # scales per column
    for qw in (quant.quantize(w), quant.quantize(jnp.asarray(w))):        # numpy and jax
        q, scale = np.asarray(qw.q), np.asarray(qw.scale)
        np.testing.assert_allclose(scale, np.abs(w).max(axis=-2) / 127, rtol=1e-6)
        assert np.abs(q).max(axis=-2).min() == 127          # every column uses the full range
        err = np.abs(w - np.asarray(qw.dequantize()))
        assert np.all(err <= scale[:, None, :] / 2 * (1 + 1e-5))
    np.testing.assert_array_equal(quant.quantize(w).q, np.asarray(quant.quantize(jnp.asarray(w)).q))


def test_quantize_params_picks_the_matrices() -> None:
    names = {p.rsplit("/", 1)[-1] for p in quant.quantized_paths(QPARAMS)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj", "lm_head"}
    for kept in ("embed", "final_norm"):
        assert QPARAMS[kept] is PARAMS[kept]
    assert QPARAMS["layers"]["attn_norm"] is PARAMS["layers"]["attn_norm"]
    skipped = quant.quantize_params(PARAMS, skip=("lm_head",))
    assert not quant.is_quantized(skipped["lm_head"])
    with pytest.raises(quant.QuantizationError, match="embed"):
        quant.quantize_params(PARAMS, skip=("embed",))
    deq = quant.dequantize_params(QPARAMS)
    assert not quant.quantized_paths(deq) and deq["lm_head"].dtype == jnp.float32


def test_layouts_and_logits_close_to_float() -> None:
    """The scan slices a stacked QuantizedWeight; per-layer and fused layouts give the same
    logits; int8 logits are within the stated tolerance of float's."""
    tokens = jnp.asarray(PROMPT)
    want = models.apply(PARAMS, CFG, tokens)
    got = models.apply(QPARAMS, CFG, tokens)
    diff = jnp.abs(got - want)
    assert float(jnp.max(diff)) < 0.1 and float(jnp.mean(diff)) < 0.02, (diff.max(), diff.mean())
    assert float(jnp.max(jnp.abs(want))) > 2.0                    # not a trivial comparison
    for fuse in (False, True):
        per_layer = models.unstack_layers(QPARAMS, fuse=fuse)
        if fuse:
            assert quant.is_quantized(per_layer["layers"][0]["qkv_proj"])
            assert per_layer["layers"][0]["gate_up_proj"].scale.shape == (2 * CFG.intermediate_size,)
        np.testing.assert_allclose(models.apply(per_layer, CFG, tokens), got, atol=1e-5)
        back = models.stack_layers(per_layer, CFG)
        jax.tree.map(np.testing.assert_array_equal, back, QPARAMS)


def test_generate_int8_stacked_and_per_layer() -> None:
    ctrl = make_controller("low_confidence")
    floats = generate(PARAMS, CFG, PROMPT, GEN, ctrl, prompt_valid=PROMPT > 0)
    stacked = generate(QPARAMS, CFG, PROMPT, GEN, ctrl, prompt_valid=PROMPT > 0)
    per_layer = generate(models.unstack_layers(QPARAMS, fuse=True), CFG, PROMPT, GEN, ctrl,
                         prompt_valid=PROMPT > 0)
    np.testing.assert_array_equal(np.asarray(per_layer.tokens), np.asarray(stacked.tokens))
    agree = np.mean(np.asarray(stacked.tokens) == np.asarray(floats.tokens))
    assert agree >= 0.75, agree                    # answers of the random model mostly agree


def test_save_load_round_trip(tmp_path: Path) -> None:
    host = jax.tree.map(np.asarray, QPARAMS)
    save_model(tmp_path / "m", CFG, host)
    meta = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert meta["quantization"] == "int8" and meta["version"] == 2
    assert meta["param_dtype"] == "float32"
    assert load_quantization(tmp_path / "m") == ("int8", quant.quantized_paths(QPARAMS))
    cfg, params = load_model(tmp_path / "m")
    assert cfg == CFG
    assert jax.tree.structure(params) == jax.tree.structure(QPARAMS)
    jax.tree.map(np.testing.assert_array_equal, params, QPARAMS)
    assert params["layers"]["q_proj"].q.dtype == jnp.int8
    _, bf = load_model(tmp_path / "m", dtype="bfloat16")     # float params only
    assert bf["embed"].dtype == jnp.bfloat16 and bf["lm_head"].scale.dtype == jnp.float32
    save_model(tmp_path / "f", CFG, jax.tree.map(np.asarray, PARAMS))     # float: version 1
    assert json.loads((tmp_path / "f" / CONFIG_FILE).read_text())["version"] == 1
    assert load_quantization(tmp_path / "f") == (None, [])


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("quant")
    hf = hf_config("llada", vocab_size=64, embedding_size=64, mask_token_id=63)
    src = write_hf_checkpoint(root / "hf", random_state_dict("llada", hf, seed=5), hf)
    base = ["convert", str(src), "--dtype", "float32", "--quiet"]
    assert main(base[:2] + [str(root / "float")] + base[2:]) == 0
    assert main(base[:2] + [str(root / "int8")] + base[2:] + ["--quantize", "int8"]) == 0
    return root / "float", root / "int8"


def test_convert_and_session_load(folders: tuple[Path, Path]) -> None:
    float_dir, int8_dir = folders
    assert load_quantization(int8_dir)[0] == "int8"
    from_folder = session.load(int8_dir)
    at_load = session.load(float_dir, quantize="int8")
    assert quant.is_quantized(from_folder.params["layers"]["q_proj"])
    jax.tree.map(np.testing.assert_array_equal, at_load.params, from_folder.params)
    with pytest.raises(quant.QuantizationError, match="--quantize"):
        session.load(float_dir, quantize="int4")


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_flags(folders: tuple[Path, Path], capsys: pytest.CaptureFixture,
                   tmp_path: Path) -> None:
    float_dir, int8_dir = folders
    run = ["generate", "--prompt-ids", "5,6,7", "--gen-length", "4", "--steps", "4", "--json"]
    rc, out_q, _ = _cli(capsys, *run, "--model", str(float_dir), "--quantize", "int8")
    assert rc == 0
    rc, out_f, _ = _cli(capsys, *run, "--model", str(int8_dir))
    assert rc == 0 and json.loads(out_q) == json.loads(out_f)
    # batch takes --quantize too (recorded in its settings): the same tokens as generate
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt_ids": [5, 6, 7]}\n')
    rc, _, err = _cli(capsys, "batch", "--model", str(float_dir), "--input",
                      str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                      "--gen-length", "4", "--steps", "4", "--quantize", "int8")
    assert rc == 0, err
    row = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert row["tokens"] == json.loads(out_q)["tokens"]
    settings = json.loads((tmp_path / "out.jsonl.settings.json").read_text())
    assert "int8" in json.dumps(settings)
    rc, out, err = _cli(capsys, *run, "--model", str(float_dir), "--quantize", "int4")
    assert rc == 2 and out == ""
    assert err.startswith("error: --quantize must be int8") and "e.g. --quantize int8" in err
    assert len(err.strip().splitlines()) == 1
    rc, _, err = _cli(capsys, "convert", str(float_dir), str(tmp_path / "x"), "--quantize",
                      "fp4", "--quiet")
    assert rc == 2 and "--quantize must be int8" in err and not (tmp_path / "x").exists()
