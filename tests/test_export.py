"""`export_hf` / `dllm-jax export`: a model folder back to its Hugging Face layout.

Round trips: export then convert gives the same params bit for bit (float32) and the same
ModelConfig, for LLaDA, Dream and SDAR tiny random models and the bundled model; a Hugging
Face checkpoint written independently (tests/hf_checkpoints.py), converted and exported again,
gives back its tensors exactly (names, shapes, values). Bad inputs fail with one `error:`
line and leave nothing behind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from checkpoints_convert import convert
from checkpoints_convert import export as ex
from checkpoints_convert.export import SELF_INVERSE, export_hf, hf_config_for
from checkpoints_convert.keymap import TRANSFORMS
from dllm_jax import cli, session
from dllm_jax.checkpoint import CheckpointError, load_model, save_model
from dllm_jax.config import ModelConfig
from dllm_jax.models import init_params

sys.path.insert(0, str(Path(__file__).parent))
from hf_checkpoints import hf_config, random_state_dict, write_hf_checkpoint  # noqa: E402


def flat(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_same_params(a, b) -> None:
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def read_hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the exported folder (single file or shards + index), read by the
    safetensors library."""
    out: dict[str, np.ndarray] = {}
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".dllm-" in p.name)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("arch,flags", [
    ("llada", {}), ("llada", dict(qkv_bias=True, tie_embeddings=True)),
    ("dream", {}), ("dream", dict(tie_embeddings=True)), ("sdar", {}),
])
def test_export_then_convert_is_bit_exact(tmp_path, arch, flags):
    cfg = ModelConfig.tiny(arch, **flags)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(3)))
    save_model(tmp_path / "m", cfg, params)
    out = export_hf(tmp_path / "m", tmp_path / "hf", dtype="float32")
    assert out == (tmp_path / "hf").absolute()
    config = json.loads((out / "config.json").read_text())
    assert ModelConfig.from_hf_config(config) == cfg and config["torch_dtype"] == "float32"
    res = convert(out, tmp_path / "back", dtype="float32")
    cfg2, back = load_model(tmp_path / "back")
    assert res.config == cfg2 == cfg
    assert_same_params(back, params)
    head = "model.transformer.ff_out.weight" if arch == "llada" else "lm_head.weight"
    assert (head in read_hf_tensors(out)) == (not flags.get("tie_embeddings"))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("arch,fmt,overrides", [
    ("llada", "sharded", {}), ("llada", "safetensors", dict(include_qkv_bias=True)),
    ("dream", "safetensors", {}), ("sdar", "sharded", {}),
])
def test_exported_tensors_equal_the_independent_hf_writer(tmp_path, arch, fmt, overrides):
    """HF checkpoint (tests/hf_checkpoints.py) -> convert -> export reproduces every tensor."""
    hfc = hf_config(arch, **overrides)
    sd = random_state_dict(arch, hfc, seed=2)
    src = write_hf_checkpoint(tmp_path / "src", sd, hfc, fmt=fmt,
                              extra_files={"tokenizer.json": "{}", "tokenizer_config.json":
                                           '{"chat_template": "{{ messages }}"}'})
    convert(src, tmp_path / "m", dtype="float32")
    export_hf(tmp_path / "m", tmp_path / "hf")        # dtype: as stored, float32
    got = read_hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(sd)
    for name, want in sd.items():
        assert got[name].dtype == np.float32 and got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    # the original config.json is kept (it still describes the model), torch_dtype updated
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == {**hfc,
                                                                          "torch_dtype": "float32"}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_text() == (src / name).read_text()
    # without the original config.json, one is written from the ModelConfig
    (tmp_path / "m" / "config.json").unlink()
    export_hf(tmp_path / "m", tmp_path / "hf2")
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert ModelConfig.from_hf_config(config) == ModelConfig.from_hf_config(hfc)
    assert read_hf_tensors(tmp_path / "hf2").keys() == sd.keys()


def test_bfloat16_round_trip_and_shards(tmp_path):
    hfc = hf_config("dream")
    sd = random_state_dict("dream", hfc, seed=4, dtype=ml_dtypes.bfloat16)
    src = write_hf_checkpoint(tmp_path / "src", sd, hfc)
    convert(src, tmp_path / "m")                        # bfloat16
    export_hf(tmp_path / "m", tmp_path / "hf", max_shard_bytes=4000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and set(index["weight_map"]) == set(sd)
    got = read_hf_tensors(tmp_path / "hf")
    for name, want in sd.items():
        assert got[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(got[name].view(np.uint16), want.view(np.uint16), name)
    # float32 -> bfloat16 on export rounds like astype
    cfg = ModelConfig.tiny("sdar")
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    save_model(tmp_path / "m32", cfg, params)
    export_hf(tmp_path / "m32", tmp_path / "hf16", dtype="bfloat16")
    got = read_hf_tensors(tmp_path / "hf16")
    np.testing.assert_array_equal(got["model.layers.1.mlp.down_proj.weight"],
                                  params["layers"]["down_proj"][1].T.astype(ml_dtypes.bfloat16))


def test_bundled_model_round_trip(tmp_path, capsys):
    bundled = session.resolve_model_dir(None)
    rc, err = run_cli(["export", str(bundled), str(tmp_path / "hf")], capsys)
    assert rc == 0 and "wrote" in err and err.count("\n") == 2, err
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (tmp_path / "hf" / name).is_file(), name
    assert run_cli(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--dtype",
                    "float32", "--quiet"], capsys) == (0, "")
    cfg, params = load_model(bundled)
    cfg2, back = load_model(tmp_path / "back")
    assert cfg2 == cfg
    assert_same_params(back, params)


def test_transforms_are_self_inverse():
    """The exporter undoes the converter's chain by applying each transform again."""
    assert SELF_INVERSE == set(TRANSFORMS), "a new transform needs its inverse in export.py"
    x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    full = (slice(None),) * 3
    for t in TRANSFORMS.values():
        idx, y = t.apply(full, x)
        assert t.shape(y.shape) == x.shape
        np.testing.assert_array_equal(t.apply(idx, y)[1], x)


# ----------------------------------------------------------------------------- bad input
def test_missing_model_folder(tmp_path, capsys):
    rc, err = run_cli(["export", str(tmp_path / "nope"), str(tmp_path / "hf")], capsys)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "nope does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []


def test_destination_exists(tmp_path, capsys):
    cfg = ModelConfig.tiny("llada")
    save_model(tmp_path / "m", cfg, init_params(cfg, jax.random.key(0)))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("user data")
    rc, err = run_cli(["export", str(tmp_path / "m"), str(tmp_path / "hf")], capsys)
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    rc, err = run_cli(["export", str(tmp_path / "m"), str(tmp_path / "hf"), "--overwrite"], capsys)
    assert rc == 2 and "not a Hugging Face model folder" in err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["keep.txt"]
    # an earlier export is replaced with --overwrite; overlapping folders are refused
    assert run_cli(["export", str(tmp_path / "m"), str(tmp_path / "hf2"), "--quiet"],
                   capsys) == (0, "")
    assert run_cli(["export", str(tmp_path / "m"), str(tmp_path / "hf2"), "--overwrite",
                    "--quiet"], capsys) == (0, "")
    rc, err = run_cli(["export", str(tmp_path / "m"), str(tmp_path / "m" / "hf")], capsys)
    assert rc == 2 and "overlaps" in err
    rc, err = run_cli(["export", str(tmp_path / "m"), str(tmp_path / "hf3"), "--dtype",
                       "float64"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--dtype" in err
    assert leftovers(tmp_path) == []


def test_interrupt_leaves_nothing(tmp_path, capsys, monkeypatch):
    cfg = ModelConfig.tiny("dream")
    save_model(tmp_path / "m", cfg, init_params(cfg, jax.random.key(0)))
    calls = {"n": 0}
    real = ex.to_hf_array

    def flaky(params, t):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(params, t)

    monkeypatch.setattr(ex, "to_hf_array", flaky)
    rc, err = run_cli(["export", str(tmp_path / "m"), str(tmp_path / "hf")], capsys)
    assert rc == 130 and "interrupted" in err
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []


def test_unexportable_models_are_refused(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="head_dim"):
        hf_config_for(ModelConfig.tiny("llada", head_dim=8))      # LLaDA: head_dim = D / H
    with pytest.raises(CheckpointError, match="block_causal"):
        hf_config_for(ModelConfig.tiny("llada", block_causal=True, block_size=4))
    gemma = ModelConfig.tiny("diffusion_gemma")
    with pytest.raises(CheckpointError, match="diffusion_gemma models .* not supported"):
        hf_config_for(gemma)
    (tmp_path / "g").mkdir()   # refused from dllm_config.json alone, before params are read
    (tmp_path / "g" / "dllm_config.json").write_text(json.dumps(
        {"format": "dllm-jax-checkpoint", "version": 1, "param_dtype": "float32",
         "model": gemma.to_dict()}))
    rc, err = run_cli(["export", str(tmp_path / "g"), str(tmp_path / "hf")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "not supported" in err
    assert not (tmp_path / "hf").exists()
