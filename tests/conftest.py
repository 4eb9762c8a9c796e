import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One persistent XLA cache for the session (set before JAX is imported): tests that build a new model and
# Trainer of a shape compiled before load the executable instead of compiling it again. A cached executable
# computes exactly what a fresh compile does; the folder is new for every session and removed after it.
# Off unless TX_TEST_XLA_CACHE=1: with jax 0.10.2 the suite crashed twice (segfaults inside XLA's compile-and-
# write-cache path, after hundreds of tests in a process); every file passes alone.
if os.environ.get("TX_TEST_XLA_CACHE") == "1" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="tx-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=_cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
# token caches of the data sets tests train on (tx.train.token_cache) go to a folder of the session, not ~/.cache
# (one per pytest-xdist worker: two workers must not build the same cache entry at once)
if "TX_DATA_CACHE" not in os.environ or os.environ.get("PYTEST_XDIST_WORKER"):
    _tokens = tempfile.mkdtemp(prefix="tx-test-tokens-")
    atexit.register(shutil.rmtree, _tokens, ignore_errors=True)
    os.environ["TX_DATA_CACHE"] = _tokens
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from fixtures_models import FAMILY_NAMES, make_checkpoint  # noqa: E402


def _memory_maps() -> int:
    """How many memory mappings this process holds (0 where /proc is absent)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


# Every executable XLA compiles for the CPU keeps its machine code in a few mappings of its own (about 3 per
# kernel), and JAX's caches keep every executable alive for the life of the process. One pytest process over
# a few hundred of these tests reached Linux's per-process limit (vm.max_map_count, 65530 by default): the
# next mmap fails inside XLA and the process dies with a segfault (CI, test_generate, after ~27 minutes;
# earlier in test_scan_layers and test_identity). Releasing the compiled code after every test file, and
# after any test that leaves the process past a third of that limit, keeps the count bounded.
def _maps_limit() -> int:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text()) // 3
    except (OSError, ValueError):
        return 20000


_MAPS_LIMIT = _maps_limit()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code_per_file():
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _release_compiled_code_when_many():
    yield
    if _memory_maps() > _MAPS_LIMIT:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> (folder, fp32 transformers model) for every supported family, built once per session."""
    root = tmp_path_factory.mktemp("ckpt")
    return {fam: make_checkpoint(fam, root / fam) for fam in FAMILY_NAMES}
