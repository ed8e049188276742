"""Hugging Face checkpoint conversion and checkpoint I/O.

Tiny random HF-layout checkpoints (tests/hf_checkpoints.py) of LLaDA, Dream and SDAR in every
file format are converted and loaded back; each param must equal its source tensor transposed
and stacked as written out below (independently of the converter's tables). Every kind of bad
input must fail with one `error: ...` line naming the file, and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import checkpoints_convert.hf as hf
from checkpoints_convert import convert
from checkpoints_convert.convert import KEYMAPS
from checkpoints_convert.keymap import check_coverage
from dllm_jax import checkpoint as ckpt
from dllm_jax import cli
from dllm_jax.checkpoint import CheckpointError, load_model, save_model
from dllm_jax.config import ModelConfig
from dllm_jax.models import init_params, param_shapes

sys.path.insert(0, str(Path(__file__).parent))
from hf_checkpoints import hf_config, random_state_dict, write_hf_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- expectations
def expected_params(arch: str, sd: dict[str, np.ndarray], hfc: dict) -> dict:
    """Our params from HF tensors, written out by hand: Linear weights transposed, layers stacked."""
    f32 = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    if arch == "llada":
        L = hfc["n_layers"]
        b = "model.transformer.blocks.{}."
        names = {"attn_norm": ("attn_norm.weight", False), "mlp_norm": ("ff_norm.weight", False),
                 "q_proj": ("q_proj.weight", True), "k_proj": ("k_proj.weight", True),
                 "v_proj": ("v_proj.weight", True), "o_proj": ("attn_out.weight", True),
                 "gate_proj": ("ff_proj.weight", True), "up_proj": ("up_proj.weight", True),
                 "down_proj": ("ff_out.weight", True)}
        if hfc.get("include_qkv_bias"):
            names.update(q_bias=("q_proj.bias", False), k_bias=("k_proj.bias", False),
                         v_bias=("v_proj.bias", False))
        out = {"embed": f32["model.transformer.wte.weight"],
               "final_norm": f32["model.transformer.ln_f.weight"]}
        if not hfc.get("weight_tying"):
            out["lm_head"] = f32["model.transformer.ff_out.weight"].T
    else:
        L = hfc["num_hidden_layers"]
        b = "model.layers.{}."
        names = {"attn_norm": ("input_layernorm.weight", False),
                 "mlp_norm": ("post_attention_layernorm.weight", False),
                 "q_proj": ("self_attn.q_proj.weight", True), "k_proj": ("self_attn.k_proj.weight", True),
                 "v_proj": ("self_attn.v_proj.weight", True), "o_proj": ("self_attn.o_proj.weight", True),
                 "gate_proj": ("mlp.gate_proj.weight", True), "up_proj": ("mlp.up_proj.weight", True),
                 "down_proj": ("mlp.down_proj.weight", True)}
        if arch == "dream" or hfc.get("attention_bias"):
            names.update(q_bias=("self_attn.q_proj.bias", False), k_bias=("self_attn.k_proj.bias", False),
                         v_bias=("self_attn.v_proj.bias", False))
        if arch == "sdar":
            names.update(q_norm=("self_attn.q_norm.weight", False), k_norm=("self_attn.k_norm.weight", False))
        out = {"embed": f32["model.embed_tokens.weight"], "final_norm": f32["model.norm.weight"]}
        if not hfc.get("tie_word_embeddings"):
            out["lm_head"] = f32["lm_head.weight"].T
    out["layers"] = {
        ours: np.stack([f32[b.format(i) + hf_name].T if tr else f32[b.format(i) + hf_name]
                        for i in range(L)])
        for ours, (hf_name, tr) in names.items()
    }
    return out


def assert_params_equal(params: dict, want: dict, dtype=np.float32) -> None:
    got_flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    want_flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    assert sorted(got_flat) == sorted(want_flat)
    for k, w in want_flat.items():
        g = np.asarray(got_flat[k])
        assert g.dtype == np.dtype(dtype), k
        np.testing.assert_array_equal(g, w.astype(dtype), err_msg=k)


def make_hf(tmp_path: Path, arch: str = "llada", fmt: str = "safetensors", name: str = "hf",
            sd_dtype=np.float32, sd_edit=None, **overrides) -> tuple[Path, dict, dict]:
    hfc = hf_config(arch, **overrides)
    sd = random_state_dict(arch, hfc, seed=1, dtype=sd_dtype)
    if sd_edit:
        sd_edit(sd)
    src = write_hf_checkpoint(tmp_path / name, sd, hfc, fmt=fmt)
    return src, sd, hfc


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".dllm-" in p.name)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("arch,fmt", [
    ("llada", "safetensors"), ("llada", "sharded_bin"), ("dream", "sharded"),
    ("dream", "bin"), ("sdar", "safetensors"), ("sdar", "sharded"),
])
def test_convert_roundtrip_float32_exact(tmp_path, arch, fmt):
    src, sd, hfc = make_hf(tmp_path, arch, fmt)
    res = convert(src, tmp_path / "out", dtype="float32")
    assert res.config == ModelConfig.from_hf_config(hfc)
    cfg, params = load_model(tmp_path / "out")
    assert cfg == res.config
    assert_params_equal(params, expected_params(arch, sd, hfc))
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == hfc
    assert leftovers(tmp_path) == []


def test_cli_module_subprocess_bf16_from_bf16_source(tmp_path):
    """`python -m checkpoints_convert` in a subprocess; bf16 source, default bf16 output."""
    src, sd, hfc = make_hf(tmp_path, "llada", "sharded", sd_dtype=ml_dtypes.bfloat16)
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    (src / "spiece.model").write_bytes(b"\x00")
    r = subprocess.run([sys.executable, "-m", "checkpoints_convert", str(src), str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stderr and "WARNING" not in r.stderr
    cfg, params = load_model(tmp_path / "out")
    assert params["embed"].dtype == jnp.bfloat16
    assert_params_equal(params, expected_params("llada", sd, hfc), dtype=ml_dtypes.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json", "spiece.model", "config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    # restoring with a different dtype casts
    _, p32 = load_model(tmp_path / "out", dtype=jnp.float32)
    assert p32["layers"]["q_proj"].dtype == jnp.float32


def test_float32_source_to_bf16_rounds_like_astype(tmp_path):
    src, sd, hfc = make_hf(tmp_path, "dream", "safetensors")
    convert(src, tmp_path / "out")  # default dtype bfloat16
    _, params = load_model(tmp_path / "out")
    assert_params_equal(params, expected_params("dream", sd, hfc), dtype=ml_dtypes.bfloat16)


def test_float16_source(tmp_path):
    src, sd, hfc = make_hf(tmp_path, "sdar", "bin", sd_dtype=np.float16)
    convert(src, tmp_path / "out", dtype="float32")
    _, params = load_model(tmp_path / "out")
    assert_params_equal(params, expected_params("sdar", sd, hfc))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_small_row_blocks(tmp_path, monkeypatch, fmt):
    """Force many row blocks per tensor (transposed writes land in the right columns)."""
    monkeypatch.setattr(hf, "CHUNK_BYTES", 100)
    src, sd, hfc = make_hf(tmp_path, "llada", fmt)
    convert(src, tmp_path / "out", dtype="float32")
    _, params = load_model(tmp_path / "out")
    assert_params_equal(params, expected_params("llada", sd, hfc))


def test_flags_tied_embeddings_biases_and_ignored_buffers(tmp_path):
    # LLaDA with weight tying and q/k/v biases
    src, sd, hfc = make_hf(tmp_path, "llada", name="a", weight_tying=True, include_qkv_bias=True)
    convert(src, tmp_path / "a_out", dtype="float32")
    cfg, params = load_model(tmp_path / "a_out")
    assert cfg.tie_embeddings and cfg.qkv_bias and "lm_head" not in params
    assert_params_equal(params, expected_params("llada", sd, hfc))

    # Dream with tied embeddings whose file still holds lm_head.weight, and a saved inv_freq
    def edit(sd):
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].copy()
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)

    src, sd, hfc = make_hf(tmp_path, "dream", name="b", sd_edit=edit, tie_word_embeddings=True)
    convert(src, tmp_path / "b_out", dtype="float32")
    cfg, params = load_model(tmp_path / "b_out")
    assert cfg.tie_embeddings and "lm_head" not in params
    assert_params_equal(params, expected_params("dream", sd, hfc))


def test_key_maps_cover_every_param():
    for arch, flags in [("llada", {}), ("llada", dict(qkv_bias=True, tie_embeddings=True)),
                        ("dream", {}), ("dream", dict(tie_embeddings=True)),
                        ("sdar", {}), ("sdar", dict(qkv_bias=True))]:
        check_coverage(ModelConfig.tiny(arch, **flags), KEYMAPS[arch])


def test_save_load_model_jax_arrays_with_shardings(tmp_path):
    cfg = ModelConfig.tiny("sdar")
    params = init_params(cfg, jax.random.key(0), dtype=jnp.bfloat16)
    save_model(tmp_path / "m", cfg, params)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    cfg2, loaded = load_model(tmp_path / "m", shardings=sharding)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        assert b.sharding == sharding and b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # pytree of shardings
    tree = jax.tree.map(lambda _: sharding, param_shapes(cfg))
    _, loaded = load_model(tmp_path / "m", dtype="float32", shardings=tree)
    assert loaded["embed"].dtype == jnp.float32
    # wrong layout refused before anything is written
    bad = dict(params, embed=params["embed"][:3])
    with pytest.raises(CheckpointError, match="embed"):
        save_model(tmp_path / "bad", cfg, bad)
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- bad input
def test_missing_source_folder(tmp_path, capsys):
    rc, err = run_cli(["convert", str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert rc == 2 and err.startswith("error: ") and "nope does not exist" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_no_config_json(tmp_path, capsys):
    src, _, _ = make_hf(tmp_path)
    (src / "config.json").unlink()
    rc, err = run_cli(["convert", str(src), str(tmp_path / "out")], capsys)
    assert rc == 2 and "has no config.json" in err and str(src) in err


def test_unknown_model_type(tmp_path, capsys):
    src, _, _ = make_hf(tmp_path, model_type="llama")
    rc, err = run_cli(["convert", str(src), str(tmp_path / "out")], capsys)
    assert rc == 2 and "unknown model_type 'llama'" in err and str(src / "config.json") in err


def test_no_weight_files(tmp_path, capsys):
    src, _, _ = make_hf(tmp_path)
    (src / "model.safetensors").unlink()
    rc, err = run_cli(["convert", str(src), str(tmp_path / "out")], capsys)
    assert rc == 2 and "has no weights" in err


def test_missing_tensor(tmp_path, capsys):
    src, _, _ = make_hf(tmp_path, "dream", sd_edit=lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    rc, err = run_cli(["convert", str(src), str(tmp_path / "out")], capsys)
    assert rc == 2 and "model.layers.1.mlp.up_proj.weight" in err and "model.safetensors" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_shard_listed_in_index(tmp_path, capsys):
    src, _, _ = make_hf(tmp_path, "llada", "sharded")
    (src / "model-00002-of-00002.safetensors").unlink()
    rc, err = run_cli(["convert", str(src), str(tmp_path / "out")], capsys)
    assert rc == 2 and "model-00002-of-00002.safetensors" in err and "missing" in err


def test_wrong_shape(tmp_path, capsys):
    def edit(sd):
        sd["model.transformer.blocks.1.up_proj.weight"] = np.zeros((40, 32), np.float32)

    src, _, _ = make_hf(tmp_path, "llada", sd_edit=edit)
    rc, err = run_cli(["convert", str(src), str(tmp_path / "out")], capsys)
    assert rc == 2
    assert "model.transformer.blocks.1.up_proj.weight" in err and "model.safetensors" in err
    assert "[40, 32]" in err and "[48, 32]" in err


def test_unexpected_tensor_is_an_error(tmp_path, capsys):
    def edit(sd):
        sd["model.transformer.blocks.0.ff_proj.bias"] = np.zeros(48, np.float32)

    src, _, _ = make_hf(tmp_path, "llada", sd_edit=edit)
    rc, err = run_cli(["convert", str(src), str(tmp_path / "out")], capsys)
    assert rc == 2 and "model.transformer.blocks.0.ff_proj.bias" in err and "does not know" in err


def test_layer_beyond_config_is_unexpected(tmp_path):
    src, _, _ = make_hf(tmp_path, "sdar")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\."):
        convert(src, tmp_path / "out")


def test_truncated_safetensors(tmp_path, capsys):
    src, _, _ = make_hf(tmp_path, "llada", "sharded")
    shard = src / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * 0.7)])
    rc, err = run_cli(["convert", str(src), str(tmp_path / "out")], capsys)
    assert rc == 2 and str(shard) in err and "truncated" in err and "re-download" in err
    shard.write_bytes(data[:5])
    rc, err = run_cli(["convert", str(src), str(tmp_path / "out")], capsys)
    assert rc == 2 and str(shard) in err and "truncated" in err
    assert not (tmp_path / "out").exists()


def test_truncated_bin(tmp_path, capsys):
    src, _, _ = make_hf(tmp_path, "dream", "bin")
    path = src / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:1000])
    rc, err = run_cli(["convert", str(src), str(tmp_path / "out")], capsys)
    assert rc == 2 and str(path) in err and "re-download" in err and "Traceback" not in err


def test_bin_without_torch(tmp_path, capsys, monkeypatch):
    src, _, _ = make_hf(tmp_path, "dream", "bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    rc, err = run_cli(["convert", str(src), str(tmp_path / "out")], capsys)
    assert rc == 2 and "pip install dllm-jax[torch]" in err


def test_destination_exists_needs_overwrite(tmp_path, capsys):
    src, sd, hfc = make_hf(tmp_path, "llada")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    script = shutil.which("dllm-jax", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cmd = [script] if script else [sys.executable, "-m", "dllm_jax.cli"]  # not pip-installed
    r = subprocess.run(cmd + ["convert", str(src), str(out)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr
    # --overwrite refuses to delete a folder that is not a dllm-jax checkpoint
    rc, err = run_cli(["convert", str(src), str(out), "--overwrite"], capsys)
    assert rc == 2 and "not a dllm-jax checkpoint" in err and (out / "keep.txt").exists()
    # ... but fills an empty folder and replaces an earlier checkpoint
    (out / "keep.txt").unlink()
    assert run_cli(["convert", str(src), str(out), "--dtype", "float32", "--overwrite"], capsys)[0] == 0
    src2, sd2, _ = make_hf(tmp_path, "llada", name="hf2", sd_edit=lambda sd: sd.update(
        {"model.transformer.ln_f.weight": np.full(32, 3.0, np.float32)}))
    rc, err = run_cli(["convert", str(src2), str(out), "--overwrite", "--dtype", "float32"], capsys)
    assert rc == 0, err
    _, params = load_model(out)
    np.testing.assert_array_equal(np.asarray(params["final_norm"]), np.full(32, 3.0, np.float32))
    assert leftovers(tmp_path) == []


def test_destination_inside_source_refused(tmp_path, capsys):
    src, _, _ = make_hf(tmp_path)
    rc, err = run_cli(["convert", str(src), str(src / "jax")], capsys)
    assert rc == 2 and "overlaps the source" in err


def test_interrupt_while_reading_leaves_nothing(tmp_path, capsys, monkeypatch):
    src, _, _ = make_hf(tmp_path, "llada", "sharded")
    calls = {"n": 0}
    original = hf.SafetensorsFile.read_rows

    def flaky(self, name, start, stop):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, name, start, stop)

    monkeypatch.setattr(hf.SafetensorsFile, "read_rows", flaky)
    rc, err = run_cli(["convert", str(src), str(tmp_path / "out")], capsys)
    assert rc == 130 and "interrupted" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_interrupt_while_writing_keeps_old_checkpoint(tmp_path, capsys, monkeypatch):
    src, sd, hfc = make_hf(tmp_path, "dream")
    out = tmp_path / "out"
    convert(src, out, dtype="float32")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    real_write = ckpt._write_params

    def write_then_die(path, params):
        real_write(path, params)  # the temporary folder is complete ...
        raise KeyboardInterrupt  # ... but we die before the rename

    monkeypatch.setattr(ckpt, "_write_params", write_then_die)
    rc, err = run_cli(["convert", str(src), str(out), "--overwrite"], capsys)
    assert rc == 130
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert leftovers(tmp_path) == []
    rc, err = run_cli(["convert", str(src), str(tmp_path / "new")], capsys)
    assert rc == 130 and not (tmp_path / "new").exists() and leftovers(tmp_path) == []
    monkeypatch.undo()
    _, params = load_model(out)
    assert_params_equal(params, expected_params("dream", sd, hfc))


def test_killed_writer_temporaries_are_cleaned(tmp_path):
    """A SIGKILLed converter leaves a hidden temp folder; the next write to that DST removes it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.dllm-tmp-{dead.pid}-0123abcd"
    (stale / "params").mkdir(parents=True)
    live = tmp_path / f".out.dllm-tmp-{os.getppid()}-0123abcd"  # a live process: kept
    live.mkdir()
    src, _, _ = make_hf(tmp_path, "sdar")
    convert(src, tmp_path / "out")
    assert not stale.exists() and live.exists()
    assert load_model(tmp_path / "out")[0].arch == "sdar"


def test_load_model_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    src, _, _ = make_hf(tmp_path)
    with pytest.raises(CheckpointError, match="dllm-jax convert"):
        load_model(src)
    convert(src, tmp_path / "out")
    (tmp_path / "out" / "dllm_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path / "out")
