"""``AtomicCheckpointIO``: Lightning checkpoints that survive any filesystem, and loads that say what is wrong.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in the
system temp folder. When the checkpoint directory is on another filesystem (NFS, Lustre, a small tmpfs),
committing it is a copy that truncates the destination first: a full disk or a kill during that copy
destroys the previous checkpoint. This plugin writes each checkpoint next to its destination and renames it
into place (:mod:`lightning_grass.persistence.atomic_files`), and reads a checkpoint with an error that names the
file and what is wrong with it instead of a traceback from the zip reader.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lightning_grass.errors import CheckpointError, MissingPathError
from lightning_grass.persistence.atomic_files import write_atomically

log = logging.getLogger(__name__)

#: The keys Lightning needs to load a checkpoint (its version, for migrations; the module's weights). A checkpoint
#: written by ``Trainer.save_checkpoint`` holds more, but Lightning loads one without the rest, and so does this.
LIGHTNING_CHECKPOINT_KEYS = ("state_dict", "pytorch-lightning_version")

#: What ``torch.load`` raises for a file that is not a whole ``torch.save`` archive.
_UNREADABLE = (RuntimeError, EOFError, ValueError, IndexError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile)

_ZIP_LOCAL_HEADER = b"PK\x03\x04"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save checkpoints atomically on any local or mounted filesystem; load them with a clear error.

    Use it in place of Lightning's default checkpoint plugin::

        trainer = Trainer(plugins=[lightning_grass.AtomicCheckpointIO()], callbacks=[ModelCheckpoint(...)])

    ``GRASSStrategy`` and ``GRASSDDPStrategy`` use it by default. A save serialises the checkpoint in memory
    (as Lightning's own plugin does), writes it to a temporary file in the checkpoint's directory, fsyncs it
    and renames it over the previous file. A save that fails (a full disk, a vanished directory) raises
    :class:`~lightning_grass.errors.StorageError` naming the file and the bytes it needed, and the previous
    checkpoint still loads. Remote URLs (``s3://`` and the like) go through Lightning's plugin unchanged.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg is not supported for "
                f"`{type(self).__name__}`. Please implement your custom `CheckpointIO` to define how you'd like to use "
                "`storage_options`."
            )
        buffer = _serialize(checkpoint)
        log.debug(f"Saving checkpoint atomically: {path}")
        write_atomically(path, lambda file: file.write(buffer.getbuffer()), size=buffer.getbuffer().nbytes)

    @override
    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return read_checkpoint(path, map_location=map_location, weights_only=weights_only)


def read_checkpoint(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    weights_only: bool | None = None,
    mmap: bool = False,
) -> dict[str, Any]:
    """Load a Lightning checkpoint file, or say in one sentence why it cannot be one.

    Args:
        path: The ``.ckpt`` file.
        map_location: As for ``torch.load``.
        weights_only: As for ``torch.load``; ``None`` is torch's default (``True`` since torch 2.6), as in
            Lightning.
        mmap: Map the file instead of reading it (cheap checks of a large checkpoint).

    Returns:
        The checkpoint dictionary.

    Raises:
        MissingPathError: When ``path`` does not exist (in Lightning's words, ``Checkpoint file not found: <path>``)
            or is a directory.
        CheckpointError: When the file is empty, truncated (at any point), not a ``torch.save`` file, or not a
            Lightning checkpoint.
    """
    if not Path(path).exists():
        raise MissingPathError(f"Checkpoint file not found: {path}")
    path = Path(path)
    if path.is_dir():
        raise MissingPathError(f"checkpoint {path} is a directory, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the save that wrote it was cut short")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except (*_UNREADABLE, OSError) as e:
        # torch's zip reader fails on a file cut at some points (for a 0.5 MB checkpoint, anywhere from about 5 to
        # 69 KB) with EINVAL from a read it places outside the file, instead of "failed finding central directory".
        if isinstance(e, OSError) and e.errno != errno.EINVAL:
            raise
        raise CheckpointError(f"checkpoint {path} {_why_unreadable(path, size)}") from e
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in LIGHTNING_CHECKPOINT_KEYS):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"checkpoint {path} is a torch file but not a Lightning checkpoint: it lacks "
            f"{[k for k in LIGHTNING_CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]} "
            f"(it holds {found})"
        )
    return checkpoint


def _why_unreadable(path: Path, size: int) -> str:
    """Tell a truncated ``torch.save`` file from one that never was one."""
    with open(path, "rb") as file:
        head = file.read(256)
    if not head.startswith(_ZIP_LOCAL_HEADER):
        return f"is not a checkpoint ({size:,} bytes, not a torch.save archive)"
    if not zipfile.is_zipfile(path):
        return f"is truncated ({size:,} bytes, the end of the archive is missing)"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if not any(name.endswith("/data.pkl") for name in names):
        return f"is a zip archive but not a torch.save file (it holds {names[:3]})"
    return f"is a torch.save archive that cannot be read ({size:,} bytes)"


def _serialize(checkpoint: dict[str, Any]) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer


def _is_local(path: str | os.PathLike) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)
