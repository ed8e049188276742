"""Sharding: mesh specs, the rules table, and (in one subprocess with 8 simulated CPU devices)
ring attention == full attention, params / cache shardings as the rules say, and decodes on
meshes (8,1,1), (2,2,2), (1,1,8), (1,4,2) of (data, model, seq) token-identical to one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest
from jax.sharding import PartitionSpec as P

from dllm_jax import sharding as S
from dllm_jax.config import ModelConfig
from dllm_jax.models import init_params, param_shapes

ROOT = Path(__file__).resolve().parents[1]


def fake_mesh(**sizes: int) -> SimpleNamespace:
    return SimpleNamespace(shape={a: sizes.get(a, 1) for a in ("data", "seq", "model")})


# ----------------------------------------------------------------------------- in-process
def test_parse_mesh_spec() -> None:
    assert S.parse_mesh_spec("data=2,model=2,seq=2", 8) == {"data": 2, "model": 2, "seq": 2}
    assert S.parse_mesh_spec("model=4", 8) == {"data": 1, "model": 4, "seq": 1}
    assert S.parse_mesh_spec("data=-1,seq=2", 8) == {"data": 4, "model": 1, "seq": 2}
    assert S.parse_mesh_spec(None, 8) == {"data": 8, "model": 1, "seq": 1}
    assert S.parse_mesh_spec({"seq": 8}, 8) == {"data": 1, "model": 1, "seq": 8}
    for bad, words in [("data=2,foo=2", "unknown mesh axis"), ("data", "no '='"),
                       ("data=x", "NAME=INT"), ("data=16", "needs 16 devices"),
                       ("data=-1,seq=-1", "only one"), ("data=3,seq=-1", "cannot be split"),
                       ("data=2,data=2", "twice"), ("data=0", "positive")]:
        with pytest.raises(S.ShardingError, match=words):
            S.parse_mesh_spec(bad, 8)


def test_make_mesh_axis_types_are_auto() -> None:
    mesh = S.make_mesh("data=1")
    assert tuple(mesh.axis_names) == ("data", "seq", "model")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_logical_to_spec_rules_and_divisibility() -> None:
    mesh = fake_mesh(data=2, model=4, seq=2)
    assert S.logical_to_spec(S.CACHE_AXES, (2, 8, 32, 8, 16), mesh) == \
        P(None, "data", "seq", "model")
    # 2 kv heads do not split over model=4: replicated; odd batch: replicated.
    assert S.logical_to_spec(S.CACHE_AXES, (2, 3, 32, 2, 16), mesh) == P(None, None, "seq")
    # size-1 mesh axes are never named.
    assert S.logical_to_spec(("batch", "length"), (8, 32), fake_mesh(seq=8)) == P(None, "seq")
    # the same mesh axis is used at most once per array
    assert S.logical_to_spec(("heads", "mlp"), (8, 8), mesh) == P("model")
    assert S.logical_to_spec(("embed", "vocab")) == P(None, "model")
    with pytest.raises(S.ShardingError, match="no rule"):
        S.logical_to_spec(("nonsense",))


@pytest.mark.parametrize("arch", ["llada", "dream", "sdar"])
def test_every_param_has_logical_axes(arch: str) -> None:
    cfg = ModelConfig.tiny(arch, tie_embeddings=(arch == "dream"))
    axes = S.param_axes(cfg)
    shapes = param_shapes(cfg)
    flat_axes = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat_axes) == len(jax.tree_util.tree_leaves(shapes))
    for ax, sd in zip(flat_axes, jax.tree_util.tree_leaves(shapes)):
        assert len(ax) == len(sd.shape)
    assert axes["layers"]["q_proj"] == ("layers", "embed", "heads")
    assert axes["layers"]["down_proj"] == ("layers", "mlp", "embed")


def test_per_layer_params_and_missing_rule() -> None:
    cfg = ModelConfig.tiny("llada")
    stacked = init_params(cfg, jax.random.key(0))
    # the per-layer layout (layers as a list of dicts, as models.unstack_layers makes it)
    params = dict(stacked, layers=[{k: v[i] for k, v in stacked["layers"].items()}
                                   for i in range(cfg.num_layers)])
    axes = S.param_axes(params)
    assert axes["layers"][1]["o_proj"] == ("heads", "embed")
    shardings = S.param_shardings(params, S.make_mesh("data=1"))
    assert shardings["layers"][0]["q_proj"].spec == P()
    with pytest.raises(S.ShardingError, match="no logical axes"):
        S.param_axes({"embed": params["embed"], "extra_weight": params["final_norm"]})


def test_single_device_generate_with_mesh_of_one() -> None:
    """A 1-device mesh goes through the sharded path and gives the same tokens."""
    import numpy as np

    from controllers import make_controller
    from dllm_jax.config import GenerateConfig
    from dllm_jax.decode import generate

    cfg = ModelConfig.tiny("llada", vocab_size=64, mask_token_id=63)
    params = init_params(cfg, jax.random.key(0), std=0.6)
    gen = GenerateConfig(gen_length=8, block_length=4, steps=4, cache="dual")
    prompt = np.array([[5, 6, 7], [0, 8, 9]], np.int32)
    valid = prompt > 0
    ctrl = make_controller("threshold", threshold=0.5)
    ref = generate(params, cfg, prompt, gen, ctrl, prompt_valid=valid)
    out = generate(params, cfg, prompt, gen, ctrl, prompt_valid=valid, mesh=S.make_mesh())
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))


def test_ring_impl_without_mesh_is_a_clear_error() -> None:
    import jax.numpy as jnp

    from dllm_jax.attention import dot_product_attention

    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="needs a device mesh"):
        dot_product_attention(q, q, q, jnp.ones((1, 4, 4), bool), "ring")


# ----------------------------------------------------------------------------- 8 devices
@pytest.fixture(scope="module")
def summary() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_check.py")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eight_devices_and_auto_axes(summary: dict) -> None:
    assert summary["devices"] == 8
    assert summary["mesh_axes"]["1,4,2"] == {"data": 1, "seq": 2, "model": 4}
    for types in summary["axis_types"].values():
        assert all("Auto" in t for t in types)


def test_ring_attention_equals_full_attention(summary: dict) -> None:
    att = summary["attention"]
    assert set(att) == {"2,2,2", "1,1,8", "1,4,2"}
    for mesh, checks in att.items():
        for mask in ("bidirectional", "block_causal"):
            for kind in ("ring", "gather", "reduce", "ring_q_chunked", "cached_step_reduce"):
                err = checks[f"{mask}/{kind}"]
                assert err <= 1e-5, f"{mesh} {mask} {kind}: {err}"


# Expected specs written out by hand from the rules (not computed by sharding.py): the tiny
# test models have D=32, H=4, hd=8, F=64, V=64, Hkv=4 (llada) / 2 (dream, 16 columns).
TP = {
    "embed": ["model"], "final_norm": [],
    "layers/attn_norm": [], "layers/mlp_norm": [],
    "layers/q_proj": [None, None, "model"], "layers/k_proj": [None, None, "model"],
    "layers/v_proj": [None, None, "model"], "layers/o_proj": [None, "model"],
    "layers/gate_proj": [None, None, "model"], "layers/up_proj": [None, None, "model"],
    "layers/down_proj": [None, "model"], "lm_head": [None, "model"],
}
DREAM_EXTRA = {"layers/q_bias": [None, "model"], "layers/k_bias": [None, "model"],
               "layers/v_bias": [None, "model"]}


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_param_shardings_follow_the_rules(summary: dict, arch: str) -> None:
    want_tp = dict(TP, **(DREAM_EXTRA if arch == "dream" else {}))
    for mesh, specs in summary["params"][arch].items():
        assert set(specs) == set(want_tp), mesh
        for path, spec in specs.items():
            # data / seq meshes replicate every weight; model>1 splits heads, mlp, vocab.
            want = want_tp[path] if mesh in ("2,2,2", "1,4,2") else []
            assert spec == want, (arch, mesh, path, spec)


def test_cache_sharding_follows_the_rules(summary: dict) -> None:
    want = {"8,1,1": [None, "data"], "2,2,2": [None, "data", "seq", "model"],
            "1,1,8": [None, None, "seq"], "1,4,2": [None, None, "seq", "model"]}
    for mesh, got in summary["cache"].items():
        assert got["shape"] == [2, 8, 24, 4, 8]
        assert got["prefill_k"] == want[mesh] and got["prefill_v"] == want[mesh], (mesh, got)


def test_sharded_decode_equals_single_device(summary: dict) -> None:
    rows = summary["decode"]
    assert {r["mesh"] for r in rows} == {"8,1,1", "2,2,2", "1,1,8", "1,4,2"}
    assert {r["cache"] for r in rows} == {"none", "prefix", "dual"}
    for name in ("low_confidence", "threshold", "factor", "maskgit_plus"):
        assert {r["cache"] for r in rows if r["controller"] == name} == {"none", "prefix", "dual"}
    assert {"random", "entropy", "simsd"} <= {r["controller"] for r in rows}
    for r in rows:
        assert r["no_mask_left"], r
        assert r["equal"] and r["nfe_equal"] and r["steps_equal"], r
    # int8: q split like its weight (columns over model for q_proj, rows for o_proj), the
    # scale like the weight's output axis; decodes equal one device's
    int8 = summary["int8"]["params"]["1,4,2"]
    assert int8["layers/q_proj/q"] == [None, None, "model"], int8
    assert int8["layers/q_proj/scale"] == [None, "model"], int8
    assert int8["layers/o_proj/q"] == [None, "model"], int8
    assert int8["layers/o_proj/scale"] == [], int8
    assert [r["equal"] for r in summary["int8"]["decode"]] == [True, True, True]
