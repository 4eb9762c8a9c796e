"""A writer for tests/test_faults.py to kill: it saves checkpoints, adapter files and metrics lines in a loop.

Run as ``python fault_writer.py``: a zygote that imports tx once, then for each line ``<run folder>`` read from stdin
forks a writer and prints its pid. The writer resumes from the newest complete checkpoint in the folder (as
``Trainer.fit(resume=True)`` does: metrics past it are dropped) and then, for steps k = last + 1, last + 2, ... forever:
appends a metrics line, writes checkpoint k (every tensor and optimiser leaf filled with k) and rewrites the adapter
folder (both files filled with k, swapped in as one). The test kills the writer with SIGKILL at a random moment and
checks the folder. Forking from the zygote costs milliseconds where a fresh interpreter would spend seconds importing
JAX; nothing in the writer touches JAX's runtime (states are numpy arrays), so forking is safe.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
from flax import nnx

from tx.adapters.io import _write_json
from tx.folder_io import write_folder
from tx.safetensors_io import save_tensors
from tx.train.checkpoint import latest_checkpoint, read_info, save_checkpoint
from tx.train.trainer import _append_line, _truncate_metrics

# about 2.5 MB per checkpoint: big enough that a random kill often lands inside a write
SHAPES = {"lora": {"a": (2, 4, 256), "b": (2, 256, 4)}, "connector": {"proj": (2, 512, 128)}}


def states(step: int) -> dict[str, nnx.State]:
    return {
        name: nnx.State({k: nnx.Param(np.full(shape, step, np.float32)) for k, shape in params.items()})
        for name, params in SHAPES.items()
    }


def opt_state(step: int):
    """A pytree shaped like optax's: a scalar count and two moments per parameter."""
    moments = {name: {k: np.full(shape, step, np.float32) for k, shape in p.items()} for name, p in SHAPES.items()}
    return {"count": np.asarray(step, np.int32), "mu": moments, "nu": moments}


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def write_adapter(dest: Path, step: int) -> None:
    """The two files of an adapter, as tx.save_adapter writes them (through tx.folder_io.write_folder)."""
    save_tensors({"w": np.full((64, 256), step, np.float32)}, dest / ADAPTER_FILES[0])
    _write_json(dest / ADAPTER_FILES[1], {"step": step})


def write_forever(out: Path) -> None:
    root = out / "checkpoints"
    latest = latest_checkpoint(root)
    step = read_info(latest)["step"] if latest is not None else 0
    out.mkdir(parents=True, exist_ok=True)
    _truncate_metrics(out / "metrics.jsonl", step)
    while True:
        step += 1
        _append_line(out / "metrics.jsonl", {"step": step, "loss": 1.0 / step})
        save_checkpoint(root, step, states(step), opt_state(step), {"config": {"seed": 0}}, keep=2)
        write_folder(out / "adapter", lambda dest, k=step: write_adapter(dest, k), replaces=ADAPTER_FILES)


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed writers are reaped by the kernel
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                write_forever(Path(line.strip()))
            finally:
                os._exit(1)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
