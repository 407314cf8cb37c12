"""The base model's cache directory is checked writable before anything is built or converted into it."""

import errno
import os
import tempfile

import pytest

from lightning_grass.app.base_cache import check_cache_writable
from lightning_grass.errors import StorageError

FIX = "set paths.cache_dir (grass-train) to a directory this user can write, or fix its permissions"


@pytest.mark.parametrize("exists", ["nothing", "cache", "cache/base"])
def test_a_writable_cache_passes_and_is_left_as_it_was(tmp_path, exists):
    if exists != "nothing":
        (tmp_path / exists).mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))
    check_cache_writable(tmp_path / "cache" / "base" / "tiny_llama")
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("file", ["cache", "cache/base", "cache/base/tiny_llama"])
def test_a_cache_that_is_a_file_is_named(tmp_path, file):
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text("notes")
    output_dir = tmp_path / "cache" / "base" / "tiny_llama"
    with pytest.raises(StorageError) as refused:
        check_cache_writable(output_dir)
    assert str(refused.value) == (
        f"cannot build the base model in {output_dir}: {tmp_path / file} is a file, not a directory; {FIX}"
    )


@pytest.mark.parametrize("exists", [True, False])
def test_a_cache_without_write_permission_is_named(tmp_path, monkeypatch, exists):
    cache = tmp_path / "cache" / "base"
    read_only = cache if exists else cache.parent
    read_only.mkdir(parents=True)
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # as root: refuse the write as the system refuses another user

        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    try:
        with pytest.raises(StorageError) as refused:
            check_cache_writable(cache / "tiny_llama")
    finally:
        read_only.chmod(0o755)
    problem = "is not writable" if exists else f"cannot be created: {cache.parent} is not writable"
    assert str(refused.value) == (
        f"cannot build the base model in {cache / 'tiny_llama'}: the cache directory {cache} {problem} "
        f"(Permission denied); {FIX}"
    )
