"""Backing tier on disk: one file per offloaded tensor's state, read and written by a pool of background threads.

The pool has ``io_threads`` threads (:data:`DEFAULT_IO_THREADS`, 4, by default), so that several reads and
write-backs are in flight at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lightning_grass.byte_size import format_bytes
from lightning_grass.errors import SettingTypeError, SettingValueError, StorageError
from lightning_grass.offload.transfer import TensorSpec, Transfer
from lightning_grass.setting_checks import check_int

log = logging.getLogger(__name__)

# Ending of the name a state file is written under before it is renamed into place.
_TEMPORARY_SUFFIX = ".tmp"

#: How the name of each tier's folder starts, in the parent folder (``offload_dir``).
FOLDER_PREFIX = "grass-offload-"

#: The file in each tier's folder that its owner holds an exclusive ``flock`` on while the tier is open.
OWNER_LOCK = ".owner.lock"

#: Reads and writes the disk tier runs at once: a few tensors of prefetch and their write-backs.
DEFAULT_IO_THREADS = 4


def check_offload_dir(offload_dir: object) -> None:
    """Refuse an ``offload_dir`` setting that is neither a path nor ``None``, before any work.

    Raises:
        SettingTypeError: For any other type.
    """
    if offload_dir is not None and not isinstance(offload_dir, (str, os.PathLike)):
        raise SettingTypeError(
            f"offload_dir={offload_dir!r} must be a folder path (a string or a pathlib.Path) or None for the "
            "system temp folder"
        )


class DiskTier:
    """Keeps each offloaded tensor's optimizer state in one file, like ZeRO-Infinity's NVMe tier.

    Reads and writes run on a pool of background threads (``io_threads``), so they overlap with compute on the
    main thread and with each other (file I/O releases the GIL): with prefetch several tensors deep, the next
    fetches and the last write-backs are served at once rather than queued behind one another. The store never
    reads and writes one tensor's file at the same time: a fetch waits for that tensor's write-back. Files are
    written and read with plain ``write``/``readinto`` into freshly allocated tensors rather than memory-mapped:
    pages of a mapped file that were touched would count as the process's resident memory, which is what this
    tier exists to reduce. The operating system's page cache may still keep recently written states in RAM; it
    gives that memory back under pressure.

    A state file is written under a temporary name in the same folder, then renamed over the previous one
    (``os.replace``, atomic within a filesystem), so a write that fails half-way (a full disk) leaves the
    previous file whole and no temporary file behind. Nothing is fsynced: the folder is scratch space,
    deleted at teardown and never read after a crash (checkpoints hold every state), and an fsync per tensor
    per write-back would add disk latency that the step waits on.

    Each tier makes its own folder, ``grass-offload-*`` in ``directory``, and holds an exclusive ``flock`` on the
    lock file in it (:data:`OWNER_LOCK`) until :meth:`close` deletes the folder. A process killed before then
    (SIGKILL, an out-of-memory kill) leaves its folder behind, but the operating system releases its lock. So a
    new tier first deletes every ``grass-offload-*`` folder in ``directory`` that a process of this machine made
    and whose lock it can take: that of a dead process, which no run reads again (checkpoints hold every
    state). It keeps those whose lock is held (a live run, another rank's tier), those without a lock file (a
    tier being created, which locks its file before giving it that name, or one left by a version without
    locks), and those of other machines (on a shared filesystem, locks may not reach across machines). Then it
    refuses a disk without room for ``unit_bytes``.

    A read or write that fails (a full disk, a folder deleted while the run uses it) raises
    :class:`~lightning_grass.errors.StorageError` from its transfer's ``wait()``, on the thread that waits,
    naming the folder, the bytes and the operating system's reason. :meth:`close` never raises it again.

    States on an accelerator are staged through host memory: a write-back first copies them to the host
    (synchronously), a fetch reads into host memory in the background and copies to the device when it is
    waited for. That serves GPU users who are short of host RAM; with enough RAM, :class:`HostTier` is faster.

    Args:
        directory: Where to create this run's folder of state files. ``None`` uses the system temp folder.
        io_threads: Reads and writes in flight at once.
        unit_bytes: The bytes of each unit's state once it has been written, as for :class:`HostTier`; their sum
            must fit in the free space of ``directory``'s disk.

    Raises:
        SettingTypeError: If ``directory`` is not a path, or ``io_threads`` is not an int.
        SettingValueError: If ``directory`` cannot be created or written to, its disk has less free space than
            ``unit_bytes`` add up to, or ``io_threads`` is below 1.
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        io_threads: int = DEFAULT_IO_THREADS,
        unit_bytes: Sequence[int] = (),
    ) -> None:
        check_offload_dir(directory)
        check_int("io_threads", io_threads, minimum=1)
        parent = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        try:
            parent.mkdir(parents=True, exist_ok=True)
            _remove_abandoned_folders(parent)
            _check_free_space(parent, sum(unit_bytes))
            self.directory, self._lock = _make_locked_folder(parent)
        except OSError as error:
            raise SettingValueError(
                f"offload_dir={str(parent)!r} is not a writable directory ({error.strerror}); choose a folder this "
                "process can create files in"
            ) from error
        self._executor = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="grass-disk-tier")
        self._layouts: dict[int, list[TensorSpec]] = {}

    def write(self, unit: int, tensors: list[torch.Tensor]) -> Transfer:
        """Start writing ``tensors`` to the file of ``unit``.

        Device tensors are copied to the host before this returns, so their memory is released at once; CPU
        tensors are written from where they are and stay referenced until the transfer is done.

        The transfer's ``wait()`` raises :class:`~lightning_grass.errors.StorageError` if the write failed; the
        file then still holds its previous state.
        """
        self._layouts[unit] = [TensorSpec.of(t) for t in tensors]
        on_host = [t if t.device.type == "cpu" else t.to("cpu") for t in tensors]
        future = self._executor.submit(self._write_file, self._path(unit), on_host)
        staged = any(t.device.type != "cpu" for t in tensors)
        return Transfer.from_future(future, released=(lambda: True) if staged else None)

    def read(self, unit: int, specs: list[TensorSpec]) -> tuple[list[torch.Tensor], Transfer]:
        """Allocate resident tensors for ``specs`` and start filling them from the file of ``unit``.

        Tensors on an accelerator are read into host memory first and copied to the device by ``wait()``; a fetch
        that is discarded unused (``discard()``) waits only for the file read, and never copies.

        The transfer's ``wait()`` (and ``discard()``) raises :class:`~lightning_grass.errors.StorageError` if the
        read failed.
        """
        tensors = [torch.empty(spec.shape, dtype=spec.dtype, device=spec.device) for spec in specs]
        staged = [t if t.device.type == "cpu" else torch.empty_like(t, device="cpu") for t in tensors]
        future = self._executor.submit(self._read_file, self._path(unit), staged)

        def wait() -> None:
            future.result()
            _copy_staged(tensors, staged)

        return tensors, Transfer(wait=wait, done=future.done, discard=future.result)

    def read_to_cpu(self, unit: int) -> list[torch.Tensor]:
        """The tensors of ``unit`` on the CPU, read synchronously, for checkpoints.

        Raises:
            StorageError: If the file cannot be read.
        """
        specs = [TensorSpec(spec.shape, spec.dtype, torch.device("cpu")) for spec in self._layouts[unit]]
        tensors, transfer = self.read(unit, specs)
        transfer.wait()
        return tensors

    def backing_bytes(self) -> int:
        """Bytes held in state files."""
        return sum(spec.nbytes for specs in self._layouts.values() for spec in specs)

    def close(self) -> None:
        """Finish pending I/O, stop the I/O thread and delete this run's folder. Never raises.

        A read or write that failed has raised, or will raise, at its transfer's ``wait()``.
        """
        self._executor.shutdown(wait=True)
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)  # after the folder is gone: no other tier takes it for a dead run's meanwhile
            self._lock = None
        self._layouts.clear()

    def _path(self, unit: int) -> Path:
        return self.directory / f"state_{unit:05d}.bin"

    def _write_file(self, path: Path, tensors: list[torch.Tensor]) -> None:
        """Write ``tensors`` to a temporary file next to ``path``, then rename it over ``path``."""
        temporary = path.with_name(path.name + _TEMPORARY_SUFFIX)
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for tensor in tensors:
                    _write_all(descriptor, _raw_bytes(tensor))
            finally:
                os.close(descriptor)
            os.replace(temporary, path)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            raise self._storage_error("writing", "to", nbytes, error) from error

    def _read_file(self, path: Path, tensors: list[torch.Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        try:
            with open(path, "rb") as file:
                got = sum(file.readinto(_raw_bytes(tensor)) for tensor in tensors)
        except OSError as error:
            raise self._storage_error("reading", "from", nbytes, error) from error
        if got != nbytes:
            raise StorageError(
                f"the offload file {path} holds {got} of the {nbytes} bytes of optimizer state it should; something "
                f"else wrote to the folder {self.directory}. Keep offload_dir for this run alone"
            )

    def _storage_error(self, action: str, preposition: str, nbytes: int, error: OSError) -> StorageError:
        """One line for a failed read or write: the folder, the bytes, the system's reason and what to do."""
        reason = error.strerror or str(error)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = f"free at least {format_bytes(nbytes)} there, or pass an offload_dir on a disk with more room"
        elif not self.directory.is_dir():
            fix = (
                "the folder was deleted while the run was using it (a temp-folder cleaner?); pass an offload_dir "
                "that nothing else cleans up"
            )
        else:
            fix = "check that this process can still read and write there, or pass another offload_dir"
        return StorageError(
            f"{action} {nbytes} bytes of optimizer state {preposition} the offload folder {self.directory} "
            f"failed: {reason}; {fix}"
        )


def _make_locked_folder(parent: Path) -> tuple[Path, int]:
    """Create a tier folder in ``parent`` with its lock file held, and the descriptor that holds it until closed.

    The lock file is locked under a temporary name and then renamed into place, so a tier cleaning up never finds
    the lock file of a live tier unlocked. On failure the folder is deleted again.
    """
    folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=parent))
    temporary = folder / (OWNER_LOCK + _TEMPORARY_SUFFIX)
    try:
        descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(descriptor, _owner().encode())
            os.rename(temporary, folder / OWNER_LOCK)
        except OSError:
            os.close(descriptor)
            raise
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, descriptor


def _owner() -> str:
    """What a lock file says about its owner: ``"pid 1234 on node-7"``."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _remove_abandoned_folders(parent: Path) -> None:
    """Delete the tier folders in ``parent`` that a dead process of this machine left: their lock is not held."""
    for folder in sorted(parent.glob(FOLDER_PREFIX + "*")):
        try:
            descriptor = os.open(folder / OWNER_LOCK, os.O_RDONLY)
        except OSError:
            continue  # not a tier's folder, one being created, one without a lock, or one deleted meanwhile
        try:
            owner = _dead_owner(descriptor)
            if owner is not None:
                _remove_folder(folder, owner)
        finally:
            os.close(descriptor)


def _dead_owner(descriptor: int) -> str | None:
    """The owner a lock file names if it was a process of this machine that has died (its lock is free)."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        owner = os.pread(descriptor, 256, 0).decode(errors="replace")
    except OSError:
        return None  # held by a live tier, or the filesystem cannot lock
    return owner if owner.endswith(f" on {socket.gethostname()}") else None


def _remove_folder(folder: Path, owner: str) -> None:
    """Delete the folder a dead tier left; a folder that cannot be deleted is logged, never raised."""
    try:
        size = sum(path.stat().st_size for path in folder.iterdir())
        shutil.rmtree(folder)
    except OSError as error:
        log.warning("could not delete the offload folder %s that a killed run (%s) left: %s", folder, owner, error)
    else:
        log.info(
            "deleted the offload folder %s that a killed run (%s) left, freeing %s", folder, owner, format_bytes(size)
        )


def _check_free_space(parent: Path, needed: int) -> None:
    """Refuse a disk tier in ``parent`` when its disk has less free space than the ``needed`` bytes."""
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise SettingValueError(
            f"offload_dir={str(parent)!r} has {format_bytes(free)} free, but the offloaded optimizer states need "
            f"about {format_bytes(needed)} once every offloaded tensor has been trained; free space there or "
            "choose another offload_dir"
        )


def _copy_staged(tensors: list[torch.Tensor], staged: list[torch.Tensor]) -> None:
    """Copy the host tensors a read was staged in to the device tensors they stand for (a blocking copy)."""
    for tensor, host in zip(tensors, staged, strict=True):
        if tensor is not host:
            tensor.copy_(host)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _write_all(descriptor: int, data: memoryview) -> None:
    """Write all of ``data`` to the file ``descriptor``: ``os.write`` may write only part of it per call."""
    while len(data):
        data = data[os.write(descriptor, data) :]
