"""Mesh shardings from the logical axes each parameter declares (see :mod:`tx.models.layers`).

Mesh axes: "fsdp" (parameters and the batch are split over it) and "tp" (tensor parallel: attention
heads and the MLP's intermediate dimension). Logical axes map onto them by :data:`RULES`; a dimension
that the mesh axis does not divide is replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

RULES = {"fsdp": "fsdp", "tp": "tp", "vocab": "tp", "layers": None, "lora": None, None: None}


def partition_spec(mesh, axes, shape) -> PartitionSpec:
    if axes is None:
        return PartitionSpec()
    spec = []
    used = set()
    for name, dim in zip(axes, shape):
        mesh_axis = RULES.get(name)
        if mesh_axis is None or mesh_axis not in mesh.shape or mesh_axis in used or dim % mesh.shape[mesh_axis]:
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def sharding_for(mesh, axes, shape) -> NamedSharding | None:
    if mesh is None:
        return None
    return NamedSharding(mesh, partition_spec(mesh, axes, shape))


def make_mesh(spec: str | dict[str, int]) -> jax.sharding.Mesh:
    """``"fsdp=4,tp=2"`` -> a Mesh over the available devices with those axis sizes."""
    from tx.errors import ConfigError

    if isinstance(spec, str):
        sizes = {}
        for part in filter(None, spec.split(",")):
            name, _, size = part.partition("=")
            if name.strip() not in ("fsdp", "tp") or not size.strip().isdigit() or int(size) < 1:
                raise ConfigError(f"bad mesh {spec!r}: expected axes like 'fsdp=4,tp=2' (axes fsdp and tp)")
            sizes[name.strip()] = int(size)
    else:
        sizes = dict(spec)
    sizes = {"fsdp": sizes.get("fsdp", 1), "tp": sizes.get("tp", 1)}
    n = sizes["fsdp"] * sizes["tp"]
    if n != jax.device_count():
        raise ConfigError(
            f"mesh {sizes} needs {n} devices but JAX sees {jax.device_count()}; make fsdp x tp equal the device count"
        )
    auto = (jax.sharding.AxisType.Auto,) * 2  # GSPMD propagates shardings through the step (no explicit types)
    return jax.make_mesh((sizes["fsdp"], sizes["tp"]), ("fsdp", "tp"), axis_types=auto)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """Batches are split over "fsdp" on their row axis: [B, S] -> axis 0, [accum, B, S] -> axis 1."""
    spec = [None] * ndim
    spec[0 if ndim == 2 else 1] = "fsdp"
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_state(mesh, state):
    """Place every variable of an nnx State by its ``axes`` metadata (replicated when it has none)."""
    from flax import nnx

    for _, var in nnx.to_flat_state(state):
        value = var[...]
        var.set_value(jax.device_put(value, sharding_for(mesh, var.get_metadata().get("axes"), value.shape)))
    return state


def placed_like(value, like) -> jax.Array:
    """``value`` with the sharding of ``like`` when that is on a mesh; else uncommitted, free to join any mesh.

    (A copy committed to the single device ``like`` happens to live on would be refused next to mesh arrays.)
    """
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return jax.device_put(value, sharding)
    return jax.numpy.asarray(value)
