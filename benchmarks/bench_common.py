"""What the speed and memory benchmarks share: random weights drawn on the devices, and the
devices' memory high-water marks.

    from bench_common import peak_bytes, random_params     # (benchmarks/ is the script's dir)
    params = random_params(M.param_shapes(cfg, jnp.bfloat16))

Random rather than trained weights: speed and memory do not depend on the values, and an 8B
model drawn on the GPU costs seconds where a checkpoint would cost a 16 GB file.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def random_params(shapes: Any, seed: int = 0, shardings: Any = None, std: float = 0.02) -> Any:
    """Weights for a pytree of `jax.ShapeDtypeStruct`, each leaf made directly on the devices
    in its own dtype (no float32 or host copy), already laid out as `shardings` (a matching
    pytree of shardings; None: the default device).

    Leaves whose path names a norm are ones, biases zeros, every other leaf normal(0, std).
    Any params layout works (stacked, per-layer, fused: pass `jax.eval_shape` of the layout
    function over `models.param_shapes`).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    shard_leaves = ([None] * len(leaves) if shardings is None
                    else jax.tree_util.tree_leaves(shardings))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for ((path, sd), sh), k in zip(zip(leaves, shard_leaves), keys):
        name = jax.tree_util.keystr(path)
        shape, dtype = tuple(sd.shape), sd.dtype
        if "norm" in name:
            fn = lambda k, shape=shape, dtype=dtype: jnp.ones(shape, dtype)  # noqa: E731
        elif "bias" in name:
            fn = lambda k, shape=shape, dtype=dtype: jnp.zeros(shape, dtype)  # noqa: E731
        else:
            fn = lambda k, shape=shape, dtype=dtype: (  # noqa: E731
                jax.random.normal(k, shape, dtype) * jnp.asarray(std, dtype))
        out.append(jax.jit(fn, out_shardings=sh)(k))
    return jax.tree_util.tree_unflatten(treedef, out)


def memory_stats(device: Any = None) -> dict[str, int]:
    """`device.memory_stats()` (default: the first device), {} where the backend keeps none
    (the CPU)."""
    try:
        return (device or jax.devices()[0]).memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without allocator stats
        return {}


def peak_bytes(device: Any = None) -> int | None:
    """The device's peak bytes in use so far (it only grows), None where it is not kept."""
    return memory_stats(device).get("peak_bytes_in_use")


def memory_by_device() -> list[dict[str, Any]]:
    """One row per local device: its peak and its limit in GiB (None where not kept)."""
    rows = []
    for d in jax.local_devices():
        st = memory_stats(d)
        rows.append({"device": str(d),
                     "peak_gib": st["peak_bytes_in_use"] / 2**30 if st else None,
                     "limit_gib": st.get("bytes_limit", 0) / 2**30 if st else None})
    return rows


__all__ = ["memory_by_device", "memory_stats", "peak_bytes", "random_params"]
