"""Atomic writes: a failure at any point leaves the previous version whole and no temporary file behind."""

import errno
import os
import subprocess
import sys
import tempfile

import pytest

from lightning_grass.errors import StorageError
from lightning_grass.persistence.atomic_files import (
    _host,
    _temporary_prefix,
    remove_stale_temporaries,
    replace_directory_atomically,
    write_atomically,
    write_bytes_atomically,
)


def _full_disk_after(limit):
    """A writer that fails like a full disk once ``limit`` bytes are written."""

    def write(file):
        file.write(b"x" * limit)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def _dead_pid():
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_a_write_replaces_the_file_and_leaves_only_it(tmp_path):
    path = tmp_path / "metrics.json"
    write_bytes_atomically(path, b"old")
    write_bytes_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_full_disk_keeps_the_previous_file_and_names_the_file_and_the_bytes(tmp_path):
    path = tmp_path / "last.ckpt"
    write_bytes_atomically(path, b"step 4")
    with pytest.raises(StorageError) as raised:
        write_atomically(path, _full_disk_after(100), size=4096)
    assert str(raised.value).startswith(f"cannot write {path}: No space left on device (4,096 bytes to write);")
    assert path.read_bytes() == b"step 4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "the temporary file is removed"


def test_an_interrupted_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.ckpt"
    write_bytes_atomically(path, b"step 4")

    def interrupted(file):
        file.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, interrupted)
    assert path.read_bytes() == b"step 4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_nothing_is_staged_in_the_system_temp_folder(tmp_path, monkeypatch):
    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    destination = tmp_path / "out"
    write_bytes_atomically(destination / "last.ckpt", b"x" * 10_000)
    replace_directory_atomically(destination / "model", lambda d: (d / "weights.bin").write_bytes(b"w"))
    assert list(system_temp.iterdir()) == []
    assert sorted(p.name for p in destination.iterdir()) == ["last.ckpt", "model"]


def test_the_leftover_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    path = tmp_path / "last.ckpt"
    # A child process starts a write, then dies by SIGKILL before renaming it into place.
    script = (
        "import os, signal, sys\n"
        "from lightning_grass.persistence.atomic_files import write_atomically\n"
        "def die(file):\n"
        "    file.write(b'partial'); file.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "write_atomically(sys.argv[1], die)\n"
    )
    child = subprocess.run([sys.executable, "-c", script, str(path)], check=False)
    assert child.returncode == -9
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.")
    assert not path.exists()

    write_bytes_atomically(path, b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_the_temporaries_of_a_live_writer_are_kept(tmp_path):
    path = tmp_path / "last.ckpt"
    descriptor, live = tempfile.mkstemp(dir=tmp_path, prefix=_temporary_prefix(path), suffix=".tmp")
    os.close(descriptor)
    dead = tmp_path / f".last.ckpt.{_host()}.{_dead_pid()}.abc.tmp"
    dead.write_bytes(b"")
    assert remove_stale_temporaries(path) == [dead]
    assert os.path.exists(live), "this process is alive: its temporary stays"


def test_a_directory_is_replaced_whole(tmp_path):
    model = tmp_path / "model"
    replace_directory_atomically(model, lambda d: (d / "a.bin").write_bytes(b"1"))
    replace_directory_atomically(model, lambda d: (d / "b.bin").write_bytes(b"2"))
    assert sorted(p.name for p in model.iterdir()) == ["b.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_directory_build_that_fails_keeps_the_previous_directory(tmp_path):
    model = tmp_path / "model"
    replace_directory_atomically(model, lambda d: (d / "a.bin").write_bytes(b"1"))

    def fails(directory):
        (directory / "half.bin").write_bytes(b"h")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(StorageError, match=r"cannot write .*model: No space left on device \(after 1 bytes"):
        replace_directory_atomically(model, fails)
    assert sorted(p.name for p in model.iterdir()) == ["a.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_files_and_directories_get_the_permissions_of_an_ordinary_write(tmp_path):
    umask = os.umask(0o022)
    try:
        write_bytes_atomically(tmp_path / "metrics.json", b"{}")
        replace_directory_atomically(tmp_path / "model", lambda d: (d / "w.bin").write_bytes(b"w"))
    finally:
        os.umask(umask)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


def test_a_directory_is_replaced_whole_where_names_cannot_be_exchanged(tmp_path, monkeypatch):
    from lightning_grass.persistence import atomic_files

    monkeypatch.setattr(atomic_files, "_exchange", lambda a, b: False)
    model = tmp_path / "model"
    replace_directory_atomically(model, lambda d: (d / "a.bin").write_bytes(b"1"))
    replace_directory_atomically(model, lambda d: (d / "b.bin").write_bytes(b"2"))
    assert sorted(p.name for p in model.iterdir()) == ["b.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_files_and_directories_are_written_where_permissions_cannot_change(tmp_path, monkeypatch):
    # Some network and FUSE filesystems refuse chmod: the temporaries keep the mount's permissions.
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "chmod", refuse)
    write_bytes_atomically(tmp_path / "metrics.json", b"{}")
    replace_directory_atomically(tmp_path / "model", lambda d: (d / "w.bin").write_bytes(b"w"))
    assert (tmp_path / "metrics.json").read_bytes() == b"{}"
    assert (tmp_path / "model" / "w.bin").read_bytes() == b"w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model"]


def test_a_directory_where_the_file_should_go_is_named(tmp_path):
    (tmp_path / "last.ckpt").mkdir()
    with pytest.raises(StorageError) as raised:
        write_bytes_atomically(tmp_path / "last.ckpt", b"x")
    assert str(raised.value) == (
        f"cannot write {tmp_path / 'last.ckpt'}: it is a directory, not a file; move it away and run again"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
