"""Atomic writes: a file or a directory is built beside its destination and renamed into place,
so a crash, an error or an interrupt leaves the previous one or nothing, never a half-written one.
Outputs get the permissions a plain open() or mkdir() would have given them."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputError


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def temp_file_next_to(path: Path) -> tuple[int, Path]:
    """A private temporary file; it gets the permissions a plain open() would have given DEST
    (mkstemp's 0600 would leave a merged model unreadable to a UI running as another user)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except FileNotFoundError:
        raise OutputError(f"{path.parent}: output directory does not exist") from None
    except OSError as exc:
        raise OutputError(f"{path.parent}: cannot write here ({exc.strerror})") from None
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~_umask())
    return fd, Path(tmp)


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """A small file written beside `path` and renamed over it: readers see the old or the new one."""
    path = Path(path)
    fd, tmp = temp_file_next_to(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise OutputError(f"{path}: write failed ({exc.strerror})") from None
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace_existing: bool) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it takes `path`'s place.

    An existing directory is moved aside first and removed only once the new one is in place, so
    a failure at any point leaves the old one (or nothing) there.
    """
    path = Path(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except FileNotFoundError:
        raise OutputError(f"{path.parent}: output directory does not exist") from None
    except OSError as exc:
        raise OutputError(f"{path.parent}: cannot write here ({exc.strerror})") from None
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700, as for files: DEST gets mkdir's permissions
        yield tmp
        old = None
        if path.exists() or path.is_symlink():
            if not replace_existing:
                raise OutputError(f"{path}: exists (use --force to replace it)")
            if _exchange(tmp, path):  # one atomic step: no moment without a DEST, even under SIGKILL
                fsync_dir(path.parent)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old")) / "old"
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
