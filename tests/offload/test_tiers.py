import threading

import pytest
import torch

from lightning_grass.errors import SettingTypeError, SettingValueError
from lightning_grass.offload import DiskTier, HostTier
from lightning_grass.offload.disk_tier import OWNER_LOCK
from lightning_grass.offload.transfer import TensorSpec

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
    # The host tier aligns each tensor to its element size: 2 bytes of padding after the 7 bf16 values.
    padding = 2 if isinstance(tier, HostTier) else 0
    assert tier.backing_bytes() == 15 * 4 + 7 * 2 + padding + 4 + 6 * 8
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
    tier = HostTier(torch.device("cpu"), sizes)
    assert tier.backing_bytes() == sum(sizes) == 124 + 36

    def no_allocation(nbytes):
        raise AssertionError(f"a write-back allocated {nbytes} bytes")

    monkeypatch.setattr(tier, "_allocate", no_allocation)
    for _ in range(2):
        for unit, tensors in states.items():
            tier.write(unit, tensors).wait()
    assert tier.backing_bytes() == sum(sizes)
    for unit, tensors in states.items():
        assert all(torch.equal(a, b) for a, b in zip(tier.read_to_cpu(unit), tensors, strict=True))
    monkeypatch.undo()
    # A unit outside the known sizes, or a state larger than its region, gets a buffer of its own.
    tier.write(2, [torch.randn(3)]).wait()
    tier.write(1, [torch.randn(8), torch.randn(8), torch.tensor(3.0)]).wait()
    assert tier.backing_bytes() == sum(sizes) + 12 + 68
    assert all(torch.equal(a, b) for a, b in zip(tier.read_to_cpu(0), states[0], strict=True))
    tier.close()
    assert tier.backing_bytes() == 0


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
