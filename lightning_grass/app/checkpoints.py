"""Checkpoints in ``grass-train``: where they go, which callbacks write them, and which one a run resumes.

A run with ``ckpt_every_n_steps=N`` keeps ``<output_dir>/checkpoints/last.ckpt``, rewritten every ``N``
optimizer steps, at the end of training, and when SIGTERM arrives. ``ckpt_path=last`` resumes from it,
``ckpt_path=/path/x.ckpt`` from any checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_grass.errors import MissingPathError, SettingTypeError, SettingValueError
from lightning_grass.preemption import CheckpointOnSigterm

#: The folder of a run's checkpoints, inside its output directory.
CHECKPOINT_DIR = "checkpoints"

#: The file ``ckpt_path=last`` resumes from, inside :data:`CHECKPOINT_DIR`.
LAST = "last.ckpt"


def check_checkpoint_settings(every_n_steps: object, ckpt_path: object) -> None:
    """Refuse bad checkpoint settings before any work starts.

    Args:
        every_n_steps: ``ckpt_every_n_steps``: an int, ``>= 0``.
        ckpt_path: ``ckpt_path``: ``None``, ``"last"`` or the path of an existing checkpoint file.

    Raises:
        SettingTypeError: When ``every_n_steps`` is not an int or ``ckpt_path`` not a string.
        SettingValueError: When ``every_n_steps`` is negative.
        MissingPathError: When ``ckpt_path`` names a file that does not exist.
    """
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
        raise SettingTypeError(f"ckpt_every_n_steps={every_n_steps!r} must be an int (0 turns checkpoints off)")
    if every_n_steps < 0:
        raise SettingValueError(f"ckpt_every_n_steps={every_n_steps!r} must be >= 0 (0 turns checkpoints off)")
    if ckpt_path is None or ckpt_path == "last":
        return
    if not isinstance(ckpt_path, str):
        raise SettingTypeError(f"ckpt_path={ckpt_path!r} must be 'last' or the path of a .ckpt file")
    if not Path(ckpt_path).is_file():
        raise MissingPathError(f"ckpt_path={ckpt_path!r} is not a file; give 'last' or the path of a .ckpt file")


def checkpoint_callbacks(output_dir: str | Path, every_n_steps: int) -> list[Callback]:
    """The callbacks that keep ``<output_dir>/checkpoints/last.ckpt`` current.

    Args:
        output_dir: The run's directory.
        every_n_steps: Optimizer steps between checkpoints; ``0`` for none.

    Returns:
        A ``ModelCheckpoint`` that rewrites ``last.ckpt`` every ``every_n_steps`` steps and at the end of
        training, and a :class:`~lightning_grass.preemption.CheckpointOnSigterm` that writes it on
        SIGTERM; no callbacks when ``every_n_steps`` is 0.
    """
    if every_n_steps == 0:
        return []
    directory = Path(output_dir) / CHECKPOINT_DIR
    periodic = ModelCheckpoint(dirpath=directory, every_n_train_steps=every_n_steps, save_top_k=0, save_last=True)
    return [periodic, CheckpointOnSigterm(directory / LAST)]


def resume_path(ckpt_path: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint a run resumes from.

    Args:
        ckpt_path: ``None`` to start afresh, ``"last"`` for ``<output_dir>/checkpoints/last.ckpt``, or the
            path of a checkpoint.
        output_dir: The run's directory.

    Returns:
        The checkpoint file, or ``None`` to start from step 0: also for ``"last"`` when the run has no
        checkpoint yet, so that one command both starts a run and continues it after a preemption.
    """
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        return Path(ckpt_path)
    last = Path(output_dir) / CHECKPOINT_DIR / LAST
    return last if last.is_file() else None
