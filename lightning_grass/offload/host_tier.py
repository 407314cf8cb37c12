"""Backing tier in host memory: one buffer sized up front, page-locked on CUDA, and a copy stream per direction.

On CUDA the buffers are page-locked with ``cudaHostRegister`` where it works, which :func:`host_registration_works`
finds out once per process, and come from torch's pinned allocator where it does not.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_grass.byte_size import format_bytes
from lightning_grass.offload.state_bytes import ADAMW_MOMENTS
from lightning_grass.offload.transfer import TensorSpec, Transfer

log = logging.getLogger(__name__)

#: Page size that registered buffers are aligned to; ``cudaHostRegister`` locks whole pages.
_PAGE_BYTES = 4096

#: Alignment of each unit's region in the shared buffer, and of each tensor within a region (or a unit's own
#: buffer): the copy engines move 512-byte-aligned memory fastest, and device tensors from torch's caching
#: allocator start on 512-byte boundaries too. It is a multiple of every element size.
_ALIGNMENT = 512

#: Tensors per unit that a region is sized for when the tier is not told: AdamW's two moments and step counter,
#: as :func:`~lightning_grass.offload.expected_state_bytes` assumes for optimizers it does not know.
DEFAULT_UNIT_TENSORS = ADAMW_MOMENTS + 1

#: :attr:`HostTier.pinning` when buffers are page-locked with ``cudaHostRegister``.
REGISTERED = "cudaHostRegister"

#: :attr:`HostTier.pinning` when buffers come from torch's pinned allocator (``pin_memory=True``).
PINNED_ALLOCATOR = "torch pinned allocator"

#: What :func:`host_registration_works` found, once per process.
_probed: tuple[bool, str] | None = None

#: Host memory whose unregistration failed during the probe: kept for the life of the process, so that no later
#: registration meets pages that CUDA may still hold.
_never_freed: list[Tensor] = []


def host_registration_works(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether ``cudaHostRegister`` can page-lock host memory in this process, and a short reason.

    The first call on a CUDA device registers and unregisters one page of host memory; later calls return its
    answer without touching CUDA. A registration that fails leaves CUDA's last error set, which the next kernel
    launch would report as its own failure, so the error is cleared before this returns. Some drivers (a
    sandboxed one, for example) do not support registering host memory; :class:`HostTier` then takes its
    buffers from torch's pinned allocator instead.

    Args:
        device: The CUDA device whose kernel launch clears the error of a failed registration; ``None`` is the
            current one. The page is registered in the current device's context, as the tier's buffers are.

    Returns:
        ``(works, reason)``: ``(False, ...)`` with CUDA's error when registration fails, and without a usable
        CUDA device.
    """
    global _probed
    if device is not None and device.type != "cuda":
        return False, f"{device} is not a CUDA device"
    if _probed is None:
        _probed = _probe(device)
    return _probed


def _probe(device: torch.device | None) -> tuple[bool, str]:
    """Register and unregister one page of host memory on ``device``; clear CUDA's error if either fails."""
    try:
        cudart = torch.cuda.cudart()
    except Exception as error:  # a CPU-only build, no driver, no device
        return False, f"CUDA is not usable ({error})"
    raw = torch.empty(2 * _PAGE_BYTES, dtype=torch.uint8)
    pointer = raw.data_ptr() + (-raw.data_ptr() % _PAGE_BYTES)
    error = int(cudart.cudaHostRegister(pointer, _PAGE_BYTES, 0))
    if error:
        _clear_cuda_error(cudart, device)
        return False, f"cudaHostRegister failed: {_error_text(cudart, error)}"
    error = int(cudart.cudaHostUnregister(pointer))
    if error:
        _clear_cuda_error(cudart, device)
        _never_freed.append(raw)
        return False, f"cudaHostUnregister failed: {_error_text(cudart, error)}"
    return True, "cudaHostRegister locks host memory"


def _error_text(cudart: object, code: int) -> str:
    """CUDA's description of error ``code``, as ``torch.cuda.check_error`` words it."""
    try:
        return f"{cudart.cudaGetErrorString(cudart.cudaError(code))} ({code})"
    except Exception:
        return f"CUDA error {code}"


def _clear_cuda_error(cudart: object, device: torch.device | None) -> None:
    """Reset CUDA's last error after a runtime call failed, so that the next kernel launch does not report it.

    torch binds no ``cudaGetLastError`` (torch 2.11 to 2.13's ``torch.cuda.cudart()`` has none) but checks every
    kernel launch with it, which reads and resets the last error: a launch that raises it has cleared it, and a
    second launch confirms that. Never raises.
    """
    get_last_error = getattr(cudart, "cudaGetLastError", None)
    if get_last_error is not None:
        with contextlib.suppress(Exception):
            get_last_error()
            return
    try:
        _launch_kernel(device)
        return  # nothing was pending
    except Exception:
        pass  # the launch's check raised the pending error, and reset it
    try:
        _launch_kernel(device)
    except Exception as error:  # a sticky error: the context is lost, and every CUDA call reports it
        log.warning("CUDA reports an error that cannot be cleared (%s); the next CUDA call will raise it", error)


def _launch_kernel(device: torch.device | None) -> None:
    """Launch one small kernel on ``device``, whose launch check raises (and resets) CUDA's last error."""
    torch.zeros(1, device=device if device is not None else "cuda")


def _pinned_empty(nbytes: int) -> Tensor:
    """``nbytes`` of page-locked host memory from torch's pinned allocator (``cudaHostAlloc``)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _power_of_two_at_least(nbytes: int) -> int:
    """What torch's pinned allocator takes for ``nbytes``: it rounds each allocation up to a power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 1 else nbytes


class _Registrations:
    """Host memory this tier locked with ``cudaHostRegister``: the tensor that owns it, by the address it starts at.

    Kept apart from :class:`HostTier`, so that the tier's finalizer can unregister it without keeping the tier
    alive. Each owner is freed only after its memory is unregistered, so no later registration meets pages that
    CUDA still holds. Memory that CUDA refuses to unregister (after an error that lost the context, which every
    call then reports) is freed all the same, with a warning: keeping it would only leak it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.owners: dict[int, Tensor] = {}

    def register(self, nbytes: int) -> tuple[Tensor | None, str]:
        """``nbytes`` of page-aligned host memory locked with ``cudaHostRegister``, or ``None`` and CUDA's reason.

        Whole pages are allocated and locked, so no other allocation shares a locked page.
        """
        locked = _align(nbytes, _PAGE_BYTES)
        raw = torch.empty(locked + _PAGE_BYTES, dtype=torch.uint8)
        start = -raw.data_ptr() % _PAGE_BYTES
        pages = raw[start : start + locked]
        cudart = torch.cuda.cudart()
        error = int(cudart.cudaHostRegister(pages.data_ptr(), locked, 0))
        if error:
            _clear_cuda_error(cudart, self.device)
            return None, _error_text(cudart, error)
        self.owners[pages.data_ptr()] = raw
        return pages[:nbytes], ""

    def unregister(self, pointers: list[int]) -> None:
        """Unlock the memory at ``pointers`` and let it be freed. Never raises: a failure is logged.

        After a CUDA error (a faulting kernel, a lost device) unregistering fails too; raising that here would
        replace the error that stopped the run.
        """
        failures = []
        cudart = None
        for pointer in pointers:
            owner = self.owners.pop(pointer, None)
            if owner is None:
                continue
            try:
                cudart = torch.cuda.cudart()
                error = int(cudart.cudaHostUnregister(pointer))
            except Exception as raised:
                failures.append((owner.numel(), str(raised)))
                continue
            if error:
                failures.append((owner.numel(), _error_text(cudart, error)))
        if failures:
            if cudart is not None:
                _clear_cuda_error(cudart, self.device)
            log.warning(
                "could not unregister %d host buffers of offloaded optimizer states (%s in all): %s",
                len(failures),
                format_bytes(sum(nbytes for nbytes, _ in failures)),
                failures[0][1],
            )

    def unregister_all(self) -> None:
        """Unlock and free every buffer still registered. Never raises."""
        self.unregister(list(self.owners))


def _release(registrations: _Registrations, streams: list[torch.cuda.Stream]) -> None:
    """Wait for the copy streams, then unregister every buffer: :meth:`HostTier.close`, and its finalizer.

    Never raises. After a CUDA error the wait raises it again; it is logged (it was, or will be, raised where
    CUDA reported it) and the buffers are unregistered all the same.
    """
    errors = []
    for stream in streams:
        try:
            stream.synchronize()
        except Exception as error:
            errors.append(error)
    if errors:
        log.warning(
            "copies of offloaded optimizer states ended with an error; freeing their host buffers: %s", errors[0]
        )
    registrations.unregister_all()


class HostTier:
    """Keeps each offloaded state tensor in host memory, in a region of one buffer allocated up front.

    The buffer's size is the sum of the units' regions, known before training from the optimizer
    (:func:`~lightning_grass.offload.expected_state_bytes`), so no host memory is allocated during a step.
    Each region, and each tensor in it, starts on a 512-byte boundary, which the copy engines move fastest: a
    region holds its unit's bytes rounded up to 512, and 512 more for each of its tensors after the first.
    :meth:`backing_bytes` is the memory the tier holds. A unit whose state turns out larger than its region (an
    optimizer whose state the arithmetic does not know) gets a buffer of its own at its first write-back; a unit
    whose state fits its region again goes back to it, and its own buffer is freed.

    On CUDA the buffers are page-locked with ``cudaHostRegister`` where it works (:func:`host_registration_works`
    tries it once per process), which locks exactly their pages; pinned tensors from torch's caching allocator
    would each be rounded up to a power of two (a 46 MB state taking 64 MiB). Where it does not (a driver without
    support, as in some sandboxes), they come from torch's pinned allocator all the same, and the tier logs a
    warning. :attr:`pinning` says which. A registered buffer is unregistered before it is freed:
    at :meth:`close`, or, for a tier that is dropped without it (a run that raised first), by a finalizer when
    it is garbage-collected; neither raises after a CUDA error.

    On CUDA, copies run on two copy streams, one per direction (a GPU has a copy engine for each), so a
    write-back never queues behind the next fetch. Events order the streams: a fetch's copy waits for the
    compute stream (which allocated its tensors) and for the unit's last write-back; the compute stream waits
    for the fetch before the optimizer touches the tensors; a write-back waits for the compute stream's last
    use of the tensors, and ``record_stream`` keeps their device memory from being reused until the copy has
    read it, so the caller may drop its references as soon as :meth:`write` returns. A unit's own buffer that is
    replaced is freed only once both streams are done with it: its last write-back and its last fetch.

    For tensors on the CPU (and on a CPU-only run) the copies are plain synchronous ``copy_`` calls into an
    unpinned buffer; that configuration has no memory benefit and exists so the whole offload path can be
    exercised on a CPU.

    Args:
        device: The compute device the resident states live on.
        unit_bytes: Bytes of each unit's state, indexed by unit. Units beyond it get buffers of their own.
        unit_tensors: Tensors in each unit's state (each after the first may need up to 511 bytes of padding);
            :data:`DEFAULT_UNIT_TENSORS` for units it does not cover.

    Raises:
        RuntimeError: If CUDA cannot lock the buffer at all (neither way; e.g. the RAM is not there).
    """

    def __init__(self, device: torch.device, unit_bytes: Sequence[int] = (), unit_tensors: Sequence[int] = ()) -> None:
        self.device = device
        pinned = device.type == "cuda"
        #: How the buffers are page-locked: :data:`REGISTERED`, :data:`PINNED_ALLOCATOR`, or ``None`` (CPU).
        self.pinning: str | None = None
        if pinned:
            works, reason = host_registration_works(device)
            self.pinning = REGISTERED if works else PINNED_ALLOCATOR
            if not works:
                log.warning(
                    "%s; offloaded optimizer states are page-locked by torch's pinned allocator instead, which "
                    "rounds each buffer up to a power of two",
                    reason,
                )
        self._to_host = torch.cuda.Stream(device) if pinned else None
        self._to_device = torch.cuda.Stream(device) if pinned else None
        self._registrations = _Registrations(device)
        streams = [stream for stream in (self._to_host, self._to_device) if stream is not None]
        self._finalizer = weakref.finalize(self, _release, self._registrations, streams)
        self._held: dict[int, int] = {}  # bytes of host memory each page-locked buffer holds, by its address
        counts = list(unit_tensors)[: len(unit_bytes)]
        counts += [DEFAULT_UNIT_TENSORS] * (len(unit_bytes) - len(counts))
        sizes = [_region_bytes(size, count) for size, count in zip(unit_bytes, counts, strict=True)]
        starts = list(itertools.accumulate(sizes, initial=0))[:-1]
        self._regions = dict(enumerate(zip(starts, sizes, strict=True)))
        self._own: dict[int, Tensor] = {}
        self._buffers: dict[int, list[Tensor]] = {}
        self._written: dict[int, torch.cuda.Event] = {}
        self._fetched: dict[int, torch.cuda.Event] = {}
        self._retired: list[tuple[Tensor, list[torch.cuda.Event]]] = []
        self._slab = self._allocate(sum(sizes))
        if pinned:
            log.info(
                "host tier on %s: %s of host memory page-locked with %s",
                device,
                format_bytes(self.backing_bytes()),
                self.pinning,
            )

    def write(self, unit: int, tensors: list[Tensor]) -> Transfer:
        """Start copying ``tensors`` into the backing region of ``unit``.

        On CUDA the device memory stays reserved for the copy (``record_stream``) after the caller lets go of
        the tensors; the returned transfer is done (and released) when the copy has read them.
        """
        self._free_retired()
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
        self._free_retired()
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
        self._fetched[unit] = event

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
        """Bytes of host memory the tier holds (locked, on CUDA).

        The shared buffer, units' own buffers, and replaced ones that a copy may still use; a buffer from torch's
        pinned allocator counts as the power of two it was rounded up to.
        """
        buffers = [self._slab, *self._own.values(), *(buffer for buffer, _ in self._retired)]
        return sum(self._held.get(buffer.data_ptr(), buffer.numel()) for buffer in buffers if buffer.numel())

    def close(self) -> None:
        """Wait for copies in flight and free every buffer (on CUDA, unregistered first and returned to the system).

        Never raises: after a CUDA error the wait fails with it, which is logged, and every buffer is unregistered
        and freed all the same. Buffers from torch's pinned allocator go back to its cache. A second call does
        nothing.
        """
        self._finalizer()
        self._slab = torch.empty(0, dtype=torch.uint8)
        self._own.clear()
        self._buffers.clear()
        self._regions.clear()
        self._written.clear()
        self._fetched.clear()
        self._retired.clear()
        self._held.clear()

    def _buffers_for(self, unit: int, tensors: list[Tensor]) -> list[Tensor]:
        """The backing views of ``unit`` for tensors shaped like ``tensors``: its region, or a buffer of its own.

        Its region when they fit there, else its own buffer when they fit that, else a new buffer of its own. An
        own buffer it leaves is freed once both copy streams are done with it.
        """
        buffers = self._buffers.get(unit)
        if buffers is not None and [(b.shape, b.dtype) for b in buffers] == [(t.shape, t.dtype) for t in tensors]:
            return buffers
        start, size = self._regions.get(unit, (0, 0))
        buffers = _views(self._slab, start, size, tensors)
        own = self._own.get(unit)
        if own is not None and buffers is None:
            buffers = _views(own, 0, own.numel(), tensors)
            if buffers is None:  # too small now: a larger one replaces it
                self._retire(unit, self._own.pop(unit))
        elif own is not None:  # back in its region
            self._retire(unit, self._own.pop(unit))
        if buffers is None:
            needed = _layout_bytes(tensors)
            self._own[unit] = self._allocate(needed)
            buffers = _views(self._own[unit], 0, needed, tensors)
            assert buffers is not None
        self._buffers[unit] = buffers
        return buffers

    def _retire(self, unit: int, buffer: Tensor) -> None:
        """Free ``unit``'s own ``buffer`` once its last write-back and its last fetch are done with it."""
        events = [event for event in (self._written.get(unit), self._fetched.get(unit)) if event is not None]
        self._retired.append((buffer, events))
        self._free_retired()

    def _free_retired(self) -> None:
        """Free the replaced buffers that no copy uses any more, without waiting."""
        if not self._retired:
            return
        busy = []
        for buffer, events in self._retired:
            if all(event.query() for event in events):
                self._free(buffer)
            else:
                busy.append((buffer, events))
        self._retired = busy

    def _allocate(self, nbytes: int) -> Tensor:
        """``nbytes`` of host memory; on CUDA page-aligned and page-locked.

        With ``cudaHostRegister`` while it works; a registration that fails (for all this tier knows, for good)
        switches the tier to torch's pinned allocator.

        Raises:
            RuntimeError: If neither way can lock ``nbytes``.
        """
        if self.pinning is None or nbytes == 0:
            return torch.empty(nbytes, dtype=torch.uint8)
        if self.pinning == REGISTERED:
            buffer, reason = self._registrations.register(nbytes)
            if buffer is not None:
                self._held[buffer.data_ptr()] = _align(nbytes, _PAGE_BYTES)
                return buffer
            log.warning(
                "cudaHostRegister could not lock %s of host memory (%s); offloaded optimizer states are page-locked "
                "by torch's pinned allocator from now on, which rounds each buffer up to a power of two",
                format_bytes(nbytes),
                reason,
            )
            self.pinning = PINNED_ALLOCATOR
        try:
            buffer = _pinned_empty(nbytes)
        except RuntimeError as error:
            raise RuntimeError(
                f"CUDA could not page-lock {nbytes} bytes of host memory for offloaded optimizer states ({error}); "
                "free RAM, set max_resident_bytes, or use offload='disk'"
            ) from error
        self._held[buffer.data_ptr()] = _power_of_two_at_least(nbytes)
        return buffer

    def _free(self, buffer: Tensor) -> None:
        """Let ``buffer`` go: unregistered first if it was registered (torch's pinned allocator takes back its own)."""
        if buffer.numel():
            self._held.pop(buffer.data_ptr(), None)
            self._registrations.unregister([buffer.data_ptr()])


def _align(offset: int, alignment: int) -> int:
    return offset + (-offset % alignment)


def _region_bytes(nbytes: int, tensors: int) -> int:
    """Bytes of a region that holds ``tensors`` tensors of ``nbytes`` in all, each starting at a 512-byte boundary.

    Laid out one after another, each tensor but the last takes its bytes rounded up to 512 (at most 511 more);
    their sum is a multiple of 512 that is never more than ``nbytes`` rounded up to 512 plus 512 for each tensor
    after the first, in whatever order and sizes they come.
    """
    return _align(nbytes, _ALIGNMENT) + _ALIGNMENT * max(tensors - 1, 0)


def _layout_bytes(tensors: list[Tensor]) -> int:
    """Bytes that ``tensors`` take laid out one after another, each starting at a 512-byte boundary."""
    end = 0
    for tensor in tensors:
        end = _align(end, _ALIGNMENT) + tensor.numel() * tensor.element_size()
    return end


def _views(storage: Tensor, start: int, size: int, tensors: list[Tensor]) -> list[Tensor] | None:
    """Views of ``storage[start:start + size]`` shaped like ``tensors``, or ``None`` if they do not fit.

    ``start`` is a multiple of 512 (a region's start, or 0), and each view starts at a 512-byte boundary.
    """
    views = []
    offset = start
    for tensor in tensors:
        offset = _align(offset, _ALIGNMENT)
        nbytes = tensor.numel() * tensor.element_size()
        if offset + nbytes > start + size:
            return None
        views.append(storage[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape))
        offset += nbytes
    return views
