"""Backing tier in host memory: one buffer sized up front, pinned on CUDA, and a copy stream per direction."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_grass.offload.transfer import TensorSpec, Transfer

#: Page size that pinned buffers are aligned to; ``cudaHostRegister`` locks whole pages.
_PAGE_BYTES = 4096

#: Alignment of each unit's region in the shared buffer: enough for every 4-byte dtype that states use.
_REGION_ALIGNMENT = 4


class HostTier:
    """Keeps each offloaded state tensor in host memory, in a region of one buffer allocated up front.

    The buffer's size is the sum of the units' state sizes, known before training from the optimizer
    (:func:`~lightning_grass.offload.expected_state_bytes`), so no host memory is allocated during a step.
    On CUDA it is page-locked with ``cudaHostRegister``, which locks exactly its pages; pinned tensors from
    torch's caching host allocator would each be rounded up to a power of two (a 46 MB state taking 64 MiB).
    :meth:`backing_bytes` is the buffer's size, the RAM the tier locks. A unit whose state turns out larger
    than its region (an optimizer whose state the arithmetic does not know) gets a buffer of its own, pinned
    the same way, at its first write-back.

    On CUDA, copies run on two copy streams, one per direction (a GPU has a copy engine for each), so a
    write-back never queues behind the next fetch. Events order the streams: a fetch's copy waits for the
    compute stream (which allocated its tensors) and for the unit's last write-back; the compute stream waits
    for the fetch before the optimizer touches the tensors; a write-back waits for the compute stream's last
    use of the tensors, and ``record_stream`` keeps their device memory from being reused until the copy has
    read it, so the caller may drop its references as soon as :meth:`write` returns.

    For tensors on the CPU (and on a CPU-only run) the copies are plain synchronous ``copy_`` calls into an
    unpinned buffer; that configuration has no memory benefit and exists so the whole offload path can be
    exercised on a CPU.

    Args:
        device: The compute device the resident states live on.
        unit_bytes: Bytes of each unit's state, indexed by unit. Units beyond it get buffers of their own.

    Raises:
        RuntimeError: If CUDA cannot lock the buffer (``cudaHostRegister`` failed, e.g. the RAM is not there).
    """

    def __init__(self, device: torch.device, unit_bytes: Sequence[int] = ()) -> None:
        self.device = device
        self._pinned = device.type == "cuda"
        sizes = [_align(size, _REGION_ALIGNMENT) for size in unit_bytes]
        starts = list(itertools.accumulate(sizes, initial=0))[:-1]
        self._regions = dict(enumerate(zip(starts, sizes, strict=True)))
        self._slab = self._allocate(sum(sizes))
        self._own: dict[int, Tensor] = {}
        self._buffers: dict[int, list[Tensor]] = {}
        self._written: dict[int, torch.cuda.Event] = {}
        self._to_host = torch.cuda.Stream(device) if self._pinned else None
        self._to_device = torch.cuda.Stream(device) if self._pinned else None

    def write(self, unit: int, tensors: list[Tensor]) -> Transfer:
        """Start copying ``tensors`` into the backing region of ``unit``.

        On CUDA the device memory stays reserved for the copy (``record_stream``) after the caller lets go of
        the tensors; the returned transfer is done (and released) when the copy has read them.
        """
        buffers = self._buffers_for(unit, tensors)
        if self._to_host is None:
            for buffer, tensor in zip(buffers, tensors, strict=True):
                buffer.copy_(tensor)
            return Transfer()
        self._to_host.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._to_host):
            for buffer, tensor in zip(buffers, tensors, strict=True):
                buffer.copy_(tensor, non_blocking=tensor.is_cuda)
                if tensor.is_cuda:
                    tensor.record_stream(self._to_host)
            event = torch.cuda.Event()
            event.record(self._to_host)
        self._written[unit] = event
        return Transfer(wait=event.synchronize, done=event.query)

    def read(self, unit: int, specs: list[TensorSpec]) -> tuple[list[Tensor], Transfer]:
        """Allocate resident tensors for ``specs`` and start filling them from the backing region of ``unit``.

        The tensors may only be used after the returned transfer is done; on CUDA the compute stream is made
        to wait for the copy, so kernels queued after ``wait()`` see the data.
        """
        buffers = self._buffers[unit]
        tensors = [torch.empty(spec.shape, dtype=spec.dtype, device=spec.device) for spec in specs]
        if self._to_device is None:
            for tensor, buffer in zip(tensors, buffers, strict=True):
                tensor.copy_(buffer)
            return tensors, Transfer()
        compute = torch.cuda.current_stream(self.device)
        self._to_device.wait_stream(compute)
        written = self._written.get(unit)
        if written is not None:
            self._to_device.wait_event(written)
        with torch.cuda.stream(self._to_device):
            for tensor, buffer in zip(tensors, buffers, strict=True):
                tensor.copy_(buffer, non_blocking=tensor.is_cuda)
            event = torch.cuda.Event()
            event.record(self._to_device)

        def wait() -> None:
            compute.wait_event(event)

        return tensors, Transfer(wait=wait, done=event.query)

    def read_to_cpu(self, unit: int) -> list[Tensor]:
        """Copies of the backing tensors of ``unit`` on the CPU, for checkpoints."""
        written = self._written.get(unit)
        if written is not None:
            written.synchronize()
        return [buffer.clone() for buffer in self._buffers[unit]]

    def backing_bytes(self) -> int:
        """Bytes of host memory the tier holds (locked, on CUDA): the shared buffer and any of a unit's own."""
        return self._slab.numel() + sum(buffer.numel() for buffer in self._own.values())

    def close(self) -> None:
        """Wait for copies in flight and free every buffer (on CUDA, unlocked and returned to the system)."""
        for stream in (self._to_host, self._to_device):
            if stream is not None:
                stream.synchronize()
        for buffer in [self._slab, *self._own.values()]:
            self._free(buffer)
        self._slab = torch.empty(0, dtype=torch.uint8)
        self._own.clear()
        self._buffers.clear()
        self._regions.clear()
        self._written.clear()

    def _buffers_for(self, unit: int, tensors: list[Tensor]) -> list[Tensor]:
        """The backing views of ``unit`` for tensors shaped like ``tensors``: its region, or a buffer of its own."""
        buffers = self._buffers.get(unit)
        if buffers is not None and [(b.shape, b.dtype) for b in buffers] == [(t.shape, t.dtype) for t in tensors]:
            return buffers
        start, size = self._regions.get(unit, (0, 0))
        buffers = _views(self._slab, start, size, tensors)
        if buffers is None:
            needed = _layout_bytes(tensors)
            if unit in self._own:
                if self._to_host is not None:
                    self._to_host.synchronize()
                self._free(self._own.pop(unit))
            self._own[unit] = self._allocate(needed)
            buffers = _views(self._own[unit], 0, needed, tensors)
            assert buffers is not None
        self._buffers[unit] = buffers
        return buffers

    def _allocate(self, nbytes: int) -> Tensor:
        """``nbytes`` of host memory; on CUDA page-aligned and locked with ``cudaHostRegister``."""
        if not self._pinned or nbytes == 0:
            return torch.empty(nbytes, dtype=torch.uint8)
        raw = torch.empty(nbytes + _PAGE_BYTES, dtype=torch.uint8)
        start = -raw.data_ptr() % _PAGE_BYTES
        buffer = raw[start : start + nbytes]
        error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0))
        if error != 0:
            raise RuntimeError(
                f"cudaHostRegister could not lock {nbytes} bytes of host memory for offloaded optimizer states "
                f"(CUDA error {error}); free RAM, set max_resident_bytes, or use offload='disk'"
            )
        return buffer

    def _free(self, buffer: Tensor) -> None:
        if self._pinned and buffer.numel():
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


def _align(offset: int, alignment: int) -> int:
    return offset + (-offset % alignment)


def _layout_bytes(tensors: list[Tensor]) -> int:
    """Bytes that ``tensors`` take laid out one after another, each aligned to its element size."""
    end = 0
    for tensor in tensors:
        end = _align(end, tensor.element_size()) + tensor.numel() * tensor.element_size()
    return end


def _views(storage: Tensor, start: int, size: int, tensors: list[Tensor]) -> list[Tensor] | None:
    """Views of ``storage[start:start + size]`` shaped like ``tensors``, or ``None`` if they do not fit."""
    views = []
    offset = start
    for tensor in tensors:
        offset = _align(offset, tensor.element_size())
        nbytes = tensor.numel() * tensor.element_size()
        if offset + nbytes > start + size:
            return None
        views.append(storage[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape))
        offset += nbytes
    return views
