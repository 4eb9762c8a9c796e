"""Token ids on disk, memory-mapped: a data set is tokenised once; a second run, a resumed run and the eval pass
open it at once, and host memory holds only the pages a batch touches.

A cache entry is a folder ``<cache_dir>/<key>/`` where ``key`` hashes what the tokens depend on: each data
file's absolute path, size and modification time, the tokenizer (its ``tokenizer.json`` as serialised, special
tokens and ids), the chat template, the column mapping and this format's version. Another tokenizer or
template, or an edited file, is another key, so a cache is rebuilt, never reused for other tokens; the entry's
``meta.json`` repeats the key and is checked when opened. Files (all flat, in record order):

- ``ids.bin``     int32 ``[T]``: every document's token ids, one after another.
- ``labels.bin``  uint8 ``[T]``: 1 where the token is a loss target (a reply, a completion, text).
- ``offsets.npy`` int64 ``[N + 1]``: document ``i`` is ``ids[offsets[i]:offsets[i + 1]]``.
- ``loss.npy``    int64 ``[N]``: loss targets per document (``labels[offsets[i] + 1:offsets[i + 1]].sum()``).
- ``meta.json``   the key, counts and the largest id; written last, so an entry without it is incomplete.

Building streams the data in blocks (:data:`tx.train.readers.BLOCK_ROWS` rows), so memory is bounded by a
block, not the data set. With several processes (``jax.distributed``) process ``p`` of ``P`` parses and
tokenises blocks ``p, p + P, ...`` into part files; after a barrier every process fills in parts it cannot see
(a cache folder that is not shared between hosts) and joins them, so on shared storage each process does only
its share.

Why not grain for the loader: its strengths are per-record transforms in worker processes on every epoch and
checkpointable iterator state. Here the expensive work (rendering and tokenising) is done once into this cache,
a batch is a gather from memory-mapped pages (milliseconds), and ``Dataset.batch(step)`` is already a pure
function of (seed, step), so a resumed run needs no iterator state; grain would add a dependency (and its
ArrayRecord format) without removing work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tx.errors import DataError
from tx.train import readers

VERSION = 1


@dataclass
class TokenStore:
    """Tokenised documents: flat ``ids`` / ``labels`` (numpy arrays or memory maps) and per-document offsets."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    loss: np.ndarray
    max_id: int
    source: str
    path: Path | None = None  # the cache folder, when memory-mapped

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.asarray(self.ids[s:e]), np.asarray(self.labels[s:e]).astype(bool)

    @classmethod
    def from_docs(cls, docs: list[tuple[np.ndarray, np.ndarray]], source: str) -> TokenStore:
        lengths = np.asarray([len(ids) for ids, _ in docs], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.concatenate([ids for ids, _ in docs]).astype(np.int32) if docs else np.zeros(0, np.int32)
        labels = np.concatenate([lab for _, lab in docs]).astype(np.uint8) if docs else np.zeros(0, np.uint8)
        loss = np.asarray([int(lab[1:].sum()) for _, lab in docs], np.int64)
        return cls(ids, labels, offsets, loss, int(ids.max()) if len(ids) else -1, source)


def default_cache_dir() -> Path:
    """``$TX_DATA_CACHE``, else ``$XDG_CACHE_HOME/tx/tokens`` (``~/.cache/tx/tokens``)."""
    if os.environ.get("TX_DATA_CACHE"):
        return Path(os.environ["TX_DATA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tx" / "tokens"


def cache_key(files: list[Path], tokenizer, columns: Mapping[str, str]) -> dict[str, Any]:
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    backend = hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()
    return {
        "version": VERSION,
        "files": stats,
        "tokenizer": backend,
        "special_tokens": dict(sorted(tokenizer.special_tokens.items())),
        "ids": [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id],
        "chat_template": tokenizer.chat_template,
        "columns": dict(sorted(columns.items())),
        "block_rows": readers.BLOCK_ROWS,
    }


def open_cached(
    files: list[Path],
    tokenizer,
    columns: Mapping[str, str],
    tokenize_block: Callable[[list[tuple[str, Any]]], list[tuple[np.ndarray, np.ndarray]]],
    cache_dir: str | os.PathLike,
    source: str,
) -> TokenStore:
    """The cached tokens of ``files``, built first if missing (or made for other files, tokenizer or template)."""
    key = cache_key(files, tokenizer, columns)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(cache_dir).expanduser() / digest
    store = _open(folder, key, source)
    rank, count = _process()
    if count > 1:  # build together unless every process has the entry (each host may have its own cache folder)
        if _all_ok(store is not None, raise_=False):
            return store
        store = None
    if store is not None:
        return store
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot write the token cache in {folder} ({exc}); pass another cache folder") from None
    if count == 1:
        _build(folder, key, files, tokenize_block)
    else:
        _build_parts(folder, key, files, tokenize_block, rank, count)
    store = _open(folder, key, source)
    assert store is not None, folder
    return store


def _open(folder: Path, key: dict, source: str) -> TokenStore | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key:  # not ours (a hash clash, a copied folder): rebuild it
        shutil.rmtree(folder, ignore_errors=True)
        return None
    try:
        T, N = meta["tokens"], meta["documents"]
        ids = np.memmap(folder / "ids.bin", np.int32, "r", shape=(T,)) if T else np.zeros(0, np.int32)
        labels = np.memmap(folder / "labels.bin", np.uint8, "r", shape=(T,)) if T else np.zeros(0, np.uint8)
        offsets = np.load(folder / "offsets.npy", mmap_mode="r")
        loss = np.load(folder / "loss.npy", mmap_mode="r")
        if len(offsets) != N + 1 or len(loss) != N or (N and int(offsets[-1]) != T):
            raise ValueError
    except (OSError, ValueError):
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return TokenStore(ids, labels, offsets, loss, int(meta["max_id"]), source, folder)


def _process() -> tuple[int, int]:
    import sys

    if "jax" not in sys.modules:  # nothing distributed can have started
        return 0, 1
    import jax

    return jax.process_index(), jax.process_count()


class _Writer:
    """Appends documents to the flat files of a folder (under temporary names until ``finish``)."""

    def __init__(self, folder: Path, tag: str):
        self.folder, self.tag = folder, tag
        self.ids = open(folder / f"ids.bin.{tag}", "wb")
        self.labels = open(folder / f"labels.bin.{tag}", "wb")
        self.lengths: list[np.ndarray] = []
        self.loss: list[np.ndarray] = []
        self.max_id = -1

    def add(self, docs):
        self.add_packed(*_packed(docs))

    def add_packed(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray):
        if not len(lengths):
            return
        self.ids.write(ids.tobytes())
        self.labels.write(labels.tobytes())
        self.lengths.append(lengths)
        ends = np.cumsum(lengths)
        total = np.concatenate([[0], np.cumsum(labels, dtype=np.int64)])
        # a document's first token is never a target: count labels[start + 1:end]
        self.loss.append(np.where(lengths > 0, total[ends] - total[np.minimum(ends - lengths + 1, ends)], 0))
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))

    def arrays(self):
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        loss = np.concatenate(self.loss) if self.loss else np.zeros(0, np.int64)
        return lengths, loss

    def close(self):
        self.ids.close()
        self.labels.close()


def _finish(folder: Path, key: dict, tag: str, lengths: np.ndarray, loss: np.ndarray, max_id: int) -> None:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(folder / f"offsets.{tag}.npy", offsets)
    np.save(folder / f"loss.{tag}.npy", loss)
    for name in ("ids.bin", "labels.bin"):
        os.replace(folder / f"{name}.{tag}", folder / name)
    for name in ("offsets", "loss"):
        os.replace(folder / f"{name}.{tag}.npy", folder / f"{name}.npy")
    meta = {"key": key, "documents": len(lengths), "tokens": int(offsets[-1]), "max_id": max_id}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="meta.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, folder / "meta.json")


def workers(files: list[Path]) -> int:
    """Processes that tokenise blocks side by side: ``$TX_DATA_WORKERS``, else one per core for data over
    :data:`POOL_BYTES` on machines with at least :data:`POOL_CORES` cores, else 0 (tokenise in this process,
    where ``encode_batch`` still uses every core). Starting a worker costs seconds (it imports tx), and on two
    cores the pool measured slower than one process (benchmarks/data.py), so small machines do without."""
    if os.environ.get("TX_DATA_WORKERS"):
        return int(os.environ["TX_DATA_WORKERS"])
    if sum(f.stat().st_size for f in files) < POOL_BYTES:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if cores >= POOL_CORES else 0


POOL_BYTES = 32 << 20
POOL_CORES = 4
_WORKER_FN = None


def _worker_init(fn) -> None:
    global _WORKER_FN
    os.environ["RAYON_NUM_THREADS"] = "1"  # one tokenizers thread per process: the processes fill the cores
    _WORKER_FN = fn


def _worker_run(rows):
    return _packed(_WORKER_FN(rows))


def _packed(docs):
    """Documents as three arrays (cheap to send between processes)."""
    if not docs:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int64)
    ids = np.concatenate([d for d, _ in docs]).astype(np.int32)
    labels = np.concatenate([lab for _, lab in docs]).astype(np.uint8)
    return ids, labels, np.asarray([len(d) for d, _ in docs], np.int64)


def _tokenized(blocks, tokenize_block, n_workers: int):
    """``_packed(tokenize_block(block.load()))`` for each block, in order; in ``n_workers`` processes if > 0
    (a few blocks in flight, so memory stays bounded)."""
    if n_workers <= 0:
        for block in blocks:
            yield _packed(tokenize_block(block.load()))
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # never fork: JAX's threads may be running
    with ProcessPoolExecutor(n_workers, mp_context=context, initializer=_worker_init, initargs=(tokenize_block,)) as ex:
        pending = deque()
        for block in blocks:
            pending.append(ex.submit(_worker_run, block.load()))
            if len(pending) >= 2 * n_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _build(folder: Path, key: dict, files, tokenize_block) -> None:
    tag = f"{os.getpid()}.tmp"
    writer = _Writer(folder, tag)
    try:
        for packed in _tokenized(readers.blocks(files), tokenize_block, workers(files)):
            writer.add_packed(*packed)
    finally:
        writer.close()
    _finish(folder, key, tag, *writer.arrays(), writer.max_id)


def _build_parts(folder: Path, key: dict, files, tokenize_block, rank: int, count: int) -> None:
    """Process ``rank`` tokenises its blocks into parts; then every process completes and joins the parts."""
    from tx.multihost import sync

    parts = folder / "parts"
    parts.mkdir(exist_ok=True)

    def write_part(i, block):
        docs = tokenize_block(block.load())
        w = _Writer(parts, f"{i}.{os.getpid()}.tmp")
        w.add(docs)
        w.close()
        lengths, loss = w.arrays()
        np.savez(parts / f"{i}.{os.getpid()}.tmp.npz", lengths=lengths, loss=loss, max_id=w.max_id)
        for src, dst in ((f"ids.bin.{w.tag}", f"{i}.ids"), (f"labels.bin.{w.tag}", f"{i}.labels")):
            os.replace(parts / src, parts / dst)
        os.replace(parts / f"{w.tag}.npz", parts / f"{i}.npz")

    error = None
    try:
        for i, block in enumerate(readers.blocks(files)):
            if i % count == rank:
                write_part(i, block)
    except Exception as exc:  # every process must reach the barrier; each raises its own error after it
        error = exc
    _all_ok(error is None)
    if error is not None:
        raise error
    sync(f"token cache {folder.name}")
    tag = f"{os.getpid()}.{rank}.tmp"
    writer = _Writer(folder, tag)
    lengths, loss = [], []
    for i, block in enumerate(readers.blocks(files)):
        if not (parts / f"{i}.npz").is_file():  # a cache folder other hosts do not see
            write_part(i, block)
        part = np.load(parts / f"{i}.npz")
        lengths.append(part["lengths"])
        loss.append(part["loss"])
        writer.max_id = max(writer.max_id, int(part["max_id"]))
        for name, out in (("ids", writer.ids), ("labels", writer.labels)):
            with open(parts / f"{i}.{name}", "rb") as f:
                shutil.copyfileobj(f, out)
    writer.close()
    empty = np.zeros(0, np.int64)
    _finish(
        folder,
        key,
        tag,
        np.concatenate(lengths) if lengths else empty,
        np.concatenate(loss) if loss else empty,
        writer.max_id,
    )
    sync(f"token cache {folder.name} joined")


def _all_ok(ok: bool, raise_: bool = True) -> bool:
    """Whether ``ok`` holds in every process (a collective: all must call it); raises where it does not, if asked."""
    from jax.experimental import multihost_utils

    from tx.errors import TxError

    oks = np.asarray(multihost_utils.process_allgather(np.asarray(ok))).reshape(-1).astype(bool)
    if raise_ and ok and not oks.all():
        raise TxError(f"processes {np.flatnonzero(~oks).tolist()} failed to tokenise their data; their errors say why")
    return bool(oks.all())
