"""Backing tier in host memory: pinned buffers and a dedicated copy stream when the states live on CUDA."""

from __future__ import annotations

import torch

from lightning_grass.offload.transfer import TensorSpec, Transfer


class HostTier:
    """Keeps each offloaded state tensor in a host buffer of its own, reused for every write-back.

    On CUDA the buffers are pinned, so host-device copies run asynchronously on a dedicated copy stream and
    overlap with compute on the default stream. Events order the two streams: a fetch's copy waits for the
    allocation made on the compute stream, and the compute stream waits for the fetch before the optimizer
    touches the tensors; a write-back waits for the compute stream's last use of the tensor, and the
    device memory is only handed back once the copy stream has finished reading it (``record_stream``).
    Pinned memory is page-locked: it speeds up transfers but cannot be swapped, so it costs real RAM.

    For tensors on the CPU (and on a CPU-only run) the copies are plain synchronous ``copy_`` calls; that
    configuration has no memory benefit and exists so the whole offload path can be exercised on a CPU.

    Args:
        device: The compute device the resident states live on.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[int, list[torch.Tensor]] = {}
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def write(self, unit: int, tensors: list[torch.Tensor]) -> Transfer:
        """Start copying ``tensors`` into the backing buffers of ``unit``.

        The caller must keep ``tensors`` alive until the returned transfer is done.
        """
        buffers = self._buffers.get(unit)
        if buffers is None or [tuple(b.shape) for b in buffers] != [tuple(t.shape) for t in tensors]:
            buffers = [self._empty_host(t) for t in tensors]
            self._buffers[unit] = buffers
        if self._stream is None:
            for buffer, tensor in zip(buffers, tensors, strict=True):
                buffer.copy_(tensor)
            return Transfer()
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for buffer, tensor in zip(buffers, tensors, strict=True):
                buffer.copy_(tensor, non_blocking=tensor.is_cuda)
                if tensor.is_cuda:
                    tensor.record_stream(self._stream)
            event = torch.cuda.Event()
            event.record(self._stream)
        return Transfer(wait=event.synchronize, done=event.query)

    def read(self, unit: int, specs: list[TensorSpec]) -> tuple[list[torch.Tensor], Transfer]:
        """Allocate resident tensors for ``specs`` and start filling them from the backing buffers of ``unit``.

        The tensors may only be used after the returned transfer is done; on CUDA the compute stream is made
        to wait for the copy, so kernels queued after ``wait()`` see the data.
        """
        buffers = self._buffers[unit]
        tensors = [torch.empty(spec.shape, dtype=spec.dtype, device=spec.device) for spec in specs]
        if self._stream is None:
            for tensor, buffer in zip(tensors, buffers, strict=True):
                tensor.copy_(buffer)
            return tensors, Transfer()
        compute = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            for tensor, buffer in zip(tensors, buffers, strict=True):
                tensor.copy_(buffer, non_blocking=tensor.is_cuda)
            event = torch.cuda.Event()
            event.record(self._stream)

        def wait() -> None:
            compute.wait_event(event)

        return tensors, Transfer(wait=wait, done=event.query)

    def read_to_cpu(self, unit: int) -> list[torch.Tensor]:
        """Copies of the backing tensors of ``unit`` on the CPU, for checkpoints."""
        return [buffer.clone() for buffer in self._buffers[unit]]

    def backing_bytes(self) -> int:
        """Bytes held in backing buffers."""
        return sum(b.numel() * b.element_size() for buffers in self._buffers.values() for b in buffers)

    def close(self) -> None:
        """Wait for copies in flight and free every buffer."""
        if self._stream is not None:
            self._stream.synchronize()
        self._buffers.clear()

    def _empty_host(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=self._stream is not None)
