"""The cache directory a base model is built or converted into, checked writable before the work starts.

Pretraining the tiny base takes minutes and converting a GGUF file tens of seconds; both end by writing the
model into the cache (``paths.cache_dir`` in ``grass-train``) with
:func:`~lightning_grass.persistence.atomic_files.replace_directory_atomically`, which first creates a temporary
sibling of the model's directory. :func:`check_cache_writable` makes that same kind of directory before the work, so a
cache that is a file, read-only or not writable by this user is reported at once rather than after the work is done.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lightning_grass.errors import StorageError

_FIX = "set paths.cache_dir (grass-train) to a directory this user can write, or fix its permissions"


def check_cache_writable(output_dir: str | os.PathLike) -> None:
    """Refuse a base model directory that could not be written, before anything is built into it.

    A temporary directory is made and removed where the atomic write of the model will make its own: in
    ``output_dir``'s parent, or, where that does not exist yet, in the nearest directory above it that does
    (where the write will create the missing ones). Nothing is left behind.

    Args:
        output_dir: The base model's directory, such as ``<cache_dir>/base/tiny_llama``.

    Raises:
        StorageError: When ``output_dir`` or a directory above it is a file, or its parent cannot be written or
            created (read-only, no permission); the message names the directory and the reason.
    """
    output_dir = Path(output_dir)
    blocker = next((path for path in (output_dir, *output_dir.parents) if path.exists() and not path.is_dir()), None)
    if blocker is not None:
        raise StorageError(f"cannot build the base model in {output_dir}: {blocker} is a file, not a directory; {_FIX}")
    cache = output_dir.parent
    existing = next(path for path in output_dir.parents if path.is_dir())
    try:
        with tempfile.TemporaryDirectory(dir=existing, prefix=f".{output_dir.name}.write-check."):
            pass
    except OSError as error:
        problem = "is not writable" if existing == cache else f"cannot be created: {existing} is not writable"
        raise StorageError(
            f"cannot build the base model in {output_dir}: the cache directory {cache} {problem} "
            f"({error.strerror or error}); {_FIX}"
        ) from error
