"""``python fault_train.py KILL tx-arguments...``: run the ``tx`` command and SIGKILL itself at the point KILL names.

KILL is ``none``; ``save:N`` (inside the N-th checkpoint write, once half of the temporary
``train_state.safetensors`` is on disk: a write cut short); or ``step:N`` (right after train step N was
dispatched, before its metrics are logged or anything is saved). For tests/test_faults.py.
"""

from __future__ import annotations

import os
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    kill, args = sys.argv[1], sys.argv[2:]
    kind, _, n = kill.partition(":")
    if kind == "save":
        import safetensors.numpy

        real, calls = safetensors.numpy.save_file, []

        def save_file(tensors, filename, metadata=None):
            if "train_state" in str(filename):
                calls.append(filename)
                if len(calls) == int(n):
                    real(tensors, filename, metadata=metadata)
                    size = os.path.getsize(filename)
                    os.truncate(filename, size // 2)
                    die()
            return real(tensors, filename, metadata=metadata)

        safetensors.numpy.save_file = save_file
    elif kind == "step":
        from tx.train.trainer import Trainer

        real_step = Trainer.step

        def step(self, batch):
            metrics = real_step(self, batch)
            if self.step_count == int(n):
                die()
            return metrics

        Trainer.step = step
    from tx.cli import main as tx_main

    return tx_main(args)


if __name__ == "__main__":
    sys.exit(main())
