"""keep_freed_memory: after it, a large block freed and allocated again costs no new page faults."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource, sys
if sys.argv[1] == "1":
    from tx.host_memory import keep_freed_memory
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 200 * 2**20
for _ in range(2):  # the first round grows the heap; the second is what every later step costs
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)  # as XLA:CPU allocates a step's temporary buffer
    ctypes.memset(block, 1, size)  # touch every page
    libc.free(block)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(after - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_memory_is_reused_without_page_faults():
    def faults(tuned):
        out = subprocess.run([sys.executable, "-c", PROBE, tuned], capture_output=True, text=True, check=True)
        return int(out.stdout)

    pages = 200 * 2**20 // 4096  # 51200
    assert faults("0") > pages // 2  # glibc maps and unmaps the block each time: every page faults again
    assert faults("1") < pages // 20  # kept in the heap: the pages are already there


def test_opt_out(monkeypatch):
    from tx.host_memory import ENV, keep_freed_memory

    monkeypatch.setenv(ENV, "0")
    assert keep_freed_memory() is False
