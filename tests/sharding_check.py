"""Mesh checks on 8 simulated CPU devices, run by tests/test_sharding.py in a subprocess.

`python tests/sharding_check.py [--full]` sets XLA_FLAGS for 8 host devices BEFORE jax is
imported (the pytest process keeps its single device), runs every check, and prints one JSON
summary on the last line of stdout:

  attention  {mesh: {check: max |seq-parallel - full|}}  ring / gather / reduce / two-set
             kernels against the single-device kernel, bidirectional and block-causal masks
             with left padding and a token count that seq does not divide
  params     {arch: {mesh: {path: spec}}}  the sharding each parameter got from shard_params
  cache      {mesh: {"prefill": spec}}  the KV cache sharding the compiler gave a prefill
             traced under the mesh (nothing constrains it but the params/tokens and
             attention's shard_map)
  decode     [{mesh, arch, controller, cache, equal, nfe_equal, steps_equal}]  generate(mesh=)
             against the single-device generate, float32, greedy
  int8       {"params": {mesh: {path: spec}}, "decode": [...]}  int8 weights (q and scale
             sharded by their weight's rule) decoded on meshes against one device, through
             generate and through session.load(quantize="int8", mesh=) of the bundled model

Default decode matrix (kept cheap: each decode is one compile): every (mesh, cache mode)
pair runs once, with the controller rotating over low_confidence / threshold / factor /
maskgit_plus (Dream-architecture model) so that each of them meets every cache mode; random,
entropy, ce and r2 run once each.
`--full` runs every controller x cache mode x mesh (slow: ~100 compiles).
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
    # The checks compare programs compiled under the same flags; a low backend optimisation
    # level only saves compile time on the shared CPU.
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from controllers import CONTROLLER_NAMES, applicable_options, make_controller  # noqa: E402
from dllm_jax import models as M  # noqa: E402
from dllm_jax import sharding as S  # noqa: E402
from dllm_jax.attention import attention_mask, dot_product_attention, xla_attention  # noqa: E402
from dllm_jax.attention.ring import seq_parallel_attention  # noqa: E402
from dllm_jax.config import GenerateConfig, ModelConfig  # noqa: E402
from dllm_jax.decode import generate  # noqa: E402

MESHES = {"8,1,1": "data=8,model=1,seq=1", "2,2,2": "data=2,model=2,seq=2",
          "1,1,8": "data=1,model=1,seq=8", "1,4,2": "data=1,model=4,seq=2"}
CACHES = ("none", "prefix", "dual")
ROTATION = ("low_confidence", "threshold", "factor", "maskgit_plus")
# One more run each for the other controllers (random draws its scores from the PRNG: the
# sharded decode must draw the same ones); SimSD's verification forwards on a data/model/seq
# mesh with the dual cache and sequence-parallel without one.
EXTRA = (("1,1,8", "random", "none"), ("8,1,1", "entropy", "prefix"),
         ("2,2,2", "ce", "prefix"), ("1,4,2", "r2", "dual"), ("2,2,2", "simsd", "dual"),
         ("1,1,8", "simsd", "none"))


def tiny(arch: str) -> ModelConfig:
    return ModelConfig.tiny(arch, vocab_size=64, mask_token_id=63, hidden_size=32, num_layers=2,
                            num_heads=4, num_kv_heads=4 if arch == "llada" else 2, head_dim=8,
                            intermediate_size=64, **({"block_size": 4} if arch == "sdar" else {}))


def _spec(sharding: jax.sharding.Sharding) -> list:
    return [list(a) if isinstance(a, tuple) else a for a in sharding.spec]


def check_attention(mesh: jax.sharding.Mesh) -> dict[str, float]:
    rng = np.random.default_rng(0)
    b, t, h, hkv, d, r = 4, 20, 4, 2, 8, 6          # 20 tokens: seq=8 needs padding
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, hkv, d)), jnp.float32)
    valid = jnp.asarray(np.arange(t)[None] >= np.array([[0], [3], [7], [1]]))
    pos = M.default_positions(valid)

    def run(q, k, v, valid, pos):
        out = {}
        for name, bs in (("bidirectional", 0), ("block_causal", 4)):
            mask = attention_mask(pos, pos, valid, bs)
            ref = xla_attention(q, k, v, mask)
            for strategy in ("ring", "gather", "reduce"):
                got = seq_parallel_attention(q, k, v, mask, mesh, strategy)
                out[f"{name}/{strategy}"] = jnp.max(jnp.abs(got - ref))
            got = seq_parallel_attention(q, k, v, mask, mesh, "ring", q_chunk=1)
            out[f"{name}/ring_q_chunked"] = jnp.max(jnp.abs(got - ref))
            # cached-step form: a short query region against cache ++ region keys
            m1 = attention_mask(pos[:, -r:], pos, valid, bs)
            m2 = attention_mask(pos[:, -r:], pos[:, -r:], valid[:, -r:], bs)
            ref2 = xla_attention(q[:, -r:], jnp.concatenate([k, k[:, -r:]], 1),
                                  jnp.concatenate([v, v[:, -r:]], 1), jnp.concatenate([m1, m2], 2))
            got2 = dot_product_attention(q[:, -r:], jnp.concatenate([k, k[:, -r:]], 1),
                                         jnp.concatenate([v, v[:, -r:]], 1),
                                         jnp.concatenate([m1, m2], 2), "xla", mesh)
            out[f"{name}/cached_step_reduce"] = jnp.max(jnp.abs(got2 - ref2))
        return out

    res = jax.jit(run)(q, k, v, valid, pos)
    return {key: float(val) for key, val in res.items()}


def check_params(mesh: jax.sharding.Mesh, params: dict) -> dict[str, list]:
    placed = S.shard_params(params, mesh)
    flat = jax.tree_util.tree_flatten_with_path(placed)[0]
    return {"/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path):
            _spec(leaf.sharding) for path, leaf in flat}


def check_int8(meshes: dict, cfg: ModelConfig, params: dict, prompt: np.ndarray,
               valid: np.ndarray) -> dict:
    """int8 params on meshes: their shardings, and decodes equal to one device's."""
    from dllm_jax import quant, session

    q8 = quant.quantize_params(params)
    gen = GenerateConfig(gen_length=16, block_length=8, steps=8, cache="dual")
    ctrl = make_controller("low_confidence")
    ref = generate(q8, cfg, prompt, gen, ctrl, prompt_valid=valid)
    rows = []
    for mkey in ("2,2,2", "1,4,2"):
        out = generate(q8, cfg, prompt, gen, ctrl, prompt_valid=valid, mesh=meshes[mkey])
        rows.append({"mesh": mkey, "via": "generate",
                     "equal": bool(np.array_equal(np.asarray(out.tokens), np.asarray(ref.tokens)))})
    one = session.load(quantize="int8")
    on_mesh = session.load(quantize="int8", mesh=meshes["2,2,2"])
    ids = np.asarray([[5, 6, 7, 8, 9, 10, 11, 12]] * 8, np.int32)
    gen32 = GenerateConfig(gen_length=32, block_length=32, steps=32)
    a = generate(one.params, one.cfg, ids, gen32, ctrl)
    b = generate(on_mesh.params, on_mesh.cfg, ids, gen32, ctrl, mesh=meshes["2,2,2"])
    rows.append({"mesh": "2,2,2", "via": "session.load",
                 "equal": bool(np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens)))})
    return {"params": {k: check_params(meshes[k], q8) for k in ("1,4,2",)}, "decode": rows}


def check_cache(mesh: jax.sharding.Mesh, cfg: ModelConfig, params: dict) -> dict[str, list]:
    tokens = np.random.default_rng(1).integers(2, 60, size=(8, 24)).astype(np.int32)
    p = S.shard_params(params, mesh)
    t = jax.device_put(tokens, S.logical_sharding(mesh, S.ACTIVATION_AXES["tokens"], tokens.shape))

    def prefill(p, t):
        pos = jnp.broadcast_to(jnp.arange(t.shape[1], dtype=jnp.int32), t.shape)
        return M.apply_refresh(p, cfg, t, pos, jnp.ones(t.shape, bool), pos[:, :8],
                               attn_impl="xla", mesh=mesh)[1]

    cache = jax.jit(prefill)(p, t)
    return {"prefill_k": _spec(cache.k.sharding), "prefill_v": _spec(cache.v.sharding),
            "shape": list(cache.k.shape)}


def decode_cases(full: bool) -> list[tuple[str, str, str]]:
    """(mesh key, controller, cache)."""
    keys = list(MESHES)
    if full:
        return [(m, c, ca) for m in keys for c in CONTROLLER_NAMES for ca in CACHES]
    return [(m, ROTATION[(i + j) % len(ROTATION)], ca)
            for i, m in enumerate(keys) for j, ca in enumerate(CACHES)] + [
        e for e in EXTRA if e[1] in CONTROLLER_NAMES]


def main() -> None:
    full = "--full" in sys.argv
    assert len(jax.devices()) == 8, jax.devices()
    meshes = {k: S.make_mesh(v) for k, v in MESHES.items()}
    cfgs = {a: tiny(a) for a in ("llada", "dream")}
    # std 0.6: peaked logits, so float rounding of sharded reductions cannot flip a choice.
    params = {a: M.init_params(c, jax.random.key(3), std=0.6) for a, c in cfgs.items()}
    summary: dict = {"devices": len(jax.devices()), "mesh_axes": {
        k: dict(m.shape) for k, m in meshes.items()},
        "axis_types": {k: [str(t) for t in m.axis_types] for k, m in meshes.items()}}

    summary["attention"] = {k: check_attention(m) for k, m in meshes.items() if k != "8,1,1"}
    summary["params"] = {a: {k: check_params(m, params[a]) for k, m in meshes.items()}
                         for a in cfgs}
    summary["cache"] = {k: check_cache(m, cfgs["llada"], params["llada"])
                        for k, m in meshes.items()}

    rng = np.random.default_rng(0)
    prompt = rng.integers(2, 60, size=(8, 8)).astype(np.int32)
    valid = np.arange(8)[None] >= rng.integers(0, 5, size=(8, 1))   # left padding
    refs: dict = {}
    decode = []
    for mkey, ctrl_name, cache in decode_cases(full):
        arch = "dream" if ctrl_name in ("maskgit_plus", "topk_margin", "entropy", "origin") \
            else "llada"
        cfg, prm = cfgs[arch], params[arch]
        gen = GenerateConfig(gen_length=16, block_length=8, steps=8, cache=cache)
        ctrl = make_controller(ctrl_name, **applicable_options(ctrl_name, threshold=0.5))
        rk = (arch, ctrl_name, cache)
        if rk not in refs:
            refs[rk] = generate(prm, cfg, prompt, gen, ctrl, prompt_valid=valid,
                                key=jax.random.key(5))
        ref = refs[rk]
        out = generate(prm, cfg, prompt, gen, ctrl, prompt_valid=valid, key=jax.random.key(5),
                       mesh=meshes[mkey])
        decode.append({
            "mesh": mkey, "arch": arch, "controller": ctrl_name, "cache": cache,
            "equal": bool(np.array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))),
            "nfe_equal": bool(np.array_equal(np.asarray(out.stats.nfe),
                                             np.asarray(ref.stats.nfe))),
            "steps_equal": int(out.stats.steps) == int(ref.stats.steps),
            "no_mask_left": bool((np.asarray(out.tokens) != cfg.mask_token_id).all()),
            "tokens_spec": _spec(out.tokens.sharding),
        })
    summary["decode"] = decode
    summary["int8"] = check_int8(meshes, cfgs["llada"], params["llada"], prompt, valid)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
