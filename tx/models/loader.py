"""Load a Hugging Face checkpoint into a :class:`~tx.models.decoder.CausalLM`, one tensor at a time.

The model is built abstractly (``nnx.eval_shape``: no memory, no random init), the family's weight map
says which HF key fills which parameter, every missing / unexpected / mis-shaped key is reported in one
error, and each parameter is filled from the memory-mapped safetensors files and placed on its device
(with its sharding when a mesh is given).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx import hub
from tx.errors import CheckpointError
from tx.models.config import ModelConfig, load_config
from tx.models.decoder import CausalLM
from tx.models.families import GLOBAL_WEIGHTS, block_weights, family_named
from tx.models.segments import plan_segments
from tx.safetensors_io import open_checkpoint

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry


def as_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def abstract_model(cfg: ModelConfig, dtype=jnp.float32) -> CausalLM:
    return nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


Fill = tuple[str, tuple]  # (HF key, index into the tx parameter it fills: layer, expert, rows)


def weight_plan(cfg: ModelConfig, state: nnx.State) -> dict[str, list[Fill]]:
    """tx parameter path -> the HF tensors that fill it and where (see :mod:`tx.models.families`)."""
    flat = {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}
    family = family_named(cfg.family)
    plan: dict[str, list[Fill]] = {}
    for hf, tx_path in GLOBAL_WEIGHTS.items():
        if tx_path in flat:
            plan[tx_path] = [(hf, ())]
    for prefix, block, layer_ids in block_layout(cfg):
        for suffix, spec in block_weights(family, block).items():
            tx_path = ".".join(map(str, prefix)) + "." + spec.tx_path
            if tx_path not in flat:
                continue
            shape = flat[tx_path].shape
            rows = () if spec.rows is None else (_rows(shape, spec.rows),)
            fills = plan.setdefault(tx_path, [])
            for r, layer in enumerate(layer_ids):
                key = f"model.layers.{layer}.{suffix}"
                if "{j}" in suffix:
                    fills += [(key.format(j=j), (r, j, *rows)) for j in range(cfg.moe.num_experts)]
                else:
                    fills.append((key, (r, *rows)))
    return plan


def _rows(shape, rows: tuple[int, int]) -> slice:
    part, parts = rows
    n = shape[-2] // parts
    return slice(part * n, (part + 1) * n)


def indexed_shape(shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    """The shape of ``array[index]`` for an array of ``shape`` (ints drop an axis, slices shorten it)."""
    out = []
    for dim, i in zip(shape, index):
        if isinstance(i, slice):
            out.append(len(range(*i.indices(dim))))
    return (*out, *shape[len(index) :])


def block_layout(cfg: ModelConfig):
    """(tx path, BlockSpec, layer ids) of every block, as :class:`~tx.models.decoder.CausalLM` builds them."""
    out = []
    for k, plan in enumerate(plan_segments(cfg.layer_specs)):
        for u, spec in enumerate(plan.unit):
            out.append((("segments", k, "blocks", u), spec, plan.layer_ids(u)))
    return out


def load_model(
    name_or_path: str | os.PathLike, *, dtype="float32", mesh=None, mesh_axes=None, check_finite: bool = True
) -> CausalLM:
    """Load a checkpoint (local folder or hub id) as a tx model.

    dtype: parameter and compute dtype ("float32", "bfloat16", "float16"). mesh: any ``jax.sharding.Mesh``
    (Explicit or Auto axes); each parameter is placed with its sharding. Its axes play tx's roles "fsdp", "tp"
    and "expert" by name, or as ``mesh_axes`` says (``{"fsdp": "data", "tp": "model"}``; see :mod:`tx.sharding`).
    """
    from tx.sharding import tx_mesh

    mesh = tx_mesh(mesh, mesh_axes)  # before reading anything: a mesh tx cannot use says so at once
    folder = hub.resolve(name_or_path)
    cfg = load_config(folder)
    dtype = as_dtype(dtype)
    model = abstract_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    plan = weight_plan(cfg, state)
    flat = dict(nnx.to_flat_state(state))
    by_path = {".".join(str(p) for p in path): path for path in flat}

    from tx.sharding import sharding_for

    with open_checkpoint(folder) as where:
        _check_keys(folder, cfg, plan, flat, by_path, where)
        for tx_path, fills in plan.items():
            var = flat[by_path[tx_path]]
            buf = np.empty(var.shape, dtype=np.dtype(dtype))
            for key, index in fills:
                src = where[key].get(key)
                dst = buf[index]
                np.copyto(dst, src, casting="unsafe")
                del src
                where[key].release(key)
                if check_finite and not np.isfinite(dst).all():
                    raise CheckpointError(
                        f"{where[key].path.name}: tensor {key!r} holds NaN or Inf values; the checkpoint is "
                        "corrupt or was saved after a diverged run"
                    )
            sharding = sharding_for(mesh, var.get_metadata().get("axes"), var.shape)
            var.set_value(jax.device_put(buf, sharding) if sharding is not None else jnp.asarray(buf))
            del buf
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    model.name_or_path = str(name_or_path)
    model.folder = str(folder)
    return model


def _check_keys(folder: Path, cfg, plan, flat, by_path, where) -> None:
    problems = []
    expected = set()
    for tx_path, fills in plan.items():
        shape = flat[by_path[tx_path]].shape
        for key, index in fills:
            want = indexed_shape(shape, index)
            expected.add(key)
            if key not in where:
                problems.append(f"missing tensor {key!r} (expected shape {tuple(want)})")
            elif tuple(where[key].shape(key)) != tuple(want):
                problems.append(
                    f"tensor {key!r} has shape {tuple(where[key].shape(key))} but config.json implies {tuple(want)}"
                )
    extra = sorted(k for k in where if k not in expected and not k.endswith(IGNORED_SUFFIXES))
    if cfg.tie_word_embeddings:
        extra = [k for k in extra if k != "lm_head.weight"]  # some writers keep the tied copy
    if extra:
        shown = ", ".join(repr(k) for k in extra[:20]) + (f" and {len(extra) - 20} more" if len(extra) > 20 else "")
        problems.append(f"unexpected tensors not used by a {cfg.architecture}: {shown}")
    if problems:
        raise CheckpointError(
            f"{folder}: the checkpoint does not match its config.json:\n  - " + "\n  - ".join(problems)
        )
