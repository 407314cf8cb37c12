"""The host tier's page-locking on CUDA, with CUDA faked: torch.cuda.cudart() (cudaHostRegister, cudaHostUnregister),
the copy streams and their events, the pinned allocator, and the kernel launch whose check reads CUDA's last error.

The fakes follow torch 2.13's API: ``torch.cuda.cudart()`` binds ``cudaHostRegister(ptr, size, flags)``,
``cudaHostUnregister(ptr)``, ``cudaGetErrorString`` and the ``cudaError`` enum, and no ``cudaGetLastError``.
States stay on the CPU, so every copy runs (synchronously) while the streams and events are fakes.
"""

import contextlib
import gc
import logging

import pytest
import torch

from lightning_grass.offload import HostTier, OffloadedOptimizer, TensorStateStore, expected_state_bytes
from lightning_grass.offload import host_tier as host_tier_module
from lightning_grass.offload.host_tier import PINNED_ALLOCATOR, REGISTERED, host_registration_works
from lightning_grass.offload.transfer import TensorSpec

CUDA = torch.device("cuda", 0)
NOT_SUPPORTED = 801  # cudaErrorNotSupported
NOT_REGISTERED = 713  # cudaErrorHostMemoryNotRegistered
ILLEGAL_ADDRESS = 700  # cudaErrorIllegalAddress, sticky: every later call returns it


class FakeCudart:
    """``torch.cuda.cudart()``: records registrations, and the last error a failed call leaves, as CUDA does."""

    def __init__(self, log, register_error=0):
        self.log = log
        self.register_error = register_error
        self.sticky_error = 0
        self.registered = {}  # address -> bytes
        self.last_error = 0

    def cudaHostRegister(self, pointer, size, flags):  # noqa: N802
        self.log.append(("register", pointer, size))
        error = self.sticky_error or self.register_error
        if not error:
            assert not any(start < pointer + size and pointer < start + n for start, n in self.registered.items())
            self.registered[pointer] = size
        self.last_error = error or self.last_error
        return error

    def cudaHostUnregister(self, pointer):  # noqa: N802
        self.log.append(("unregister", pointer))
        error = self.sticky_error or (0 if pointer in self.registered else NOT_REGISTERED)
        if not error:
            del self.registered[pointer]
        self.last_error = error or self.last_error
        return error

    def cudaGetErrorString(self, error):  # noqa: N802
        return {NOT_SUPPORTED: "operation not supported", ILLEGAL_ADDRESS: "an illegal memory access"}.get(error, "?")

    cudaError = int  # noqa: N815


class FakeStream:
    """A copy stream: the events recorded on it are pending while it is ``held``, and done once it finishes."""

    def __init__(self, log, name):
        self.log, self.name = log, name
        self.held = False
        self.sync_error = None
        self.events = []

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def finish(self):
        self.held = False
        for event in self.events:
            event.done = True

    def synchronize(self):
        self.log.append(("synchronize", self.name))
        if self.sync_error is not None:
            raise self.sync_error
        self.finish()


class FakeEvent:
    def __init__(self, *args, **kwargs):
        self.done = True

    def record(self, stream):
        self.done = not stream.held
        stream.events.append(self)

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


@pytest.fixture
def cuda(monkeypatch):
    """Fake CUDA for the host tier; ``cuda.cudart`` is the fake runtime, ``cuda.log`` what it was asked, in order."""
    log = []
    fake = type("FakeCuda", (), {})()
    fake.log = log
    fake.cudart = FakeCudart(log)
    fake.streams = []
    fake.pinned = []  # sizes asked of the pinned allocator
    fake.launches = []

    def make_stream(device=None, **kwargs):
        stream = FakeStream(log, f"copy stream {len(fake.streams)}")
        fake.streams.append(stream)
        return stream

    def pinned_empty(nbytes):
        fake.pinned.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    def launch_kernel(device):
        # Like torch's launch check, cudaGetLastError: it raises CUDA's last error, and resets it.
        fake.launches.append(device)
        error, fake.cudart.last_error = fake.cudart.last_error, fake.cudart.sticky_error
        if error:
            raise torch.AcceleratorError(f"CUDA error: {fake.cudart.cudaGetErrorString(error)}")

    monkeypatch.setattr(host_tier_module, "_probed", None)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake.cudart)
    monkeypatch.setattr(torch.cuda, "Stream", make_stream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream([], "compute"))
    monkeypatch.setattr(host_tier_module, "_pinned_empty", pinned_empty)
    monkeypatch.setattr(host_tier_module, "_launch_kernel", launch_kernel)
    return fake


def registered_pairs(log):
    """Addresses registered and unregistered, from the fake runtime's log."""
    registered = [entry[1] for entry in log if entry[0] == "register"]
    unregistered = [entry[1] for entry in log if entry[0] == "unregister"]
    return registered, unregistered


def train_offloaded(tier, steps=3):
    """AdamW over four tensors whose states stream through ``tier`` (one fits the budget at a time), against plain
    AdamW fed the same gradients; returns the store and whether every step matched bit for bit."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16)) for _ in range(4)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    inner = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    plain = torch.optim.AdamW(reference, lr=1e-2, foreach=False)
    budget = expected_state_bytes(inner, params[0], False) + 2 * 16 * 4  # one state and its step's temporaries
    store = TensorStateStore(inner, params, tier, budget)
    offloaded = OffloadedOptimizer(inner, store)
    same = True
    for _ in range(steps):
        for p, q in zip(params, reference, strict=True):
            p.grad = torch.randn(16)
            q.grad = p.grad.clone()
        offloaded.prefetch()
        offloaded.step()
        plain.step()
        same = same and all(torch.equal(p, q) for p, q in zip(params, reference, strict=True))
    return store, same


def test_registration_is_probed_once_per_process_and_buffers_are_registered_page_aligned(cuda):
    assert host_registration_works(CUDA) == (True, "cudaHostRegister locks host memory")
    probe = list(cuda.log)
    assert [entry[0] for entry in probe] == ["register", "unregister"] and probe[0][2] == 4096
    assert host_registration_works() == (True, "cudaHostRegister locks host memory")
    assert cuda.log == probe, "the answer is cached: CUDA is asked once per process"

    tier = HostTier(CUDA, [100, 6000], [2, 3])
    assert tier.pinning == REGISTERED and cuda.pinned == []
    ((slab, size),) = cuda.cudart.registered.items()
    assert slab % 4096 == 0 and size == 8192, "regions of 1024 and 6144 + 1024 bytes, locked as whole pages"
    assert tier.backing_bytes() == 8192
    tier.write(7, [torch.randn(3)]).wait()  # a unit without a region: a buffer of its own, registered too
    assert len(cuda.cudart.registered) == 2
    tier.close()
    registered, unregistered = registered_pairs(cuda.log[len(probe) :])
    assert sorted(registered) == sorted(unregistered) and cuda.cudart.registered == {}
    tier.close()  # a second call does nothing
    assert len(cuda.log) == len(probe) + 2 + 2 + 2  # two registrations, two stream waits, two unregistrations


def test_a_failing_registration_falls_back_to_the_pinned_allocator_and_the_store_trains(cuda, caplog):
    cuda.cudart.register_error = NOT_SUPPORTED
    with caplog.at_level(logging.WARNING, logger=host_tier_module.__name__):
        tier = HostTier(CUDA, [132] * 4, [3] * 4)
    assert host_registration_works(CUDA) == (False, "cudaHostRegister failed: operation not supported (801)")
    assert tier.pinning == PINNED_ALLOCATOR
    assert "torch's pinned allocator" in caplog.text and "operation not supported" in caplog.text
    # The failed registration's error was cleared before anything else ran: a launch raised it (and reset it),
    # and a second one found nothing pending.
    assert cuda.cudart.last_error == 0 and len(cuda.launches) == 2
    assert cuda.cudart.registered == {} and [e[0] for e in cuda.log] == ["register"], "probed once, never again"
    assert cuda.pinned == [4 * 1536]
    assert tier.backing_bytes() == 8192, "torch's pinned allocator rounds 6144 bytes up to a power of two"

    store, same = train_offloaded(tier)
    assert same, "the offloaded steps match plain AdamW"
    assert store.stats["bytes_to_device"] > 0 and store.stats["bytes_to_backing"] > 0, "the states streamed"
    store.close()
    assert cuda.cudart.registered == {}


def test_a_registration_that_fails_after_the_probe_worked_falls_back_too(cuda, caplog):
    tier = HostTier(CUDA)
    assert tier.pinning == REGISTERED
    cuda.cudart.register_error = NOT_SUPPORTED
    with caplog.at_level(logging.WARNING, logger=host_tier_module.__name__):
        tier.write(0, [torch.randn(5)]).wait()
    assert tier.pinning == PINNED_ALLOCATOR and cuda.pinned == [20]
    assert "could not lock 20 B" in caplog.text
    assert cuda.cudart.last_error == 0, "the failed registration's error was cleared"
    read, transfer = tier.read(0, [TensorSpec((5,), torch.float32, torch.device("cpu"))])
    transfer.wait()
    assert torch.equal(read[0], tier.read_to_cpu(0)[0])
    tier.close()


def test_a_store_that_raises_before_close_leaves_nothing_registered(cuda):
    def run_that_fails():
        tier = HostTier(CUDA, [132] * 4, [3] * 4)
        store, _ = train_offloaded(tier, steps=2)
        store.tier.write(9, [torch.randn(300)]).wait()  # a buffer of its own, registered beside the slab
        assert len(cuda.cudart.registered) == 2
        raise RuntimeError("the run failed before teardown")

    with pytest.raises(RuntimeError, match="before teardown") as raised:
        run_that_fails()
    del raised  # its traceback holds the frame that holds the store
    gc.collect()
    assert cuda.cudart.registered == {}, "the finalizer unregistered every buffer"
    registered, unregistered = registered_pairs(cuda.log)
    assert len(registered) == 3 and sorted(registered) == sorted(unregistered)  # the probe's page, slab, own
    after_probe = cuda.log[2:]
    syncs = [i for i, entry in enumerate(after_probe) if entry[0] == "synchronize"]
    unregisters = [i for i, entry in enumerate(after_probe) if entry[0] == "unregister"]
    assert len(syncs) == 2 and max(syncs) < min(unregisters), "both copy streams finished before unregistering"


def test_close_after_a_cuda_error_unregisters_everything_and_does_not_replace_the_error(cuda, caplog):
    tier = HostTier(CUDA, [132] * 2, [3] * 2)
    tier.write(0, [torch.randn(16), torch.randn(16), torch.tensor(1.0)]).wait()
    tier.write(5, [torch.randn(64)]).wait()
    assert len(tier._registrations.owners) == 2
    # A kernel faulted: the context is gone, every wait and every runtime call reports it.
    cuda.cudart.sticky_error = ILLEGAL_ADDRESS
    for stream in cuda.streams:
        stream.sync_error = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    with (
        caplog.at_level(logging.WARNING, logger=host_tier_module.__name__),
        pytest.raises(ValueError, match="the error that stopped the run"),
    ):
        try:
            raise ValueError("the error that stopped the run")
        finally:
            tier.close()
    assert tier._registrations.owners == {} and tier.backing_bytes() == 0, "every buffer was let go"
    assert len([entry for entry in cuda.log if entry[0] == "unregister"]) == 1 + 2, "the probe's, then both"
    assert "ended with an error" in caplog.text and "an illegal memory access" in caplog.text
    assert "could not unregister 2 host buffers" in caplog.text


def test_a_replaced_own_buffer_is_freed_only_after_both_copy_streams_are_done_with_it(cuda):
    tier = HostTier(CUDA)
    to_host, to_device = cuda.streams
    cpu = torch.device("cpu")
    small = [torch.randn(3)]
    tier.write(0, small).wait()
    (first,) = cuda.cudart.registered
    to_host.held = to_device.held = True
    tier.write(0, small)  # a write-back in flight into the unit's buffer
    fetched, _ = tier.read(0, [TensorSpec((3,), torch.float32, cpu)])  # and a fetch in flight from it
    larger = [torch.randn(300)]
    tier.write(0, larger)  # does not fit: a new buffer replaces the unit's own
    assert first in cuda.cudart.registered and len(cuda.cudart.registered) == 2
    assert tier.backing_bytes() == 4096 + 4096, "the replaced buffer is still held"

    to_host.finish()  # the write-backs are done; the fetch is not
    tier.read(0, [TensorSpec((300,), torch.float32, cpu)])
    assert first in cuda.cudart.registered, "the fetch may still read it"
    to_device.finish()
    tier.read(0, [TensorSpec((300,), torch.float32, cpu)])
    assert first not in cuda.cudart.registered and ("unregister", first) in cuda.log
    assert tier.backing_bytes() == 4096
    assert torch.equal(fetched[0], small[0]) and torch.equal(tier.read_to_cpu(0)[0], larger[0])
    tier.close()


def test_a_unit_back_in_its_region_frees_its_own_buffer_once_both_copy_streams_are_done_with_it(cuda):
    tier = HostTier(CUDA, [12], [1])  # a region of 512 bytes
    to_host, to_device = cuda.streams
    (slab,) = cuda.cudart.registered
    tier.write(0, [torch.randn(200)]).wait()  # 800 bytes: a buffer of its own
    (own,) = set(cuda.cudart.registered) - {slab}
    to_host.held = to_device.held = True
    tier.read(0, [TensorSpec((200,), torch.float32, torch.device("cpu"))])
    back = [torch.randn(3)]
    tier.write(0, back)  # fits the region again
    assert own in cuda.cudart.registered, "the fetch in flight may still read it"
    to_device.finish()
    to_host.finish()
    tier.write(0, back)
    assert set(cuda.cudart.registered) == {slab}
    assert torch.equal(tier.read_to_cpu(0)[0], back[0])
    tier.close()
    assert cuda.cudart.registered == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="probes the real CUDA where there is one")
def test_without_cuda_the_probe_says_so(monkeypatch):
    monkeypatch.setattr(host_tier_module, "_probed", None)
    works, reason = host_registration_works()
    assert not works and reason.startswith("CUDA is not usable")
    assert host_registration_works(torch.device("cpu")) == (False, "cpu is not a CUDA device")


def test_a_tier_that_cannot_lock_its_buffer_either_way_says_what_to_do(cuda, monkeypatch):
    cuda.cudart.register_error = NOT_SUPPORTED

    def out_of_memory(nbytes):
        raise torch.AcceleratorError("CUDA error: out of memory")

    monkeypatch.setattr(host_tier_module, "_pinned_empty", out_of_memory)
    with pytest.raises(RuntimeError, match=r"could not page-lock 6144 bytes .* or use offload='disk'"):
        HostTier(CUDA, [132] * 4, [3] * 4)
    gc.collect()
    assert cuda.cudart.registered == {}
