"""Host memory: keep freed memory in the process instead of handing it back to the OS on every step.

XLA:CPU allocates each compiled step's temporary buffer (hundreds of MB for a small model) with ``malloc``,
which glibc serves with ``mmap`` above 32 MB and unmaps on ``free``. Every step then page-faults the whole
buffer in again: ~110k faults and ~0.19 s of kernel time per step at the ``benchmarks/step.py`` shape on a
2-core machine, against ~11k and ~0.03 s once glibc keeps freed memory in its heap. ``tx`` commands call
:func:`keep_freed_memory` before JAX starts (``TX_KEEP_FREED_MEMORY=0`` turns it off); a Python script can
call it first thing. The cost: the process keeps its peak heap size until it exits.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)
ENV = "TX_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """glibc only: one malloc arena, large blocks from the heap, no trimming. True when applied.

    Call it before JAX runs anything: threads that already allocated keep their own arenas, from which
    glibc still maps large blocks. Does nothing (False) on other C libraries or with ``TX_KEEP_FREED_MEMORY=0``.
    """
    if os.environ.get(ENV, "1") == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(key, value) == 1 for key, value in settings)
