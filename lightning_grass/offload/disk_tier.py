"""Backing tier on disk: one file per offloaded tensor's state, read and written by a background I/O thread."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lightning_grass.byte_size import format_bytes
from lightning_grass.errors import SettingTypeError, SettingValueError, StorageError
from lightning_grass.offload.transfer import TensorSpec, Transfer

# Ending of the name a state file is written under before it is renamed into place.
_TEMPORARY_SUFFIX = ".tmp"

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

    A read or write that fails (a full disk, a folder deleted while the run uses it) raises
    :class:`~lightning_grass.errors.StorageError` from its transfer's ``wait()``, on the thread that waits,
    naming the folder, the bytes and the operating system's reason. :meth:`close` never raises it again.

    States on an accelerator are staged through host memory: a write-back first copies them to the host
    (synchronously), a fetch reads into host memory in the background and copies to the device when it is
    waited for. That serves GPU users who are short of host RAM; with enough RAM, :class:`HostTier` is faster.

    Args:
        directory: Where to create this run's folder of state files. ``None`` uses the system temp folder.
        io_threads: Reads and writes in flight at once.

    Raises:
        SettingTypeError: If ``directory`` is not a path.
        SettingValueError: If ``directory`` cannot be created or written to, or ``io_threads`` is below 1.
    """

    def __init__(self, directory: str | os.PathLike | None = None, io_threads: int = DEFAULT_IO_THREADS) -> None:
        check_offload_dir(directory)
        if isinstance(io_threads, bool) or not isinstance(io_threads, int) or io_threads < 1:
            raise SettingValueError(f"io_threads={io_threads!r} must be an int >= 1 (reads and writes at once)")
        parent = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.directory = Path(tempfile.mkdtemp(prefix="grass-offload-", dir=parent))
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

        The transfer's ``wait()`` raises :class:`~lightning_grass.errors.StorageError` if the read failed.
        """
        tensors = [torch.empty(spec.shape, dtype=spec.dtype, device=spec.device) for spec in specs]
        staged = [t if t.device.type == "cpu" else torch.empty_like(t, device="cpu") for t in tensors]
        future = self._executor.submit(self._read_file, self._path(unit), staged)

        def wait() -> None:
            future.result()
            for tensor, host in zip(tensors, staged, strict=True):
                if tensor is not host:
                    tensor.copy_(host)

        return tensors, Transfer(wait=wait, done=future.done)

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


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _write_all(descriptor: int, data: memoryview) -> None:
    """Write all of ``data`` to the file ``descriptor``: ``os.write`` may write only part of it per call."""
    while len(data):
        data = data[os.write(descriptor, data) :]
