"""Device meshes: three named axes, built from a spec string such as ``data=2,model=2,seq=2``:

  data    data parallelism: the batch is split; every device of a data group sees its rows only.
  seq     sequence (context) parallelism: the token axis of activations and of the KV cache is
          split; attention runs as ring attention across the axis.
  model   tensor parallelism: attention heads and the MLP hidden width are split (Megatron
          style: q/k/v/gate/up are column-parallel, o/down are row-parallel, so one all-reduce
          per attention and per MLP); the vocabulary of the embedding and LM head too.

Devices are laid out in the order (data, seq, model): `model`, which communicates in every
layer, gets the nearest devices, then `seq` (one ppermute per ring step), then `data` (no
communication inside a decode).

Axis types are chosen on purpose: every axis is `AxisType.Auto`. The model is plain `jnp`
code without per-op sharding annotations; shardings are declared at the boundaries (params,
the prompt, the loop carry) and inside attention (`jax.shard_map`, manual over all axes), and
the compiler propagates them through the rest. With `Explicit` axes (the default of
`jax.make_mesh` on recent JAX) sharding becomes part of every array's type and ops such as an
embedding lookup on sharded ids or a matmul that contracts a sharded axis need an explicit
output sharding at each call site, which is what "declared in one table, never per call
site" rules out.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, ...] = ("data", "model", "seq")   # names accepted in a spec string
DEVICE_ORDER: tuple[str, ...] = ("data", "seq", "model")  # mesh axis order (model innermost)


class ShardingError(ValueError):
    """A mesh spec or sharding request that cannot be served; the message says how to fix it."""


# ----------------------------------------------------------------------------- mesh
def parse_mesh_spec(spec: str | Mapping[str, int] | None, num_devices: int | None = None
                    ) -> dict[str, int]:
    """``"data=2,model=2,seq=2"`` -> ``{"data": 2, "model": 2, "seq": 2}``.

    Missing axes are 1. One axis may be ``-1`` (or omitted entirely when the spec is empty):
    it takes the devices left over. ``None`` / ``""`` means all devices on `data`.
    """
    n_dev = len(jax.devices()) if num_devices is None else num_devices
    sizes: dict[str, int] = {}
    if isinstance(spec, Mapping):
        items = [(str(k), int(v)) for k, v in spec.items()]
    else:
        items = []
        for part in (spec or "").replace(" ", "").split(","):
            if not part:
                continue
            name, eq, value = part.partition("=")
            if not eq:
                raise ShardingError(f"mesh spec part {part!r} has no '='; write e.g. data=2.")
            try:
                items.append((name, int(value)))
            except ValueError:
                raise ShardingError(f"mesh spec part {part!r} is not NAME=INT; write e.g. "
                                    f"--mesh data=2,model=2,seq=2.") from None
    for name, value in items:
        if name not in MESH_AXES:
            raise ShardingError(f"unknown mesh axis {name!r}; the axes are "
                                f"{', '.join(MESH_AXES)} (e.g. data=2,model=2,seq=2).")
        if name in sizes:
            raise ShardingError(f"mesh axis {name!r} is given twice.")
        if value == 0 or value < -1:
            raise ShardingError(f"mesh axis {name}={value} must be a positive size or -1.")
        sizes[name] = value
    if not sizes:
        sizes = {"data": -1}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ShardingError("only one mesh axis may be -1.")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n_dev % fixed:
            raise ShardingError(f"{n_dev} devices cannot be split as {spec!r}: the fixed axes use "
                                f"{fixed}, which does not divide {n_dev}.")
        sizes[free[0]] = n_dev // fixed
    out = {name: int(sizes.get(name, 1)) for name in MESH_AXES}
    total = math.prod(out.values())
    if total > n_dev:
        raise ShardingError(f"mesh {format_mesh_spec(out)} needs {total} devices but only "
                            f"{n_dev} are visible.")
    return out


def format_mesh_spec(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={sizes.get(k, 1)}" for k in MESH_AXES)


def make_mesh(spec: str | Mapping[str, int] | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` with axes ("data", "seq", "model"), all `AxisType.Auto` (see the module doc).

    Args:
      spec: ``"data=2,model=2,seq=2"`` (see `parse_mesh_spec`), a dict, or None (all on data).
      devices: devices to use (default `jax.devices()`); a mesh smaller than the list takes
        the first ones. Multi-host batch inference passes `jax.local_devices()`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in DEVICE_ORDER)
    n = math.prod(shape)
    types = (AxisType.Auto,) * len(DEVICE_ORDER)
    if n == len(devices) and devices == list(jax.devices()):
        return jax.make_mesh(shape, DEVICE_ORDER, axis_types=types)
    try:
        return jax.make_mesh(shape, DEVICE_ORDER, axis_types=types, devices=devices[:n])
    except Exception:  # noqa: BLE001 - topology-unaware fallback for odd device subsets
        return Mesh(np.asarray(devices[:n], dtype=object).reshape(shape), DEVICE_ORDER,
                    axis_types=types)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return {a: int(mesh.shape.get(a, 1)) for a in MESH_AXES}
