"""Replacing a folder of files as one (an adapter: its weights and the config that describes them).

Each file tx writes is atomic on its own (:func:`tx.safetensors_io.atomic_write_bytes`), but an adapter is two to
four files that must agree: a crash between them would leave new weights beside an old config. :func:`write_folder`
writes the new files into a hidden sibling folder and swaps it with the old one in one step, so a reader, or
whatever a crash leaves, sees the old folder or the new one, never a mix.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

from tx.errors import WriteError
from tx.safetensors_io import atomic_write_bytes, fsync_dir, is_io_error, write_error

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def owner() -> str:
    """``host.pid``, the suffix of this process's hidden files and folders: another host's are never taken as stale."""
    return f"{socket.gethostname()}.{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def is_stale(name: str) -> bool:
    """Whether a hidden name ending in ``-<host>.<pid>`` belongs to this process or to a dead one on this host."""
    host, _, pid = name.rsplit("-", 1)[-1].rpartition(".")
    return host == socket.gethostname() and pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid)))


@functools.cache
def _renameat2():
    """libc's renameat2 where there is one (Linux, glibc 2.28+), else None."""
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the OS or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _clean(folder: Path) -> None:
    """Remove the hidden siblings killed writers left; put back a folder a killed writer had moved aside."""
    for path in folder.parent.glob(f".{folder.name}.tmp-*"):
        if is_stale(path.name):
            shutil.rmtree(path, ignore_errors=True)
    for path in sorted(folder.parent.glob(f".{folder.name}.old-*")):
        if is_stale(path.name):
            if not folder.exists():
                os.rename(path, folder)  # killed between its two renames: the old folder is the one to keep
            else:
                shutil.rmtree(path, ignore_errors=True)


def _write_in_place(folder: Path, write: Callable[[Path], None], replaces: Iterable[str]) -> None:
    """The fallback: each file atomic on its own; the named old files ``write`` did not rewrite are removed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        stamp = lambda p: (p.stat().st_ino, p.stat().st_mtime_ns)  # noqa: E731 - a rewrite changes one of them
        before = {name: stamp(folder / name) for name in replaces if (folder / name).exists()}
        write(folder)
        for name, old in before.items():
            if (folder / name).exists() and stamp(folder / name) == old:
                (folder / name).unlink()
    except OSError as exc:
        if isinstance(exc, WriteError):
            raise
        raise write_error(getattr(exc, "filename", None) or folder, exc) from None


def _copy_into(paths: list[Path], dest: Path) -> None:
    """Copy files (each atomically) and folders into ``dest``."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(path, dest / path.name, symlinks=True, dirs_exist_ok=True)
        else:
            atomic_write_bytes(dest / path.name, lambda tmp, src=path: shutil.copyfile(src, tmp))


def _carry_over(folder: Path, tmp: Path, replaces: set[str]) -> None:
    """Link (or copy) into ``tmp`` what ``folder`` holds that the new contents neither write nor replace."""
    for entry in folder.iterdir():
        if entry.name in replaces or (tmp / entry.name).exists():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), tmp / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, tmp / entry.name)


def _swap(tmp: Path, folder: Path) -> bool:
    """Put ``tmp`` in the place of ``folder`` and remove the old contents; False if ``folder`` cannot be moved."""
    aside = folder.parent / f".{folder.name}.old-{owner()}"
    try:
        swapped = _exchange(tmp, folder)
        if not swapped:
            os.rename(folder, aside)
    except OSError as exc:  # the folder is a mount point (a container volume)
        if exc.errno in (errno.EBUSY, errno.EXDEV):
            return False
        raise
    if swapped:
        shutil.rmtree(tmp, ignore_errors=True)  # it now holds the old contents
    else:  # a kill before the next rename leaves the old folder aside; the next write_folder puts it back
        os.rename(tmp, folder)
        shutil.rmtree(aside, ignore_errors=True)
    return True


def write_folder(folder: Path, write: Callable[[Path], None], replaces: Iterable[str] = ()) -> None:
    """Make ``folder`` hold what ``write(path)`` writes into ``path``, replacing its old contents in one step.

    Files of the old folder that ``write`` does not write and that are not named in ``replaces`` are kept (hard
    links where possible), so a README or tokenizer a user put beside an adapter stays. Where no sibling folder
    can be made (a parent folder the user cannot write) or the folder cannot be moved (a mount point), the files
    are written in place, each atomically. ``write`` is called once, whichever way the folder is written (it may
    gather values from other processes). An I/O error is a :class:`~tx.errors.WriteError` naming the file under
    ``folder``; the old folder is then unchanged.
    """
    folder = Path(folder)
    if folder.is_symlink():
        folder = folder.resolve()
    tmp = folder.parent / f".{folder.name}.tmp-{owner()}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _clean(folder)
        tmp.mkdir()
    except PermissionError:
        _write_in_place(folder, write, replaces)
        return
    except OSError as exc:
        raise write_error(folder, exc) from None
    try:
        write(tmp)
        written = sorted(tmp.iterdir())
        if folder.is_dir():
            _carry_over(folder, tmp, set(replaces))
        fsync_dir(tmp)
        if not folder.is_dir():
            os.rename(tmp, folder)
        elif not _swap(tmp, folder):  # a mount point: what write wrote is copied in, file by file
            _write_in_place(folder, lambda dest: _copy_into(written, dest), replaces)
            shutil.rmtree(tmp, ignore_errors=True)
            return
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, WriteError):  # name the file where it was to go, not the hidden folder
            renamed = WriteError(str(exc).replace(str(tmp), str(folder)))
            renamed.errno = exc.errno
            raise renamed from None
        if is_io_error(exc):
            where = str(getattr(exc, "filename", None) or folder).replace(str(tmp), str(folder))
            raise write_error(Path(where), exc) from None
        raise
    fsync_dir(folder.parent)
