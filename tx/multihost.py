"""Several processes, one run: every process computes, process 0 writes the files.

After ``jax.distributed.initialize()`` each process holds only its own devices' shards of a parameter, and
every process runs the same program. Saving therefore gathers each array in all processes (a collective,
so every process must call it), writes the files in process 0 only, and waits at a barrier so that no
process reads a checkpoint before it exists. With one process all of this reduces to plain ``np.asarray``.
The run folder must be on storage every host sees (a resumed run reads its checkpoint in every process).
"""

from __future__ import annotations

import jax
import numpy as np


def is_writer() -> bool:
    """True in the process that writes files (process 0; the only one without jax.distributed)."""
    return jax.process_index() == 0


def host_array(x) -> np.ndarray:
    """The whole value of ``x`` as a NumPy array in this process; gathers shards held by other processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def sync(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(ok: bool, what: str) -> None:
    """Make every process stop when process 0 failed at ``what`` (it raises its own error after this call)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    from tx.errors import TxError

    if not bool(multihost_utils.broadcast_one_to_all(np.asarray(ok))) and not is_writer():
        raise TxError(f"process 0 failed to {what}; its error message says why")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None):
    """``jax.distributed.initialize`` for ``tx finetune --distributed``: found by itself on TPU pods, SLURM,
    Kubernetes and MPI; elsewhere give all of coordinator (``host:port`` of process 0), num_processes and
    process_id. On CPU the processes talk through gloo."""
    from tx.errors import ConfigError

    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ConfigError("--coordinator, --num-processes and --process-id go together: give all three or none")
    if num_processes is not None and not (num_processes >= 1 and 0 <= process_id < num_processes):
        raise ConfigError(
            f"--process-id must be in [0, --num-processes); got {process_id} with --num-processes {num_processes}"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only when the devices are CPUs
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
