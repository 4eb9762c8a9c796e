"""Mesh shardings from the logical axes each parameter declares (see :mod:`tx.models.layers`).

tx knows three mesh axes, by role:

- ``"fsdp"``: parameters and the batch are split over it (fully sharded data parallel);
- ``"tp"``: tensor parallel: attention heads, the MLP's intermediate dimension, the vocabulary;
- ``"expert"``: the experts of a mixture-of-experts layer (``[*stack, E, out, in]``) are split over it, and so is
  the batch, next to fsdp. Without an expert axis the experts are split over fsdp.

Logical axes map onto them by :data:`RULES` (each logical axis takes the first of its mesh axes that the mesh
has, that no other dimension of the same parameter uses, and that divides the dimension; else it is replicated).

Any :class:`jax.sharding.Mesh` works, as ``jax.make_mesh`` makes it (axes of type Explicit, JAX's default) or with
Auto axes, and with other axis names: :func:`tx_mesh` turns it into the mesh tx computes on, over the same devices,
with the axes named by role and of type Auto (tx's step is partitioned by GSPMD from the parameters' shardings).
Axis names are matched to roles by ``mesh_axes`` (``{"fsdp": "data", "tp": "model"}``; a role may take several
axes, ``{"fsdp": ("replica", "data")}``), else by name: the role's own name or one of :data:`ALIASES`.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

ROLES = ("fsdp", "tp", "expert")
# mesh axis names taken for a role when mesh_axes does not name the role's axes
ALIASES = {
    "fsdp": ("fsdp", "data"),
    "tp": ("tp", "model", "tensor"),
    "expert": ("expert", "experts", "ep"),
}
# logical axis -> the mesh axes it may be split over, in order of preference
RULES = {
    "fsdp": ("fsdp",),
    "tp": ("tp",),
    "vocab": ("tp",),
    "expert": ("expert", "fsdp"),
    "layers": (),
    "lora": (),
    None: (),
}
BATCH_AXES = ("fsdp", "expert")  # a batch's rows are split over these (the expert axis when it divides the rows)


def _config_error(msg: str):
    from tx.errors import ConfigError

    return ConfigError(msg)


def _role_of_axes(mesh: Mesh, mesh_axes) -> dict[str, tuple[str, ...]]:
    """role -> the mesh's axis names that make it up, in the mesh's order; checks mesh_axes and every axis."""
    names = tuple(mesh.axis_names)
    given = {}
    for role, value in dict(mesh_axes or {}).items():
        if role not in ROLES:
            raise _config_error(
                f"mesh_axes key {role!r} is not a tx mesh role; the roles are {', '.join(map(repr, ROLES))} "
                "(e.g. mesh_axes={'fsdp': 'data', 'tp': 'model'})"
            )
        value = (value,) if isinstance(value, str) else tuple(value)
        for name in value:
            if name not in names:
                raise _config_error(
                    f"mesh_axes[{role!r}] names axis {name!r}, but the mesh's axes are {', '.join(map(repr, names))}"
                )
        given[role] = value
    roles = {}
    for role in ROLES:
        if role in given:
            roles[role] = given[role]
        else:
            roles[role] = tuple(n for n in names if n in ALIASES[role] and not any(n in v for v in given.values()))
    seen = {}
    for role, axes in roles.items():
        for name in axes:
            if name in seen:
                raise _config_error(
                    f"mesh axis {name!r} is taken by both {seen[name]!r} and {role!r}; give each axis one role in "
                    "mesh_axes"
                )
            seen[name] = role
    for name in names:
        if name not in seen and mesh.shape[name] > 1:
            raise _config_error(
                f"mesh axis {name!r} (size {mesh.shape[name]}) has no role in tx: tx splits work over 'fsdp' "
                "(parameters and batch), 'tp' (attention heads, MLP width, vocabulary) and 'expert' (MoE experts). "
                f"Name its role, e.g. tx.load_model(..., mesh=mesh, mesh_axes={{'fsdp': {name!r}}}) and "
                f"Trainer(..., mesh=mesh, mesh_axes=...), or make the axis size 1"
            )
    return {role: tuple(n for n in names if n in axes) for role, axes in roles.items()}


def tx_mesh(mesh, mesh_axes=None) -> Mesh | None:
    """The mesh tx computes on for a user's ``mesh``: its devices, axes named by role, every axis of type Auto.

    ``mesh_axes`` maps a role ("fsdp", "tp", "expert") to the mesh axis (or tuple of axes, merged in the mesh's
    order) that plays it; roles it leaves out take the axes named like them (:data:`ALIASES`). An axis of size > 1
    without a role is an error that names it. Roles the mesh lacks are left out; a tx mesh maps to itself.

    Example:
        >>> m = jax.make_mesh((1, 1), ("data", "model"))  # doctest: +SKIP
        >>> tx_mesh(m).axis_names  # doctest: +SKIP
        ('fsdp', 'tp')
    """
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise _config_error(
            f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((4, 2), ('fsdp', 'tp'))), got {type(mesh).__name__}"
        )
    roles = _role_of_axes(mesh, mesh_axes)
    present = [r for r in ROLES if roles[r]]
    order = [mesh.axis_names.index(n) for r in present for n in roles[r]]
    order += [i for i in range(len(mesh.axis_names)) if i not in order]  # axes of size 1 without a role
    devices = np.transpose(mesh.devices, order)
    sizes = [math.prod(mesh.shape[n] for n in roles[r]) for r in present]
    devices = devices.reshape(sizes or (1,))
    names = tuple(present) or ("fsdp",)
    return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def partition_spec(mesh, axes, shape) -> PartitionSpec:
    if axes is None:
        return PartitionSpec()
    spec = []
    used = set()
    for name, dim in zip(axes, shape):
        choice = None
        for mesh_axis in RULES.get(name, ()):
            size = mesh.shape.get(mesh_axis, 1)
            if size > 1 and mesh_axis not in used and dim % size == 0:
                choice = mesh_axis
                break
        spec.append(choice)
        if choice is not None:
            used.add(choice)
    return PartitionSpec(*spec)


def sharding_for(mesh, axes, shape) -> NamedSharding | None:
    if mesh is None:
        return None
    return NamedSharding(mesh, partition_spec(mesh, axes, shape))


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """``"fsdp=4,tp=2"`` -> ``{"fsdp": 4, "tp": 2}``; names are roles or their :data:`ALIASES`."""
    sizes = {}
    known = {alias: role for role, names in ALIASES.items() for alias in names}
    for part in filter(None, spec.split(",")):
        name, _, size = part.partition("=")
        name, size = name.strip(), size.strip()
        if name not in known or not size.isdigit() or int(size) < 1:
            raise _config_error(
                f"bad mesh {spec!r}: expected axes like 'fsdp=4,tp=2' (axes fsdp, tp and expert, each given once)"
            )
        if known[name] in sizes:
            raise _config_error(f"bad mesh {spec!r}: axis {known[name]!r} is given twice")
        sizes[known[name]] = int(size)
    return sizes


def make_mesh(spec: str | dict[str, int]) -> Mesh:
    """``"fsdp=4,tp=2"`` (or ``"fsdp=2,expert=4"``) -> a tx mesh over the available devices with those sizes."""
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
    for name in sizes:
        if name not in ROLES:
            raise _config_error(f"bad mesh {sizes}: axis {name!r} is not one of {', '.join(map(repr, ROLES))}")
    sizes = {
        "fsdp": sizes.get("fsdp", 1),
        "tp": sizes.get("tp", 1),
        **({"expert": sizes["expert"]} if "expert" in sizes else {}),
    }
    n = math.prod(sizes.values())
    if n != jax.device_count():
        product = " x ".join(sizes)
        raise _config_error(
            f"mesh {sizes} needs {n} devices but JAX sees {jax.device_count()}; make {product} equal the device count"
        )
    auto = (AxisType.Auto,) * len(sizes)  # GSPMD propagates shardings through the step (no explicit types)
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=auto)


def batch_sharding(mesh, ndim: int, rows: int | None = None) -> NamedSharding:
    """Batches are split on their row axis ([B, S] -> axis 0, [accum, B, S] -> axis 1) over "fsdp", and over
    "expert" too when the mesh has one that divides the rows left per fsdp shard.

    ``rows`` (the row count) must be a multiple of the fsdp size; it is checked when given."""
    fsdp = mesh.shape.get("fsdp", 1)
    if rows is not None and rows % fsdp:
        raise _config_error(
            f"a batch of {rows} rows (per micro-batch) cannot be split over the mesh's fsdp axis of size {fsdp}; "
            f"make batch_size / grad_accum a multiple of {fsdp}"
        )
    split = [a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1]
    if rows is not None and "expert" in split and (rows // fsdp) % mesh.shape["expert"]:
        split.remove("expert")
    spec = [None] * ndim
    spec[0 if ndim == 2 else 1] = tuple(split) if len(split) > 1 else (split[0] if split else None)
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


def on_mesh(mesh):
    """A context in which tx's compiled functions run: ``jax.set_mesh(mesh)`` for a tx mesh (so that a user's own
    ``jax.set_mesh`` of an Explicit mesh around the call does not clash with tx's Auto axes); nothing without one."""
    import contextlib

    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
