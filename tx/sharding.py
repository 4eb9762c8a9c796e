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
    return jax.make_mesh((sizes["fsdp"], sizes["tp"]), ("fsdp", "tp"))
