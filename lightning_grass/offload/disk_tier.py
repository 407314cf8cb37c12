"""Backing tier on disk: one file per offloaded tensor's state, read and written by a background I/O thread."""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lightning_grass.errors import SettingValueError
from lightning_grass.offload.transfer import TensorSpec, Transfer


class DiskTier:
    """Keeps each offloaded tensor's optimizer state in one file, like ZeRO-Infinity's NVMe tier.

    Reads and writes run on a single background thread, so they overlap with compute on the main thread
    (file I/O releases the GIL). Files are written and read with plain ``write``/``readinto`` into freshly
    allocated tensors rather than memory-mapped: pages of a mapped file that were touched would count as
    the process's resident memory, which is what this tier exists to reduce. The operating system's page
    cache may still keep recently written states in RAM; it gives that memory back under pressure.

    States on an accelerator are staged through host memory: a write-back first copies them to the host
    (synchronously), a fetch reads into host memory in the background and copies to the device when it is
    waited for. That serves GPU users who are short of host RAM; with enough RAM, :class:`HostTier` is faster.

    Args:
        directory: Where to create this run's folder of state files. ``None`` uses the system temp folder.

    Raises:
        SettingValueError: If ``directory`` cannot be created or written to.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        parent = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.directory = Path(tempfile.mkdtemp(prefix="grass-offload-", dir=parent))
        except OSError as error:
            raise SettingValueError(
                f"offload_dir={str(parent)!r} is not a writable directory ({error.strerror}); choose a folder this "
                "process can create files in"
            ) from error
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grass-disk-tier")
        self._layouts: dict[int, list[TensorSpec]] = {}

    def write(self, unit: int, tensors: list[torch.Tensor]) -> Transfer:
        """Start writing ``tensors`` to the file of ``unit``; keep them alive until the transfer is done."""
        self._layouts[unit] = [TensorSpec.of(t) for t in tensors]
        on_host = [t if t.device.type == "cpu" else t.to("cpu") for t in tensors]
        return Transfer.from_future(self._executor.submit(_write_file, self._path(unit), on_host))

    def read(self, unit: int, specs: list[TensorSpec]) -> tuple[list[torch.Tensor], Transfer]:
        """Allocate resident tensors for ``specs`` and start filling them from the file of ``unit``."""
        tensors = [torch.empty(spec.shape, dtype=spec.dtype, device=spec.device) for spec in specs]
        staged = [t if t.device.type == "cpu" else torch.empty_like(t, device="cpu") for t in tensors]
        future = self._executor.submit(_read_file, self._path(unit), staged)

        def wait() -> None:
            future.result()
            for tensor, host in zip(tensors, staged, strict=True):
                if tensor is not host:
                    tensor.copy_(host)

        return tensors, Transfer(wait=wait, done=future.done)

    def read_to_cpu(self, unit: int) -> list[torch.Tensor]:
        """The tensors of ``unit`` on the CPU, read synchronously, for checkpoints."""
        specs = [TensorSpec(spec.shape, spec.dtype, torch.device("cpu")) for spec in self._layouts[unit]]
        tensors, transfer = self.read(unit, specs)
        transfer.wait()
        return tensors

    def backing_bytes(self) -> int:
        """Bytes held in state files."""
        return sum(spec.nbytes for specs in self._layouts.values() for spec in specs)

    def close(self) -> None:
        """Finish pending I/O, stop the I/O thread and delete this run's folder."""
        self._executor.shutdown(wait=True)
        shutil.rmtree(self.directory, ignore_errors=True)
        self._layouts.clear()

    def _path(self, unit: int) -> Path:
        return self.directory / f"state_{unit:05d}.bin"


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _write_file(path: Path, tensors: list[torch.Tensor]) -> None:
    with open(path, "wb") as file:
        for tensor in tensors:
            file.write(_raw_bytes(tensor))


def _read_file(path: Path, tensors: list[torch.Tensor]) -> None:
    with open(path, "rb") as file:
        for tensor in tensors:
            view = _raw_bytes(tensor)
            if file.readinto(view) != len(view):
                raise OSError(f"offload file {path} is shorter than the state it should hold")
