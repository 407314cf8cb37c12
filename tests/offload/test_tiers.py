import threading

import pytest
import torch

from lightning_grass.errors import SettingTypeError, SettingValueError
from lightning_grass.offload import DiskTier, HostTier, OffloadedOptimizer, TensorStateStore
from lightning_grass.offload import disk_tier as disk_tier_module
from lightning_grass.offload.disk_tier import OWNER_LOCK
from lightning_grass.offload.transfer import TensorSpec, Transfer

TENSORS = [
    torch.randn(3, 5),
    torch.randn(7).to(torch.bfloat16),
    torch.tensor(12.0),
    torch.arange(6, dtype=torch.int64).reshape(2, 3),
]


@pytest.mark.parametrize(
    "make_tier", [lambda tmp: DiskTier(tmp), lambda tmp: HostTier(torch.device("cpu"))], ids=["disk", "host"]
)
def test_round_trip_is_bit_exact_for_every_dtype(tmp_path, make_tier):
    tier = make_tier(tmp_path)
    tier.write(3, TENSORS).wait()
    read, transfer = tier.read(3, [TensorSpec.of(t) for t in TENSORS])
    transfer.wait()
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(read, TENSORS, strict=True))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(read, TENSORS, strict=True))
    if isinstance(tier, HostTier):
        # A buffer of the unit's own (it has no region), each tensor starting on a 512-byte boundary: three tensors
        # of 60, 14 and 4 bytes padded to 512 each, then the 48 bytes of the last.
        assert tier.backing_bytes() == 3 * 512 + 6 * 8
    else:
        assert tier.backing_bytes() == 15 * 4 + 7 * 2 + 4 + 6 * 8
    assert all(torch.equal(a, b) for a, b in zip(tier.read_to_cpu(3), TENSORS, strict=True))
    tier.close()


def test_disk_tier_writes_one_file_per_unit_and_deletes_them_on_close(tmp_path):
    tier = DiskTier(tmp_path)
    tier.write(0, TENSORS[:1]).wait()
    tier.write(1, TENSORS[1:]).wait()
    assert sorted(p.name for p in tier.directory.iterdir()) == [OWNER_LOCK, "state_00000.bin", "state_00001.bin"]
    assert tier.directory.parent == tmp_path
    tier.close()
    assert not tier.directory.exists()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_offload_dir_is_refused_with_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=rf"offload_dir='{blocker / 'sub'}' is not a writable directory"):
        DiskTier(blocker / "sub")


@pytest.mark.parametrize(("free", "shown"), [(1000, "1000 B"), (3 * 2**30 + 2**29, "3.50 GiB")])
def test_a_disk_without_room_for_the_states_is_refused_in_human_units_before_a_folder_is_made(
    tmp_path, monkeypatch, free, shown
):
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("Usage", (), {"free": free})())
    with pytest.raises(SettingValueError) as refused:
        DiskTier(tmp_path, unit_bytes=[2**32, 2**31])
    assert str(refused.value) == (
        f"offload_dir='{tmp_path}' has {shown} free, but the offloaded optimizer states need about 6.00 GiB once "
        "every offloaded tensor has been trained; free space there or choose another offload_dir"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_host_tier_holds_every_state_in_one_buffer_sized_up_front(monkeypatch):
    states = {
        0: [torch.randn(3, 5), torch.randn(3, 5), torch.tensor(1.0)],
        1: [torch.randn(4), torch.randn(4), torch.tensor(2.0)],
    }
    sizes = [sum(t.numel() * t.element_size() for t in tensors) for tensors in states.values()]
    assert sizes == [124, 36]
    tier = HostTier(torch.device("cpu"), sizes, [3, 3])
    # Each region, and each tensor in it, starts on a 512-byte boundary: a region is its unit's bytes rounded up
    # to 512, and 512 more for each tensor after the first (2 * 60 + 4 bytes take 512 + 512 + 4 at most).
    region = 512 + 2 * 512
    assert tier.backing_bytes() == 2 * region

    def no_allocation(nbytes):
        raise AssertionError(f"a write-back allocated {nbytes} bytes")

    monkeypatch.setattr(tier, "_allocate", no_allocation)
    for _ in range(2):
        for unit, tensors in states.items():
            tier.write(unit, tensors).wait()
    assert tier.backing_bytes() == 2 * region
    for unit, tensors in states.items():
        assert all(torch.equal(a, b) for a, b in zip(tier.read_to_cpu(unit), tensors, strict=True))
    monkeypatch.undo()
    # A unit outside the known sizes, or a state larger than its region, gets a buffer of its own: 12 bytes, and
    # 800 + 800 + 4 laid out at 0, 1024 and 2048 (2052 bytes, more than the region's 1536).
    tier.write(2, [torch.randn(3)]).wait()
    larger = [torch.randn(200), torch.randn(200), torch.tensor(3.0)]
    tier.write(1, larger).wait()
    assert tier.backing_bytes() == 2 * region + 12 + 2052
    assert all(torch.equal(a, b) for a, b in zip(tier.read_to_cpu(1), larger, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(tier.read_to_cpu(0), states[0], strict=True))
    # A state that fits its region again goes back there, and its own buffer is freed.
    tier.write(1, states[1]).wait()
    assert tier.backing_bytes() == 2 * region + 12
    assert all(torch.equal(a, b) for a, b in zip(tier.read_to_cpu(1), states[1], strict=True))
    tier.close()
    assert tier.backing_bytes() == 0


def test_the_host_tier_starts_every_region_and_tensor_on_a_512_byte_boundary():
    tier = HostTier(torch.device("cpu"), [124, 36, 1000], [3, 3, 2])
    states = {
        0: [torch.randn(3, 5), torch.randn(3, 5), torch.tensor(1.0)],
        1: [torch.randn(4), torch.randn(4), torch.tensor(2.0)],
        2: [torch.randn(7).to(torch.bfloat16), torch.randn(246)],
    }
    for unit, tensors in states.items():
        tier.write(unit, tensors).wait()
    base = tier._slab.data_ptr()
    offsets = {unit: [buffer.data_ptr() - base for buffer in tier._buffers[unit]] for unit in states}
    assert offsets == {0: [0, 512, 1024], 1: [1536, 2048, 2560], 2: [3072, 3584]}
    assert tier.backing_bytes() == 1536 + 1536 + (1024 + 512)
    tier.close()


def test_disk_tier_serves_reads_and_writes_at_once(tmp_path, monkeypatch):
    # Each file operation waits at a barrier for a second one: they pass only if the tier runs two at a time.
    tier = DiskTier(tmp_path, io_threads=2)
    tier.write(0, TENSORS[:1]).wait()
    barrier = threading.Barrier(2, timeout=10)
    read_file, write_file = tier._read_file, tier._write_file

    def read_after_meeting(*args):
        barrier.wait()
        read_file(*args)

    def write_after_meeting(*args):
        barrier.wait()
        write_file(*args)

    monkeypatch.setattr(tier, "_read_file", read_after_meeting)
    monkeypatch.setattr(tier, "_write_file", write_after_meeting)
    read, fetch = tier.read(0, [TensorSpec.of(TENSORS[0])])
    write = tier.write(1, TENSORS[1:2])
    fetch.wait()
    write.wait()
    monkeypatch.undo()
    assert torch.equal(read[0], TENSORS[0]) and torch.equal(tier.read_to_cpu(1)[0], TENSORS[1])
    tier.close()


@pytest.mark.parametrize(
    ("threads", "error"), [(0, SettingValueError), (1.5, SettingTypeError), (True, SettingTypeError)]
)
def test_io_threads_must_be_a_positive_int(tmp_path, threads, error):
    with pytest.raises(error) as raised:
        DiskTier(tmp_path, io_threads=threads)
    assert str(raised.value) == f"io_threads={threads!r} must be an integer >= 1"


def test_a_discarded_disk_fetch_waits_for_the_file_read_and_never_copies_to_the_device(tmp_path, monkeypatch):
    # Device tensors on "meta" stand in for CUDA ones: the read is staged in host memory, as for a GPU.
    tier = DiskTier(tmp_path)
    tier.write(0, TENSORS[:1]).wait()
    copies = []
    copy_staged = disk_tier_module._copy_staged

    def recording_copy(tensors, staged):
        copies.append([t.device.type for t in tensors])
        copy_staged(tensors, staged)

    monkeypatch.setattr(disk_tier_module, "_copy_staged", recording_copy)
    spec = TensorSpec((3, 5), torch.float32, torch.device("meta"))
    _, fetch = tier.read(0, [spec])
    fetch.discard()
    assert fetch.done() and copies == [], "the file was read; the blocking copy to the device never ran"
    _, fetch = tier.read(0, [spec])
    fetch.wait()
    assert copies == [["meta"]], "a fetch that is used is copied to the device"
    tier.close()


def test_the_store_drops_an_unused_prefetch_through_discard(tmp_path, monkeypatch):
    params = [torch.nn.Parameter(torch.randn(16)) for _ in range(3)]
    inner = torch.optim.AdamW(params)
    tier = DiskTier(tmp_path)
    calls = []
    read = tier.read

    def recording_read(unit, specs):
        tensors, transfer = read(unit, specs)

        def wait():
            calls.append(("wait", unit))
            transfer.wait()

        def discard():
            calls.append(("discard", unit))
            transfer.discard()

        return tensors, Transfer(wait=wait, done=transfer.done, discard=discard)

    monkeypatch.setattr(tier, "read", recording_read)
    store = TensorStateStore(inner, params, tier)
    offloaded = OffloadedOptimizer(inner, store)
    for p in params:
        p.grad = torch.ones(16)
    offloaded.step()  # every state is created, and stays resident
    store.set_active([])  # written back to the tier
    store.flush()
    store.set_active([0, 1, 2])
    store.prefetch_active()  # three fetches start
    store.set_active([0])  # two of them leave unused
    assert calls == [("discard", 1), ("discard", 2)]
    params[1].grad = params[2].grad = None
    offloaded.step()
    assert calls[2:] == [("wait", 0)], "the fetch that is stepped is waited for"
    store.close()
