"""Training checkpoints: adapter values, optimiser state and the step, written atomically.

Layout under ``<out>/checkpoints/``::

    step_000100/train_state.safetensors   trainable variables by nnx path + optimiser leaves by index
    step_000100/state.json                step, format version, config
    step_000100/COMPLETE                  written last: a folder without it is ignored

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash at any
moment leaves the previous checkpoint intact. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from tx.errors import TxError
from tx.safetensors_io import SafetensorsFile, save_tensors

FORMAT = 1


def _flat(state: nnx.State, prefix: str) -> dict[str, np.ndarray]:
    return {prefix + "/".join(str(p) for p in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def save_checkpoint(root: Path, step: int, states: dict[str, nnx.State], opt_state, info: dict, keep: int = 2) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {}
    for name, state in states.items():
        tensors.update(_flat(state, f"{name}:"))
    for i, leaf in enumerate(jax.tree.leaves(opt_state)):
        tensors[f"opt:{i}"] = np.asarray(leaf)
    save_tensors(tensors, tmp / "train_state.safetensors")
    (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "step": step, **info}, indent=2))
    (tmp / "COMPLETE").write_text("ok\n")
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in sorted(complete_checkpoints(root))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def complete_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "COMPLETE").is_file())


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path, states: dict[str, nnx.State], opt_state):
    """Fill ``states`` (in place) and return (new opt_state, info) from a checkpoint folder."""
    path = Path(path)
    info = json.loads((path / "state.json").read_text())
    if info.get("format", 0) > FORMAT:
        raise TxError(f"{path} was written by a newer tx (format {info['format']}); upgrade tx to resume it")
    f = SafetensorsFile(path / "train_state.safetensors")
    try:
        for name, state in states.items():
            for p, var in nnx.to_flat_state(state):
                key = f"{name}:" + "/".join(str(x) for x in p)
                if key not in f.infos:
                    raise TxError(f"{path}: checkpoint lacks {key!r}; it was written for a different adapter setup")
                value = np.array(f.get(key))
                if value.shape != var.shape:
                    raise TxError(f"{path}: {key!r} has shape {value.shape}, the model expects {var.shape}")
                var.set_value(jax.device_put(value, var[...].sharding).astype(var[...].dtype))
        leaves, treedef = jax.tree.flatten(opt_state)
        new = []
        for i, leaf in enumerate(leaves):
            value = np.array(f.get(f"opt:{i}"))
            sharding = getattr(leaf, "sharding", None)
            new.append(jax.device_put(value, sharding) if sharding is not None else value)
        return jax.tree.unflatten(treedef, new), info
    finally:
        f.close()
