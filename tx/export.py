"""Export a tx model as a Hugging Face checkpoint folder that transformers (and tx) load.

``save_model(model, folder)`` writes ``config.json`` (the checkpoint's own config dict), the weights under their HF
names (stacked layers split per layer; no ``lm_head.weight`` when the embeddings are tied), sharded with
``model.safetensors.index.json`` above ``max_shard_size``, and the tokenizer files of the source folder. LoRA is
folded into the written weights (the in-memory model is left as it is); a connector cannot be exported, since it
changes the architecture. Tensors are produced one shard at a time into a hidden sibling folder, which then
replaces the folder in one step (:func:`tx.folder_io.write_folder`): a crash never leaves a mix of two saves.
With several processes (``jax.distributed``) every process calls it: each tensor is gathered in all of them and
process 0 writes (see :mod:`tx.multihost`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flax import nnx

from tx.adapters.attach import has_connector, module_at
from tx.adapters.lora import LoRALinear
from tx.adapters.lora_experts import LoRAExperts
from tx.errors import AdapterError, ConfigError
from tx.folder_io import write_folder
from tx.multihost import agree, host_array, is_writer
from tx.safetensors_io import NAMES, atomic_write_bytes, open_checkpoint, save_tensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files next to the weights that a user expects in a checkpoint folder (tokenizer, chat template, generation).
EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",  # a multimodal checkpoint's processor (Gemma 3's image processor)
    "processor_config.json",
)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def parse_size(size: int | str) -> int:
    """``"5GB"`` (10^9), ``"500MiB"`` (2^20) or an int number of bytes -> bytes, like transformers."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if match and match[2].upper() in _UNITS and float(match[1]) > 0:
        return int(float(match[1]) * _UNITS[match[2].upper()])
    raise ConfigError(
        f"max_shard_size must be a positive size like '5GB', '500MB', '2GiB' or a byte count, got {size!r}"
    )


def _weight_entries(model) -> list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]:
    """(HF key, shape, dtype, producer) for every tensor of the checkpoint, LoRA folded in.

    The keys and where each comes from are the loader's weight plan (:func:`tx.models.loader.weight_plan`) read
    backwards: stacked layers are split per layer, fused expert tensors per expert and per part.
    """
    from tx.models.loader import abstract_model, indexed_shape, weight_plan

    entries = []
    plan = weight_plan(model.config, nnx.state(abstract_model(model.config)))
    for tx_path, fills in plan.items():
        *module_path, attr = tx_path.split(".")
        module = module_at(model, tuple(int(p) if p.isdigit() else p for p in module_path))
        lora = module if isinstance(module, LoRALinear | LoRAExperts) and module.enabled and attr == "weight" else None
        if isinstance(module, LoRALinear | LoRAExperts):
            module = module.base
        var = getattr(module, attr)
        layer = _LayerCache(var, lora)
        for hf, index, transpose in fills:
            shape = indexed_shape(tuple(var.shape), index)
            dtype = np.dtype(np.int64) if np.issubdtype(np.dtype(var.dtype), np.integer) else np.dtype(var.dtype)
            if dtype == np.int64:  # an index table (DeepSeek-V4's tid2eid): int64, as transformers holds it
                produce = lambda index=index, var=var: host_array(var[...])[index].astype(np.int64)  # noqa: E731
                entries.append((hf, shape, dtype, produce))
            elif not index and transpose:  # a global tensor stored transposed (DeepSeek-V4's hc_head.hc_fn)
                shape = (shape[-1], shape[-2])
                entries.append((hf, shape, dtype, lambda var=var: np.ascontiguousarray(host_array(var[...]).T)))
            elif not index:
                entries.append((hf, shape, np.dtype(var.dtype), lambda var=var: host_array(var[...])))
            elif transpose:  # written in the on-disk layout (last two axes swapped)
                shape = (*shape[:-2], shape[-1], shape[-2])
                produce = lambda index=index, layer=layer: np.ascontiguousarray(np.swapaxes(layer(index), -1, -2))  # noqa: E731
                entries.append((hf, shape, np.dtype(var.dtype), produce))
            else:
                entries.append((hf, shape, np.dtype(var.dtype), lambda index=index, layer=layer: layer(index)))
    return entries


class _LayerCache:
    """Produces ``var[index]`` with LoRA folded into layer ``index[0]``; keeps the last layer (the fills of one
    layer, e.g. every expert's parts, follow each other)."""

    def __init__(self, var, lora: LoRALinear | LoRAExperts | None):
        self.var, self.lora, self.last = var, lora, (None, None)

    def __call__(self, index: tuple) -> np.ndarray:
        i = index[0]
        if self.last[0] != i:
            self.last = (i, _folded(self.var, self.lora, i))
        return np.ascontiguousarray(self.last[1][index[1:]])


def _folded(var, lora: LoRALinear | LoRAExperts | None, i: int) -> np.ndarray:
    w = host_array(var[i])
    if lora is None or lora.layer_mask[i] == 0:
        return w
    a = host_array(lora.lora_a[i]).astype(np.float32)
    b = host_array(lora.lora_b[i]).astype(np.float32)
    return (w.astype(np.float32) + np.float32(lora.scale) * (b @ a)).astype(w.dtype)  # batched over experts too


def _plan_shards(entries, limit: int) -> list[list[int]]:
    shards, current, size = [], [], 0
    for k, (_, shape, dtype, _) in enumerate(entries):
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(k)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def save_model(model, path, *, max_shard_size: int | str = "5GB") -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder (created if needed) and return it.

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` and ``tx.load_model(path)`` load the result. LoRA
    deltas are folded into the written weights in fp32 (as :func:`tx.merge_lora` does) without changing ``model``.
    Weights keep the model's dtype; ``config.json``'s dtype entry is set to match.
    """
    if has_connector(model):
        n = getattr(getattr(model, "connector_config", None), "expansion_rate", "> 1")
        raise AdapterError(
            f"cannot save a model with a connector (expansion_rate {n}) as a Hugging Face checkpoint: connectors "
            "change the architecture, so transformers could not run it. Save the adapters with tx.save_adapter(model, "
            "path) instead, or tx.detach(model) to export the base model."
        )
    raw = getattr(model.config, "raw", None)
    if not raw:
        raise ConfigError("the model has no original config.json dict (model.config.raw); load it with tx.load_model")
    folder = Path(path)
    source = Path(model.folder) if getattr(model, "folder", None) else None
    if source is not None and folder.exists() and folder.resolve() == source.resolve():
        raise ConfigError(
            f"refusing to overwrite the checkpoint the model was loaded from ({source}); pick a new folder"
        )
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file; save_model needs a folder")
    with contextlib.ExitStack() as stack:
        entries = _weight_entries(model) + _other_entries(model, source, stack)
        _write_model(folder, source, raw, entries, parse_size(max_shard_size))
    return folder


def _other_entries(model, source: Path | None, stack: contextlib.ExitStack) -> list:
    """A multimodal checkpoint's tensors outside its language model (vision tower, projector), copied unchanged
    from the files the model was loaded from; none for a text model."""
    from tx.models.families import text_wrapper
    from tx.models.loader import is_text_key

    wrapper = text_wrapper(model.config.raw)
    if wrapper is None:
        return []
    if source is None or not source.is_dir():
        raise ConfigError(
            f"saving a {wrapper.architecture} needs the folder it was loaded from, to copy its vision tower and "
            f"projector (tx adapts only the language model); {source} is not a folder. Load it with tx.load_model"
        )
    where = stack.enter_context(open_checkpoint(source))
    keys = [key for key in sorted(where) if not is_text_key(model.config, key)]
    read = lambda k: np.array(where[k].get(k))  # noqa: E731
    return [(k, tuple(where[k].shape(k)), np.dtype(where[k].dtype(k)), lambda k=k: read(k)) for k in keys]


def _write_model(folder: Path, source, raw, entries, max_shard_size: int) -> None:
    """Write the shards, the index, config.json and the tokenizer files as one folder swap
    (:func:`tx.folder_io.write_folder`): a crash leaves the old checkpoint or the new one, never a mix of shards."""
    shards = _plan_shards(entries, max_shard_size)
    names = (
        [SINGLE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    # every process gathers every tensor (a collective), so process 0 keeps gathering after a failed write and
    # reports the failure once all have finished (tx.multihost.agree)
    error, produced = None, False

    def write(dest: Path | None) -> None:
        nonlocal error, produced
        produced = True
        weight_map, total = {}, 0
        for name, shard in zip(names, shards):
            tensors = {}
            for k in shard:
                key, shape, dtype, produce = entries[k]
                tensors[key] = produce()
                weight_map[key] = name
                total += tensors[key].nbytes
            if dest is not None and error is None:
                try:
                    save_tensors(tensors, dest / name, metadata={"format": "pt"})
                except Exception as e:  # noqa: BLE001 - raised below, once every tensor is gathered
                    error = e
            del tensors
        if dest is not None:
            if error is not None:
                raise error
            _write_rest(dest, source, raw, names, entries, weight_map, total)

    if is_writer():
        old = [p.name for p in folder.glob("model*.safetensors")] if folder.is_dir() else []
        try:
            write_folder(folder, write, replaces=[*old, INDEX])
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other processes are told
            error = e
    if not produced:  # a process that does not write, or a writer that failed before writing: gather all the same
        write(None)
    agree(error is None, f"write {folder}")
    if error is not None:
        raise error


def _write_rest(folder: Path, source, raw, names, entries, weight_map, total) -> None:
    """The index (several shards), config.json and the tokenizer files. An earlier save's shards and index that
    this one does not rewrite are dropped by write_folder (its ``replaces``)."""
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_text(folder / INDEX, json.dumps(index, indent=2) + "\n")

    config = copy.deepcopy(raw)
    config.pop("quantization_config", None)  # the weights are written dequantised (MXFP4 experts, ...)
    dtype_name = _TORCH_DTYPES.get(NAMES.get(entries[0][2], ""), None) if entries else None
    if dtype_name is not None:
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = dtype_name
    _write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if source is not None:
        for name in EXTRA_FILES:
            if (source / name).is_file():
                atomic_write_bytes(folder / name, lambda tmp, src=source / name: shutil.copyfile(src, tmp))


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))
