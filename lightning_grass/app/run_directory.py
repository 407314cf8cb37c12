"""One run, one output directory: a lock held while ``grass-train`` runs, and no fresh run over another's checkpoint.

Sweeps reuse output directories and schedulers restart jobs. ``grass-train`` therefore claims its
``paths.output_dir`` before it does any work:

- A second process on the same directory is refused while the first is alive. The claim is an exclusive
  ``flock`` on ``<output_dir>/.grass-train.lock``, which the operating system releases when the holder dies,
  so the file a killed run leaves behind holds nothing.
- A new run (no ``ckpt_path``) into a directory that already holds a checkpoint is refused: its periodic
  checkpoints would otherwise go beside, or over, the other run's, and ``ckpt_path=last`` could later resume
  the wrong one.

Under data parallelism only the launching process (global rank 0) claims the directory; the processes that
Lightning or ``torchrun`` start for the other ranks share it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_grass.errors import SettingValueError

#: The lock file inside an output directory.
LOCK_FILE = ".grass-train.lock"


@contextmanager
def claim_output_dir(output_dir: str | os.PathLike, checkpoint_dir: str, resuming: bool) -> Iterator[None]:
    """Hold ``output_dir`` for this run, or refuse at once.

    Args:
        output_dir: The run's ``paths.output_dir``.
        checkpoint_dir: The folder of checkpoints inside it.
        resuming: Whether the run resumes (``ckpt_path`` is set); a fresh run refuses a directory that
            holds checkpoints.

    Raises:
        SettingValueError: When another live process holds the directory, or a fresh run finds checkpoints.
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
        if not resuming:
            _refuse_existing_checkpoints(output_dir, output_dir / checkpoint_dir)
        yield
    finally:
        os.close(descriptor)


def _refuse_existing_checkpoints(output_dir: Path, checkpoint_dir: Path) -> None:
    existing = sorted(checkpoint_dir.glob("*.ckpt")) if checkpoint_dir.is_dir() else []
    if existing:
        names = ", ".join(p.name for p in existing[:3])
        raise SettingValueError(
            f"paths.output_dir={output_dir} already holds a checkpoint of an earlier run ({checkpoint_dir.name}/"
            f"{names}); resume that run with ckpt_path=last, or start a fresh one with another paths.output_dir "
            f"(or delete {checkpoint_dir})"
        )
