"""DiffusionGemma over 8 simulated CPU devices: encoder + denoiser logits and MoE routing on
meshes (experts over `model`, batch over `data`) equal one device's. (Whole canvas decodes
are not compared token for token: the sampler's Gumbel and entropy-bound decisions flip on
logit differences of 1e-5, which a different reduction order gives.)

Run by tests/test_diffusion_gemma.py in a subprocess (XLA_FLAGS must be set before jax is
imported); prints one JSON line of max abs differences and equalities."""

from __future__ import annotations

import json
import os

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dllm_jax import sharding as S  # noqa: E402
from dllm_jax.config import ModelConfig  # noqa: E402
from dllm_jax.mesh import make_mesh  # noqa: E402
from dllm_jax.models import diffusion_gemma as DG  # noqa: E402
from dllm_jax.models import init_params, moe  # noqa: E402

MESHES = ("data=2,model=4", "data=4,model=2", "model=8")


def main() -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = ModelConfig.tiny("diffusion_gemma", vocab_size=64, num_experts=8, top_k_experts=2)
    params = init_params(cfg, jax.random.key(0), std=0.5)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(2, cfg.vocab_size, (4, 10)), jnp.int32)
    valid = jnp.asarray(np.arange(10)[None, :] >= np.array([0, 2, 5, 0])[:, None])
    canvas = jnp.asarray(rng.integers(2, cfg.vocab_size, (4, cfg.canvas_length)), jnp.int32)

    def logits(p, mesh):
        enc, cache = DG.encode(p, cfg, tokens, valid, mesh=mesh, attn_impl="xla")
        return enc, DG.denoise(p, cfg, canvas, cache, mesh=mesh, attn_impl="xla")

    ref_enc, ref_den = jax.jit(lambda p: logits(p, None))(params)
    layer0 = jax.tree.map(lambda a: a[0], params["layers"]) if "layers" in params else None
    x = jnp.asarray(rng.standard_normal((40, cfg.hidden_size)), jnp.float32)
    out: dict = {"devices": jax.device_count(), "meshes": {}}
    for spec in MESHES:
        mesh = make_mesh(spec)
        placed = jax.device_put(params, S.param_shardings(cfg, mesh))
        expert_specs = sorted({str(a.sharding.spec) for path, a in
                               jax.tree_util.tree_leaves_with_path(placed)
                               if "experts" in jax.tree_util.keystr(path)})
        enc, den = jax.jit(lambda p: logits(p, mesh))(placed)
        row = {"encoder": float(jnp.max(jnp.abs(enc - ref_enc))),
               "denoiser": float(jnp.max(jnp.abs(den - ref_den))),
               "expert_specs": expert_specs}
        if layer0 is not None:
            lp = jax.tree.map(lambda a: a[0], placed["layers"])
            _, idx = jax.jit(lambda l: moe.route(l, x, cfg.top_k_experts, cfg.rms_norm_eps))(lp)
            _, ref_idx = moe.route(layer0, x, cfg.top_k_experts, cfg.rms_norm_eps)
            row["routing_equal"] = bool(np.array_equal(np.asarray(idx), np.asarray(ref_idx)))
        out["meshes"][spec] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
