"""Load a Hugging Face checkpoint into a :class:`~tx.models.decoder.CausalLM`, one tensor at a time.

The model is built abstractly (``nnx.eval_shape``: no memory, no random init), the family's weight map
says which HF key fills which parameter, every missing / unexpected / mis-shaped key is reported in one
error, and each parameter is filled from the memory-mapped safetensors files and placed on its device
(with its sharding when a mesh is given).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx import hub
from tx.errors import CheckpointError
from tx.models import fp4, fp8
from tx.models.config import ModelConfig, load_config
from tx.models.decoder import CausalLM
from tx.models.families import (
    GLOBAL_LAYOUTS,
    GLOBAL_WEIGHTS,
    TRANSPOSED_GLOBALS,
    block_weights,
    family_named,
    text_wrapper,
)
from tx.models.mxfp4 import dequantize
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


class Fill(NamedTuple):
    """One on-disk tensor of a tx parameter: its HF key, the index it fills (layer, expert, rows) and whether it is
    stored transposed in its last two axes (gpt-oss's experts: [E, in, out] on disk, [E, out, in] in tx)."""

    key: str
    index: tuple
    transpose: bool = False


def weight_plan(cfg: ModelConfig, state: nnx.State) -> dict[str, list[Fill]]:
    """tx parameter path -> the HF tensors that fill it and where (see :mod:`tx.models.families`)."""
    flat = {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}
    family = family_named(cfg.family)
    plan: dict[str, list[Fill]] = {}
    for hf, tx_path in global_weights(cfg).items():
        if tx_path in flat:
            plan[tx_path] = [Fill(global_key(cfg, hf), (), tx_path in TRANSPOSED_GLOBALS)]
    for prefix, block, layer_ids in block_layout(cfg):
        for suffix, spec in block_weights(family, block).items():
            tx_path = ".".join(map(str, prefix)) + "." + spec.tx_path
            if tx_path not in flat:
                continue
            shape = flat[tx_path].shape
            rows = () if spec.rows is None else (_rows(shape, spec.rows),)
            fills = plan.setdefault(tx_path, [])
            for r, layer in enumerate(layer_ids):
                key = f"{cfg.hf_weight_prefix}layers.{layer}.{suffix}"
                if "{j}" in suffix:
                    fills += [Fill(key.format(j=j), (r, j, *rows)) for j in range(cfg.moe.num_experts)]
                else:
                    fills.append(Fill(key, (r, *rows), spec.transpose))
    return plan


def global_weights(cfg: ModelConfig) -> dict[str, str]:
    """HF key -> tx path of the tensors outside the layers: the family's own layout (the one whose layer prefix the
    checkpoint uses, see :func:`with_weight_layout`) or :data:`GLOBAL_WEIGHTS`."""
    family = family_named(cfg.family)
    if family.global_weights is None:
        return GLOBAL_WEIGHTS
    return next(table for prefix, table in GLOBAL_LAYOUTS[family.global_weights] if prefix == cfg.hf_weight_prefix)


def global_key(cfg: ModelConfig, key: str) -> str:
    """A :data:`GLOBAL_WEIGHTS` key ("model.norm.weight", "lm_head.weight") under the checkpoint's prefixes."""
    if family_named(cfg.family).global_weights is not None:
        return key  # the family's layouts hold whole keys
    if key.startswith("model."):
        return cfg.hf_weight_prefix + key[len("model.") :]
    return cfg.hf_head_prefix + key


def is_text_key(cfg: ModelConfig, key: str) -> bool:
    """Whether an on-disk tensor belongs to the text model tx runs (a multimodal checkpoint's vision tower and
    projector do not: tx leaves them as they are, and export copies them)."""
    if text_wrapper(cfg.raw) is None:
        return True
    return key.startswith(cfg.hf_weight_prefix) or key == global_key(cfg, "lm_head.weight")


def with_weight_layout(cfg: ModelConfig, where: dict, folder) -> ModelConfig:
    """A multimodal checkpoint's config with the key prefixes its files use (writers have used several)."""
    family = family_named(cfg.family)
    if family.global_weights is not None:  # e.g. DeepSeek-V4: save_pretrained's keys or the hub's upstream ones
        layouts = GLOBAL_LAYOUTS[family.global_weights]
        for prefix, table in layouts:
            if next(iter(table)) in where:
                return dataclasses.replace(cfg, hf_weight_prefix=prefix, hf_head_prefix="")
        tried = ", ".join(repr(next(iter(table))) for _, table in layouts)
        raise CheckpointError(f"{folder}: a {cfg.architecture} checkpoint without its embeddings (looked for {tried})")
    wrapper = text_wrapper(cfg.raw)
    if wrapper is None:
        return cfg
    for weights, head in wrapper.weight_layouts:
        if f"{weights}embed_tokens.weight" in where:
            return dataclasses.replace(cfg, hf_weight_prefix=weights, hf_head_prefix=head)
    tried = ", ".join(repr(f"{w}embed_tokens.weight") for w, _ in wrapper.weight_layouts)
    raise CheckpointError(
        f"{folder}: a {wrapper.architecture} checkpoint without its language model's embeddings (looked for "
        f"{tried}); the files are incomplete or from another model"
    )


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

    from tx.sharding import sharding_for

    with open_checkpoint(folder) as where:
        cfg = with_weight_layout(cfg, where, folder)
        model = abstract_model(cfg, dtype)
        graphdef, state = nnx.split(model)
        plan = weight_plan(cfg, state)
        flat = dict(nnx.to_flat_state(state))
        by_path = {".".join(str(p) for p in path): path for path in flat}
        _check_keys(folder, cfg, plan, flat, by_path, where)
        for tx_path, fills in plan.items():
            var = flat[by_path[tx_path]]
            integer = jnp.issubdtype(var.dtype, jnp.integer)  # a table (DeepSeek-V4's tid2eid) keeps its dtype
            buf = np.empty(var.shape, dtype=np.dtype(var.dtype) if integer else np.dtype(dtype))
            for key, index, transpose in fills:
                src = read_tensor(where, key)
                dst = buf[index]
                np.copyto(dst, np.swapaxes(src, -1, -2) if transpose else src, casting="unsafe")
                del src
                release_tensor(where, key)
                if check_finite and not np.isfinite(dst).all():
                    raise CheckpointError(
                        f"{_file_of(where, key)}: tensor {key!r} holds NaN or Inf values; the checkpoint is "
                        "corrupt or was saved after a diverged run"
                    )
            sharding = sharding_for(mesh, var.get_metadata().get("axes"), var.shape)
            var.set_value(jax.device_put(buf, sharding) if sharding is not None else jnp.asarray(buf))
            del buf
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    model.name_or_path = str(name_or_path)
    model.folder = str(folder)
    return model


MXFP4_SUFFIXES = ("_blocks", "_scales")  # a weight stored as MXFP4 (gpt-oss on the hub): see tx.models.mxfp4


def _quantised(where: dict, key: str, float_wanted: bool = False) -> tuple[str | None, str | None]:
    """(kind, scale name or None when missing) of a stored quantised weight, kind "float8_e4m3fn" or "packed FP4";
    (None, None) for a plain tensor. int8 is packed FP4 when it has a scale (transformers' rule) or a float is
    wanted."""
    dtype = where[key].dtype(key)
    if dtype != fp8.FP8 and not fp4.is_packed(dtype):
        return None, None
    scale = fp4.scale_key(key, where)
    if dtype == fp8.FP8:
        return "float8_e4m3fn", scale
    if dtype == fp4.FP4 or scale is not None or float_wanted:
        return "packed FP4", scale
    return None, None


def read_tensor(where: dict, key: str) -> np.ndarray:
    """The tensor ``key`` as transformers holds it in memory (a view of the file; :func:`release_tensor` after
    use): MXFP4 ``key_blocks`` + ``key_scales`` are dequantised (they store the last two axes swapped), and so are
    FP8 and packed FP4 (int8 / F4) weights with their scale (``weight_scale_inv`` or upstream's ``scale``)."""
    if key not in where:
        blocks, scales = (where[key + s].get(key + s) for s in MXFP4_SUFFIXES)
        return np.swapaxes(dequantize(blocks, scales, key), -1, -2)
    value = where[key].get(key)
    kind, scale = _quantised(where, key)
    if kind is None:
        return value
    if scale is None:
        raise CheckpointError(
            f"{_file_of(where, key)}: tensor {key!r} is {kind} but its scale is missing (looked for "
            f"{' and '.join(map(repr, fp4.scale_keys(key)))}); a quantised weight needs its per-block scales"
        )
    scales = fp4.scale_values(where[scale].get(scale), scale)
    if kind == "float8_e4m3fn":
        return fp8.dequantize(value, scales, key)
    return fp4.dequantize(value, scales, key, scale)


def release_tensor(where: dict, key: str) -> None:
    names = (key,) if key in where else tuple(key + s for s in MXFP4_SUFFIXES)
    scale = _quantised(where, key)[1] if key in where else None
    for name in names + ((scale,) if scale else ()):
        where[name].release(name)


def _mxfp4_shape(where: dict, key: str) -> tuple[int, ...]:
    blocks = tuple(where[key + "_blocks"].shape(key + "_blocks"))
    return (*blocks[:-3], blocks[-2] * blocks[-1] * 2, blocks[-3])


def _file_of(where: dict, key: str) -> str:
    f = where.get(key) or where.get(key + "_blocks")
    return f.path.name if f is not None else key


def _is_mtp_key(cfg: ModelConfig, key: str) -> bool:
    """A tensor of a multi-token-prediction layer past the decoder's last (DeepSeek-V3's ``model.layers.61.*`` with
    ``num_nextn_predict_layers``): transformers does not load them and tx leaves them too."""
    extra = cfg.raw.get("num_nextn_predict_layers") or 0
    if extra and (key.startswith("mtp.") or key.startswith(f"{cfg.hf_weight_prefix}mtp.")):
        return True  # DeepSeek-V4's upstream files keep them as mtp.{k}.*
    prefix = f"{cfg.hf_weight_prefix}layers."
    if not isinstance(extra, int) or extra <= 0 or not key.startswith(prefix):
        return False
    index = key[len(prefix) :].split(".", 1)[0]
    return index.isdigit() and cfg.num_layers <= int(index) < cfg.num_layers + extra


def _check_keys(folder: Path, cfg, plan, flat, by_path, where) -> None:
    problems = []
    expected = set()
    for tx_path, fills in plan.items():
        shape = flat[by_path[tx_path]].shape
        for key, index, transpose in fills:
            want = indexed_shape(shape, index)
            if transpose:
                want = (*want[:-2], want[-1], want[-2])
            if key not in where and all(key + s in where for s in MXFP4_SUFFIXES):
                expected.update(key + s for s in MXFP4_SUFFIXES)
                found = _mxfp4_shape(where, key)
            else:
                expected.add(key)
                found = tuple(where[key].shape(key)) if key in where else None
                if found is not None:
                    float_wanted = not np.issubdtype(flat[by_path[tx_path]].dtype, np.integer)
                    kind, scale = _quantised(where, key, float_wanted)
                    if kind is not None and scale is None:
                        looked = " or ".join(map(repr, fp4.scale_keys(key)))
                        problems.append(f"tensor {key!r} is {kind} but its scale ({looked}) is missing")
                    elif kind is not None:
                        expected.add(scale)
                    if kind == "packed FP4":
                        found = fp4.unpacked_shape(found, where[key].dtype(key))
                        need = fp4.scale_shape(found)
                        has = None if scale is None else tuple(where[scale].shape(scale))
                        if has is not None and has != need:
                            problems.append(
                                f"tensor {scale!r} has shape {has} but its FP4 weight {key!r} {found} needs {need} "
                                f"(one scale per 1 x {fp4.BLOCK} block)"
                            )
            if found is None:
                problems.append(f"missing tensor {key!r} (expected shape {tuple(want)})")
            elif found != tuple(want):
                problems.append(f"tensor {key!r} has shape {found} but config.json implies {tuple(want)}")
    extra = sorted(
        k
        for k in where
        if k not in expected and not k.endswith(IGNORED_SUFFIXES) and is_text_key(cfg, k) and not _is_mtp_key(cfg, k)
    )
    if cfg.tie_word_embeddings:
        extra = [k for k in extra if k != global_key(cfg, "lm_head.weight")]  # some writers keep the tied copy
    if extra:
        shown = ", ".join(repr(k) for k in extra[:20]) + (f" and {len(extra) - 20} more" if len(extra) > 20 else "")
        problems.append(f"unexpected tensors not used by a {cfg.architecture}: {shown}")
    if problems:
        raise CheckpointError(
            f"{folder}: the checkpoint does not match its config.json:\n  - " + "\n  - ".join(problems)
        )
