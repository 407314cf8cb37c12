"""A full or vanished disk tier folder: one StorageError at the next wait, previous files intact, nothing left over."""

import errno
import logging
import os
import shutil

import pytest
import torch
from torch import nn

from lightning_grass.errors import InputError, StorageError
from lightning_grass.offload import DiskTier, OffloadedOptimizer, TensorStateStore, disk_tier
from lightning_grass.offload.disk_tier import OWNER_LOCK
from lightning_grass.offload.transfer import TensorSpec

NUMEL = 16
STATE_BYTES = 2 * 4 * NUMEL + 4  # AdamW's exp_avg and exp_avg_sq (float32) and its float32 step counter


def fill_disk_after(monkeypatch, capacity):
    """Make DiskTier's low-level write fail with ENOSPC once ``capacity`` bytes have been written in all.

    The write that crosses the limit writes what still fits first, as a real full disk does.
    """
    real_write_all = disk_tier._write_all
    written = [0]

    def write_all(descriptor, data):
        room = capacity - written[0]
        if len(data) > room:
            real_write_all(descriptor, data[: max(room, 0)])
            written[0] = capacity
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_all(descriptor, data)
        written[0] += len(data)

    monkeypatch.setattr(disk_tier, "_write_all", write_all)


def test_a_write_failing_half_way_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    tier = DiskTier(tmp_path)
    previous = [torch.arange(8, dtype=torch.float32)]
    tier.write(0, previous).wait()
    path = tier.directory / "state_00000.bin"
    saved = path.read_bytes()
    fill_disk_after(monkeypatch, capacity=40)  # the new state takes 64 bytes

    with pytest.raises(StorageError) as raised:
        tier.write(0, [torch.full((16,), 7.0)]).wait()
    assert str(raised.value) == (
        f"writing 64 bytes of optimizer state to the offload folder {tier.directory} failed: No space left on "
        "device; free at least 64 B there, or pass an offload_dir on a disk with more room"
    )
    assert isinstance(raised.value, InputError), "grass-train reports it as one error: line"
    assert raised.value.__cause__.errno == errno.ENOSPC
    assert path.read_bytes() == saved, "the previous state file is intact"
    assert sorted(p.name for p in tier.directory.iterdir()) == [OWNER_LOCK, "state_00000.bin"], "no temporary file"
    read, transfer = tier.read(0, [TensorSpec.of(previous[0])])
    transfer.wait()
    assert torch.equal(read[0], previous[0])
    tier.close()
    assert list(tmp_path.iterdir()) == []


def test_a_vanished_folder_fails_writes_and_reads_with_the_folder_named_and_close_does_not_raise(tmp_path):
    tier = DiskTier(tmp_path)
    state = [torch.zeros(8)]
    tier.write(0, state).wait()
    shutil.rmtree(tier.directory)
    deleted = (
        "failed: No such file or directory; the folder was deleted while the run was using it (a temp-folder "
        "cleaner?); pass an offload_dir that nothing else cleans up"
    )

    with pytest.raises(StorageError) as written:
        tier.write(1, state).wait()
    assert str(written.value) == f"writing 32 bytes of optimizer state to the offload folder {tier.directory} {deleted}"
    _, transfer = tier.read(0, [TensorSpec.of(state[0])])
    with pytest.raises(StorageError) as read:
        transfer.wait()
    assert str(read.value) == f"reading 32 bytes of optimizer state from the offload folder {tier.directory} {deleted}"
    tier.close()
    assert not tier.directory.exists()


def test_a_state_file_cut_short_by_someone_else_is_refused_when_read(tmp_path):
    tier = DiskTier(tmp_path)
    tier.write(0, [torch.zeros(8)]).wait()
    path = tier.directory / "state_00000.bin"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(StorageError) as raised:
        tier.read_to_cpu(0)
    assert str(raised.value) == (
        f"the offload file {path} holds 20 of the 32 bytes of optimizer state it should; something else wrote to "
        f"the folder {tier.directory}. Keep offload_dir for this run alone"
    )
    tier.close()


def offloaded_adamw(tmp_path, max_resident_bytes=None, overlap=True):
    """Four offloaded parameters of NUMEL elements with AdamW, in a disk tier."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(NUMEL)) for _ in range(4)]
    inner = torch.optim.AdamW(params, lr=1e-2)
    store = TensorStateStore(inner, params, DiskTier(tmp_path), max_resident_bytes, overlap=overlap)
    return params, store, OffloadedOptimizer(inner, store)


def step(params, optimizer):
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.prefetch()
    optimizer.step()


@pytest.mark.parametrize("overlap", [True, False])
def test_a_full_disk_raises_once_in_the_step_that_waits_for_the_write(tmp_path, monkeypatch, caplog, overlap):
    # Two states fit in the budget, four are active: every step streams them, fetching one while the previous
    # one is written back, so the step waits for the first write-back before it can fetch the third state.
    params, store, optimizer = offloaded_adamw(tmp_path, max_resident_bytes=2 * STATE_BYTES, overlap=overlap)
    step(params, optimizer)
    store.flush()  # the first step's write-backs are on disk before it fills
    fill_disk_after(monkeypatch, capacity=STATE_BYTES // 2)  # the next step's first write-back fails half-way
    folder = store.tier.directory
    saved = (folder / "state_00000.bin").read_bytes()

    with pytest.raises(StorageError) as raised:
        step(params, optimizer)
    assert str(raised.value) == (
        f"writing {STATE_BYTES} bytes of optimizer state to the offload folder {folder} failed: No space left on "
        f"device; free at least {STATE_BYTES} B there, or pass an offload_dir on a disk with more room"
    )
    assert (folder / "state_00000.bin").read_bytes() == saved
    assert sorted(p.name for p in folder.iterdir()) == [OWNER_LOCK] + [f"state_0000{unit}.bin" for unit in range(4)]
    with caplog.at_level(logging.WARNING):
        store.close()  # what the strategy's teardown does: it must not raise the error a second time
        store.close()
    assert caplog.records == []
    assert list(tmp_path.iterdir()) == [], "the run's folder is deleted"


def test_a_folder_deleted_between_steps_stops_the_next_fetch(tmp_path):
    params, store, optimizer = offloaded_adamw(tmp_path, max_resident_bytes=2 * STATE_BYTES)
    step(params, optimizer)
    store.flush()  # the first step's write-backs are on disk before it goes
    before = [p.detach().clone() for p in params]
    shutil.rmtree(store.tier.directory)
    with pytest.raises(StorageError, match=r"^reading 132 bytes of optimizer state from the offload folder .*"):
        step(params, optimizer)
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True)), "no update ran on a missing state"
    store.close()


def test_a_write_back_that_fails_after_the_last_wait_is_logged_by_close_not_raised(tmp_path, monkeypatch, caplog):
    params, store, optimizer = offloaded_adamw(tmp_path)  # no budget: the four states stay resident
    step(params, optimizer)
    fill_disk_after(monkeypatch, capacity=0)
    optimizer.set_active([])  # every state leaves the device; nothing waits for the write-backs before close
    with caplog.at_level(logging.WARNING):
        store.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"an optimizer-state write-back failed after training ended: writing {STATE_BYTES} bytes of optimizer state "
        f"to the offload folder {store.tier.directory} failed: No space left on device; free at least "
        f"{STATE_BYTES} B there, or pass an offload_dir on a disk with more room"
    ], "one line for the first failure, none for the three after it"
    assert list(tmp_path.iterdir()) == []
