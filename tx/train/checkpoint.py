"""Training checkpoints: adapter values, optimiser state and the step, written atomically.

Layout under ``<out>/checkpoints/``::

    step_000100/train_state.safetensors   trainable variables by nnx path + optimiser leaves by index
    step_000100/state.json                step, format version, config
    step_000100/COMPLETE                  written last: a folder without it is ignored

A checkpoint is written into a hidden temporary folder (``.tmp-step_*``), each file fsynced, and the folder is
renamed into place, so a crash at any moment leaves the previous checkpoints intact. A checkpoint is removed by
renaming it to a hidden name first, so a crash while deleting never leaves a half-deleted ``step_*`` folder.
Hidden folders left by a killed writer are removed by the next save. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from tx.errors import CheckpointError, TxError
from tx.folder_io import is_stale, owner
from tx.multihost import host_array, is_writer, sync
from tx.safetensors_io import (
    SafetensorsFile,
    atomic_write_bytes,
    fsync_dir,
    is_io_error,
    save_tensors,
    write_error,
)
from tx.sharding import placed_like

FORMAT = 1
TMP_PREFIX = ".tmp-"


def _flat(state: nnx.State, prefix: str) -> dict[str, np.ndarray]:
    return {prefix + "/".join(str(p) for p in path): host_array(v[...]) for path, v in nnx.to_flat_state(state)}


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))


def remove_stale(root: Path) -> None:
    """Remove hidden folders that writers on this host killed mid-save or mid-delete left behind (not live ones)."""
    for path in Path(root).glob(TMP_PREFIX + "*"):
        if is_stale(path.name):
            shutil.rmtree(path, ignore_errors=True)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder: an atomic rename to a hidden name, then the removal of the hidden folder."""
    path = Path(path)
    if not path.exists():
        return
    aside = path.with_name(f"{TMP_PREFIX}del-{path.name}-{owner()}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def save_checkpoint(root: Path, step: int, states: dict[str, nnx.State], opt_state, info: dict, keep: int = 2) -> Path:
    """Write ``states`` (name -> nnx.State), the optimiser state and ``info`` as ``root/step_<step>``; returns it.

    Raises :class:`~tx.errors.WriteError` (naming the file, saying when the disk is full) if it cannot be written;
    the partial checkpoint is removed and the earlier ones are kept. With several processes (jax.distributed)
    every process must call it: all gather the values, process 0 writes, all wait until it is written.
    """
    root = Path(root)
    final = root / f"step_{step:07d}"
    tensors = {}
    for name, state in states.items():
        tensors.update(_flat(state, f"{name}:"))
    for i, leaf in enumerate(jax.tree.leaves(opt_state)):
        tensors[f"opt:{i}"] = host_array(leaf)
    if not is_writer():
        sync(f"checkpoint {final}")
        return final
    try:
        _write_checkpoint(root, final, step, tensors, info, keep)
    finally:
        sync(f"checkpoint {final}")
    return final


def _write_checkpoint(root: Path, final: Path, step: int, tensors: dict, info: dict, keep: int) -> None:
    tmp = root / f"{TMP_PREFIX}step_{step:07d}-{owner()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        tmp.mkdir()
        save_tensors(tensors, tmp / "train_state.safetensors")
        _write_text(tmp / "state.json", json.dumps({"format": FORMAT, "step": step, **info}, indent=2))
        _write_text(tmp / "COMPLETE", "ok\n")
        remove_checkpoint(final)  # an earlier save of the same step
        os.rename(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_io_error(exc):
            raise write_error(getattr(exc, "filename", None) or tmp, exc) from None
        raise
    fsync_dir(root)
    for old in sorted(complete_checkpoints(root))[:-keep]:
        remove_checkpoint(old)


def complete_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "COMPLETE").is_file())


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_info(path: Path) -> dict:
    """The ``state.json`` of a checkpoint folder (step, format, config, adapters)."""
    file = Path(path) / "state.json"
    try:
        info = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{file}: cannot read the checkpoint's state ({exc}); delete {path} to resume from an earlier checkpoint"
        ) from None
    if not isinstance(info, dict) or not isinstance(info.get("step"), int):
        raise CheckpointError(f"{file}: malformed checkpoint state (expected a JSON object with an integer 'step')")
    if info.get("format", 0) > FORMAT:
        raise TxError(f"{path} was written by a newer tx (format {info['format']}); upgrade tx to resume it")
    return info


def load_checkpoint(path: Path, states: dict[str, nnx.State], opt_state):
    """Fill ``states`` (in place) and return (new opt_state, info) from a checkpoint folder.

    Every tensor is checked before anything is changed: a checkpoint of a different adapter setup (other LoRA
    rank or targets, another connector) is a :class:`~tx.errors.CheckpointError` that lists what differs.
    """
    path = Path(path)
    info = read_info(path)
    f = SafetensorsFile(path / "train_state.safetensors")
    try:
        problems, plan, wanted = [], [], set()
        for name, state in states.items():
            for p, var in nnx.to_flat_state(state):
                key = f"{name}:" + "/".join(str(x) for x in p)
                wanted.add(key)
                if key not in f.infos:
                    problems.append(f"missing {key!r} (shape {tuple(var.shape)})")
                elif tuple(f.shape(key)) != tuple(var.shape):
                    problems.append(f"{key!r} has shape {tuple(f.shape(key))}, the model expects {tuple(var.shape)}")
                else:
                    plan.append((key, var))
        extra = sorted(k for k in f.infos if k not in wanted and not k.startswith("opt:"))
        if extra:
            shown = ", ".join(repr(k) for k in extra[:10]) + (f" and {len(extra) - 10} more" if len(extra) > 10 else "")
            problems.append(f"unexpected {shown}")
        leaves, treedef = jax.tree.flatten(opt_state)
        if not problems:  # the optimiser state follows the adapters: report it only when they match
            for i, leaf in enumerate(leaves):
                key, want = f"opt:{i}", tuple(np.shape(leaf))
                # (tx <= 0.1.0 stored the optimiser's scalar step count with shape (1,))
                if key not in f.infos:
                    problems.append(f"missing optimiser state {key!r}")
                elif tuple(f.shape(key)) != want and not (f.shape(key) == (1,) and want == ()):
                    problems.append(f"optimiser state {key!r} has shape {tuple(f.shape(key))}, expected {want}")
            known = {f"opt:{i}" for i in range(len(leaves))}
            extra = [k for k in f.infos if k.startswith("opt:") and k not in known]
            if extra:
                problems.append(f"{len(extra)} unexpected optimiser state tensors (a different optimiser?)")
        if problems:
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise CheckpointError(
                f"{path} was written for a different adapter setup than the model's; resume with the same LoRA and "
                "connector options, or start a new run (another --out, or --overwrite):\n  - " + "\n  - ".join(shown)
            )
        for key, var in plan:
            var.set_value(placed_like(np.array(f.get(key)).astype(var[...].dtype), var[...]))
        new = [placed_like(np.array(f.get(f"opt:{i}")).reshape(np.shape(leaf)), leaf) for i, leaf in enumerate(leaves)]
        return jax.tree.unflatten(treedef, new), info
    finally:
        f.close()
