"""A killed run's disk tier folder is deleted by the next tier made beside it; a live tier's folder is kept."""

import logging
import os
import signal
import socket
from pathlib import Path

import torch

from lightning_grass.offload import DiskTier
from lightning_grass.offload.disk_tier import OWNER_LOCK

STATE = [torch.arange(16, dtype=torch.float32)]  # 64 bytes


def fork_tier(parent, then, hostname=None):
    """Fork a process that makes a tier in ``parent``, writes one state, sends its folder, then runs ``then()``.

    Returns the child's pid, its folder, and the pipe end that ``then`` reads from in the child.
    """
    folder_read, folder_write = os.pipe()
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(folder_read)
            os.close(go_write)
            if hostname is not None:
                socket.gethostname = lambda: hostname
            tier = DiskTier(parent)
            tier.write(0, STATE).wait()
            os.write(folder_write, str(tier.directory).encode())
            then(tier, go_read)
        finally:
            os._exit(1)  # never return into pytest in the child
    os.close(folder_write)
    os.close(go_read)
    folder = os.read(folder_read, 4096).decode()
    os.close(folder_read)
    assert folder, "the child failed before making its tier"
    return pid, Path(folder), go_write


def die(tier, go):
    """Die by SIGKILL, as an out-of-memory kill does: the tier is never closed."""
    os.kill(os.getpid(), signal.SIGKILL)


def close_when_told(tier, go):
    """Live until the test closes its end of the pipe, then close the tier and exit."""
    os.read(go, 1)
    tier.close()
    os._exit(0)


def killed_tier(parent, hostname=None):
    """The folder that a tier in a process killed by SIGKILL left in ``parent``, and that process's id."""
    pid, folder, go = fork_tier(parent, die, hostname)
    os.close(go)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert sorted(p.name for p in folder.iterdir()) == [OWNER_LOCK, "state_00000.bin"], "the killed run leaked it"
    return folder, pid


def test_a_new_tier_deletes_the_folder_a_killed_process_left_and_keeps_the_others(tmp_path, caplog):
    live = DiskTier(tmp_path)  # held through another descriptor of this process
    unlocked = tmp_path / "grass-offload-without-lock"  # a tier being created, or left by a version without locks
    unlocked.mkdir()
    (unlocked / "state_00000.bin").write_bytes(b"kept")
    other = tmp_path / "checkpoints"
    other.mkdir()
    killed, pid = killed_tier(tmp_path)

    with caplog.at_level(logging.INFO, logger="lightning_grass.offload.disk_tier"):
        new = DiskTier(tmp_path)

    assert not killed.exists()
    owner = f"pid {pid} on {socket.gethostname()}"
    assert caplog.messages == [
        f"deleted the offload folder {killed} that a killed run ({owner}) left, freeing {64 + len(owner)} B"
    ]
    assert sorted(tmp_path.iterdir()) == sorted([live.directory, unlocked, other, new.directory])
    live.close()
    new.close()
    assert sorted(tmp_path.iterdir()) == [other, unlocked]


def test_a_folder_that_a_live_process_holds_is_kept_until_that_process_closes_it(tmp_path):
    pid, held, go = fork_tier(tmp_path, close_when_told)
    try:
        new = DiskTier(tmp_path)
        kept = sorted(p.name for p in held.iterdir())
    finally:
        os.close(go)
        _, status = os.waitpid(pid, 0)
    assert kept == [OWNER_LOCK, "state_00000.bin"], "the live run's state is kept"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert not held.exists(), "its owner closed it"
    new.close()
    assert list(tmp_path.iterdir()) == []


def test_a_folder_another_machine_made_is_kept(tmp_path):
    # On a shared filesystem the lock of a live process on another machine may not be visible from this one.
    killed, _ = killed_tier(tmp_path, hostname="another-machine")
    DiskTier(tmp_path).close()
    assert list(tmp_path.iterdir()) == [killed]


def test_a_killed_runs_folder_is_deleted_before_the_free_space_is_checked(tmp_path, monkeypatch):
    killed, _ = killed_tier(tmp_path)
    checked = []

    def disk_usage(path):
        checked.append(killed.exists())
        return type("Usage", (), {"free": 10**12})()

    monkeypatch.setattr("shutil.disk_usage", disk_usage)
    DiskTier(tmp_path, unit_bytes=[64]).close()
    assert checked == [False]
