"""Read safetensors files tensor by tensor from a memory map, with errors that name the file and tensor.

The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}}`` and the raw bytes. Reading it directly lets tx check every offset against the file
size (a truncated download is reported as such) and copy each tensor straight into its destination.
Writing goes through the ``safetensors`` package, to a temporary name that is renamed into place
(:func:`atomic_write_bytes`, which every file tx writes goes through).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ml_dtypes
import numpy as np

from tx.errors import CheckpointError, TxError, WriteError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),  # DeepSeek-V3's block-quantised weights (tx.models.fp8)
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),  # DeepSeek-V4's power-of-two block scales (ue8m0)
    # DeepSeek-V4's FP4 experts (tx.models.fp4), two values a byte: the shape counts values, get() gives the bytes
    "F4": np.dtype(ml_dtypes.float4_e2m1fn),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
PACKED = {"F4": 2}  # values per byte


class SafetensorsFile:
    """A parsed safetensors header plus a read-only memory map of the file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes); re-download it")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise CheckpointError(
                        f"{self.path}: corrupt or truncated safetensors header (says {n} bytes, file has {size})"
                    )
                header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not JSON); re-download the file") from None
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read ({exc.strerror})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.infos: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has an unsupported or malformed entry {info!r}"
                ) from None
            per_byte = PACKED.get(info["dtype"], 1)
            if per_byte > 1 and (not shape or shape[-1] % per_byte):
                raise CheckpointError(f"{self.path}: tensor {name!r}: {info['dtype']} shape {shape} splits a byte")
            if end - begin != dtype.itemsize * int(np.prod(shape)) // per_byte:
                raise CheckpointError(f"{self.path}: tensor {name!r}: byte range does not match shape {shape}")
            if self.data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {name!r} ends at byte {self.data_start + end} but the file has "
                    f"{size} bytes; re-download or re-save the checkpoint"
                )
            self.infos[name] = (dtype, shape, begin, end)
        self._mmap = None

    def keys(self):
        return self.infos.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.infos[name][0]

    def get(self, name: str) -> np.ndarray:
        """A read-only view of one tensor (no copy)."""
        if self._mmap is None:
            with open(self.path, "rb") as fh:
                self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        dtype, shape, begin, end = self.infos[name]
        if dtype == DTYPES["F4"]:  # packed: the bytes, [..., n / 2] (as torch's float4_e2m1fn_x2 holds them)
            dtype, shape = np.dtype(np.uint8), (*shape[:-1], shape[-1] // PACKED["F4"])
        return np.frombuffer(
            self._mmap, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self.data_start + begin
        ).reshape(shape)

    def release(self, name: str) -> None:
        """Drop this tensor's pages from the process (the OS page cache keeps them): host memory stays ~one tensor."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, begin, end = self.infos[name]
        page = mmap.PAGESIZE
        start = (self.data_start + begin) // page * page
        stop = self.data_start + end
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)
        except (OSError, ValueError):
            pass

    def close(self):
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view is still alive; the map closes when it is collected
                pass
        self._mmap = None


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: from model.safetensors.index.json, or model.safetensors."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: malformed index (expected a JSON object with 'weight_map')") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: malformed index ('weight_map' should map tensor names to file names)")
        files = []
        for name in sorted(set(weight_map.values())):
            # The name comes from a file, so it must be a plain file name in this folder. It is checked as written,
            # not resolved: the hub cache stores each shard as a symlink into its blobs folder, which is fine.
            if name in ("", ".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
                raise CheckpointError(f"{index}: shard name {name!r} points outside the checkpoint folder")
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"{index}: shard {name!r} is missing from {folder}")
            files.append(path)
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise CheckpointError(
            f"{folder} holds only PyTorch pickle weights (*.bin/*.pt); tx reads safetensors only, never pickles. "
            "Convert with transformers: model.save_pretrained(folder, safe_serialization=True)"
        )
    raise CheckpointError(f"{folder} has no *.safetensors files")


@contextmanager
def open_checkpoint(folder: Path) -> Iterator[dict[str, SafetensorsFile]]:
    """Map every tensor name of a checkpoint to the open file that holds it."""
    files = [SafetensorsFile(p) for p in checkpoint_files(folder)]
    try:
        where: dict[str, SafetensorsFile] = {}
        for f in files:
            for k in f.keys():
                where[k] = f
        yield where
    finally:
        for f in files:
            f.close()


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def is_io_error(exc: BaseException) -> bool:
    """An OSError, or the I/O error ``safetensors`` raises as its own type, that is not already a tx error."""
    if isinstance(exc, TxError):
        return False
    return isinstance(exc, OSError) or (type(exc).__name__ == "SafetensorError" and "os error" in str(exc))


def write_error(path: Path, exc: BaseException) -> WriteError:
    """A :class:`WriteError` naming ``path`` for an I/O error raised while writing it; says when the disk is full."""
    code = getattr(exc, "errno", None)
    if code is None:
        match = re.search(r"os error (\d+)", str(exc))
        code = int(match[1]) if match else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full (no space left on device); free some space or write to another disk"
    else:
        why = getattr(exc, "strerror", None) or str(exc)
    err = WriteError(f"cannot write {path}: {why}")
    err.errno = code
    return err


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where Linux shows it (so it never changes)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # elsewhere: set and restore it; meanwhile a file made by another thread is only stricter
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename into place, so a crash at any moment leaves the old file intact.

    The temporary file is ``.<name>.tmp-<pid>`` next to ``path`` and is removed on any error. The file gets the
    mode a plain ``open(path, "w")`` gives (``0o666`` less the umask), whatever mode ``write`` created it with:
    ``safetensors`` creates its files ``0o600``, which other users (a vLLM server, a colleague) cannot read. An
    I/O error (a full disk, a read-only folder) is raised as a :class:`~tx.errors.WriteError` that names ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if is_io_error(exc):
            raise write_error(path, exc) from None
        raise
    fsync_dir(path.parent)


def save_tensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (via a temporary name)."""
    from safetensors.numpy import save_file

    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # ascontiguousarray would make 0-d 1-d
    atomic_write_bytes(Path(path), lambda tmp: save_file(arrays, str(tmp), metadata=metadata))
