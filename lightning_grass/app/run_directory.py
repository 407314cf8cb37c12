"""One run, one output directory: a lock held while ``grass-train`` runs, and no fresh run over another's checkpoint.

Sweeps reuse output directories and schedulers restart jobs. ``grass-train`` therefore claims its
``paths.output_dir`` before it does any work:

- A second process on the same directory is refused while the first is alive. The claim is an exclusive
  ``flock`` on ``<output_dir>/.grass-train.lock``, which the operating system releases when the holder dies,
  so the file a killed run leaves behind holds nothing.
- A new run (no ``ckpt_path``) into a directory that already holds a checkpoint is refused: its periodic
  checkpoints would otherwise go beside, or over, the other run's, and ``ckpt_path=last`` could later resume
  the wrong one.
- A run that would start from step 0 in a directory holding a finished run's results (``metrics.json`` or
  ``model/``) is refused too, checkpoint or not: it would replace them. Only a resume from that run's own
  checkpoint continues it (and then rewrites its results).

:func:`check_output_dir` runs earlier still, before Hydra creates the directory or writes into it: a path that
is a file, or a directory that cannot be created or written, is refused in one line.

Under data parallelism only the launching process (global rank 0) claims the directory; the processes that
Lightning or ``torchrun`` start for the other ranks share it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_grass.errors import SettingValueError, StorageError

#: The lock file inside an output directory.
LOCK_FILE = ".grass-train.lock"

#: What a finished run leaves in its output directory, which a run from step 0 would replace.
RESULT_NAMES = ("metrics.json", "model")


@contextmanager
def claim_output_dir(output_dir: str | os.PathLike, checkpoint_dir: str, resuming: bool) -> Iterator[None]:
    """Hold ``output_dir`` for this run, or refuse at once.

    Args:
        output_dir: The run's ``paths.output_dir``.
        checkpoint_dir: The folder of checkpoints inside it.
        resuming: Whether the run resumes (``ckpt_path`` is set); a fresh run refuses a directory that
            holds checkpoints.

    Raises:
        SettingValueError: When another live process holds the directory, when a fresh run finds checkpoints,
            or when a run that would start from step 0 finds a finished run's results.
    """
    if getattr(rank_zero_only, "rank", 0) != 0:
        yield
        return
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock_path = output_dir / LOCK_FILE
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 256, 0).decode(errors="replace").strip() or "another process"
            raise SettingValueError(
                f"paths.output_dir={output_dir} is in use by a running grass-train ({holder}); give each run its "
                "own paths.output_dir, or wait for that run to end"
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        checkpoints = _checkpoints(output_dir / checkpoint_dir)
        if not resuming and checkpoints:
            _refuse_existing_checkpoints(output_dir, output_dir / checkpoint_dir, checkpoints)
        if not (resuming and checkpoints):
            _refuse_existing_results(output_dir)
        yield
    finally:
        os.close(descriptor)


def check_output_dir(output_dir: str | os.PathLike, setting: str = "paths.output_dir") -> None:
    """Create ``output_dir`` if needed and write a byte into it (fsynced), or refuse in one line.

    ``grass-train`` checks its ``paths.output_dir`` before Hydra writes into it, and ``grass-evaluate`` its
    ``--out`` before it loads the model, so that no work is done that could not be saved.

    Args:
        output_dir: The directory.
        setting: The setting that named it, as the user writes it (``paths.output_dir``, ``--out``).

    Raises:
        StorageError: When it is an existing file, or cannot be created or written (no permission, a read-only
            or full filesystem); the message names the setting, the path and the reason.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise StorageError(f"{setting}={output_dir} is a file, not a directory; give a directory")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir) as probe:
            probe.write(b"\0")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise StorageError(
            f"{setting}={output_dir} cannot be written ({error.strerror or error}); give a directory this user "
            "can write, on a filesystem with free space"
        ) from error


def _checkpoints(checkpoint_dir: Path) -> list[Path]:
    return sorted(checkpoint_dir.glob("*.ckpt")) if checkpoint_dir.is_dir() else []


def _refuse_existing_checkpoints(output_dir: Path, checkpoint_dir: Path, existing: list[Path]) -> None:
    names = ", ".join(p.name for p in existing[:3])
    raise SettingValueError(
        f"paths.output_dir={output_dir} already holds a checkpoint of an earlier run ({checkpoint_dir.name}/"
        f"{names}); resume that run with ckpt_path=last, or start a fresh one with another paths.output_dir"
    )


def _refuse_existing_results(output_dir: Path) -> None:
    results = [
        f"{name}/" if (output_dir / name).is_dir() else name for name in RESULT_NAMES if (output_dir / name).exists()
    ]
    if results:
        raise SettingValueError(
            f"paths.output_dir={output_dir} already holds the results of an earlier run ({', '.join(results)}) "
            "and no checkpoint to resume it from; give this run another paths.output_dir (or move those results "
            "away first)"
        )
