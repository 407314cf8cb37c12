"""Write files and directories so that a kill or a full disk at any instant leaves the previous version whole.

A file is written to a temporary name in its own directory, flushed and fsynced, then renamed over the old
one, and the directory is fsynced. The rename is atomic on every POSIX filesystem (NFS and Lustre included)
because both names are in one directory; nothing is staged in the system temp folder, whose move onto another
filesystem would be a copy that truncates the destination first. A write that fails removes its temporary
file and raises :class:`~lightning_grass.errors.StorageError`, naming the file, the reason and the bytes it
needed. A process killed while writing leaves its temporary file behind; the next write to the same path from
this host removes the leftovers of processes that no longer run.

Temporary names are ``.<name>.<host>.<pid>.<random>.tmp``, hidden and distinct per writer.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from lightning_grass.errors import StorageError

#: The errors of a directory that is full, gone or not writable: reported as a StorageError.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.EROFS, errno.EACCES, errno.EIO})

#: The errors of a filesystem that does not let a file's permissions change: the write goes on without.
CHMOD_REFUSED_ERRNOS = frozenset({errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP})

_RENAME_EXCHANGE = 2


def write_bytes_atomically(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Replace ``path`` with ``data`` atomically (see the module docstring).

    Args:
        path: The file to write; its directory is created if needed.
        data: The new content.

    Raises:
        StorageError: As :func:`write_atomically`; ``path`` is then unchanged.
    """
    write_atomically(path, lambda file: file.write(data), size=len(data))


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically; see :func:`write_bytes_atomically`."""
    write_bytes_atomically(path, text.encode("utf-8"))


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object], size: int | None = None) -> None:
    """Replace ``path`` with what ``write`` writes to an open binary file, atomically.

    Args:
        path: The file to write; its directory is created if needed.
        write: Called once with the temporary file open for writing.
        size: The bytes it will write, for the error message; ``None`` if unknown.

    Raises:
        StorageError: When the directory is full, gone or not writable, or ``path`` is a directory; ``path`` is
            then unchanged.
    """
    path = Path(path)
    if path.is_dir():
        raise StorageError(f"cannot write {path}: it is a directory, not a file; move it away and run again")
    temporary = _new_temporary(path, directory=False, size=size)
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            raise _storage_error(path, error, size) from error
        raise


def replace_directory_atomically(path: str | os.PathLike, build: Callable[[Path], object]) -> None:
    """Replace the directory ``path`` with one that ``build`` fills, so that ``path`` is never half-written.

    ``build`` writes into a temporary sibling directory. Its files are fsynced, then it takes the place of
    ``path``: by an atomic exchange of the two names where Linux offers one (``renameat2``), otherwise by
    two renames, between which ``path`` is briefly absent but the old version still exists under the
    temporary name.

    Args:
        path: The directory to write.
        build: Called once with the (empty) temporary directory.

    Raises:
        StorageError: When the parent is full, gone or not writable; ``path`` is then unchanged.
    """
    path = Path(path)
    staging = _new_temporary(path, directory=True)
    try:
        build(staging)
        for file in sorted(p for p in staging.rglob("*") if p.is_file()):
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if not path.exists():
            os.replace(staging, path)
        elif _exchange(staging, path):
            shutil.rmtree(staging)
        else:
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp"))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old)
        _fsync_directory(path.parent)
    except BaseException as error:
        written = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) if staging.exists() else None
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            raise _storage_error(path, error, written, partial=True) from error
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of ``path`` left by killed writers on this host.

    Args:
        path: A file or directory written by this module.

    Returns:
        The temporaries removed: those named for this host whose process no longer runs.
    """
    path = Path(path)
    removed = []
    host = _host()
    for candidate in path.parent.glob(f".{path.name}.{host}.*.tmp"):
        pid = candidate.name[len(f".{path.name}.{host}.") :].split(".", 1)[0]
        if not pid.isdigit() or _process_runs(int(pid)):
            continue
        if candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _new_temporary(path: Path, directory: bool, size: int | None = None) -> Path:
    """An empty temporary file or directory beside ``path``, with ordinary permissions; stale ones removed first.

    Raises:
        StorageError: When the parent cannot be created or written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        if directory:
            temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp"))
        else:
            descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
            os.close(descriptor)
            temporary = Path(name)
        _open_permissions(temporary, 0o777 if directory else 0o666)
    except OSError as error:
        raise _storage_error(path, error, size) from error
    return temporary


def _open_permissions(temporary: Path, mode: int) -> None:
    """Give ``temporary`` the permissions of an ordinary write, where the filesystem lets permissions change.

    Temporaries start private (``mkstemp``, ``mkdtemp``). Some network and FUSE filesystems refuse ``chmod``
    and give every file the mount's permissions; there the temporary keeps them, as a file Lightning's own
    plugin writes would.
    """
    try:
        os.chmod(temporary, _permissions(mode))
    except OSError as error:
        if error.errno not in CHMOD_REFUSED_ERRNOS:
            raise


def _permissions(mode: int) -> int:
    """``mode`` under the process's umask: what ``open`` or ``mkdir`` would give (temporaries start private)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{_host()}.{os.getpid()}."


def _host() -> str:
    return socket.gethostname().replace(".", "-") or "host"


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(descriptor)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically with Linux's ``renameat2``; ``False`` where it is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _storage_error(path: Path, error: OSError, size: int | None, partial: bool = False) -> StorageError:
    if size is None:
        needed = ""
    elif partial:
        needed = f" (after {size:,} bytes had been written)"
    else:
        needed = f" ({size:,} bytes to write)"
    return StorageError(
        f"cannot write {path}: {error.strerror or error}{needed}; the previous version of {path.name}, if any, "
        f"is intact. Free space in {path.parent} (or fix its permissions) and run again"
    )
