"""Checkpoints in ``grass-train``: where they go, which callbacks write them, and which one a run resumes.

A run with ``ckpt_every_n_steps=N`` keeps ``<output_dir>/checkpoints/last.ckpt``, rewritten every ``N``
optimizer steps, at the end of training, and when SIGTERM arrives. ``ckpt_path=last`` resumes from it,
``ckpt_path=/path/x.ckpt`` from any checkpoint. Every save is atomic
(:class:`~lightning_grass.AtomicCheckpointIO`), and a checkpoint is checked before the run resumes from it
(:func:`check_resume_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from typing_extensions import override

from lightning_grass.atomic_checkpoint_io import read_checkpoint
from lightning_grass.errors import CheckpointError, MissingPathError, SettingTypeError, SettingValueError
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
        A :class:`CheckpointAtTrainEnd`, a ``ModelCheckpoint`` that rewrites ``last.ckpt`` every
        ``every_n_steps`` steps, and a :class:`~lightning_grass.preemption.CheckpointOnSigterm` that writes it on
        SIGTERM or SIGINT; no callbacks when ``every_n_steps`` is 0.
    """
    if every_n_steps == 0:
        return []
    directory = Path(output_dir) / CHECKPOINT_DIR
    # No version counter: last.ckpt is always this run's own (a directory holding another run's is refused).
    periodic = ModelCheckpoint(
        dirpath=directory,
        every_n_train_steps=every_n_steps,
        save_top_k=0,
        save_last=True,
        enable_version_counter=False,
    )
    return [CheckpointAtTrainEnd(directory / LAST), periodic, CheckpointOnSigterm(directory / LAST)]


class CheckpointAtTrainEnd(Callback):
    """Write ``path`` when training ends, after the last step's validation.

    ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` at the end of training only if it wrote nothing
    during the run, so the last step of a run whose length is not a multiple of ``every_n_train_steps`` would
    be lost, and a step-based save comes before that step's validation. This save holds the final weights and
    metrics, so that a run stopped during its final evaluation resumes with nothing left to train and the
    same metrics.

    Args:
        path: The checkpoint file, usually ``ModelCheckpoint``'s ``last.ckpt``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


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


def resumes_in_place(ckpt_path: str | None, output_dir: str | Path) -> bool:
    """Whether ``ckpt_path`` continues the run of ``output_dir`` (``"last"``, or a file in its checkpoints)."""
    if ckpt_path is None:
        return False
    if ckpt_path == "last":
        return True
    return Path(ckpt_path).resolve().parent == (Path(output_dir) / CHECKPOINT_DIR).resolve()


def check_resume_checkpoint(path: str | Path, module: nn.Module) -> int:
    """Check that ``path`` is a readable Lightning checkpoint of ``module``'s shape, before ``fit`` uses it.

    The file is memory-mapped, so the check reads little of a large checkpoint.

    Args:
        path: The checkpoint file.
        module: The LightningModule the run will load it into.

    Returns:
        The checkpoint's global step.

    Raises:
        CheckpointError: When the file is empty, truncated, not a Lightning checkpoint, or holds another model
            (a tensor of another shape, or tensors missing or extra), naming the file and the first difference.
    """
    checkpoint = read_checkpoint(path, map_location="cpu", mmap=True)
    saved = checkpoint["state_dict"]
    expected = module.state_dict()
    missing = [name for name in expected if name not in saved]
    extra = [name for name in saved if name not in expected]
    if missing or extra:
        difference = f"lacks {missing[:2]}" if missing else f"has tensors this model lacks, e.g. {extra[:2]}"
        raise CheckpointError(
            f"checkpoint {path} holds another model: it {difference} ({len(missing)} missing, {len(extra)} extra "
            "of this model's tensors); resume with the model it was written with"
        )
    for name, tensor in expected.items():
        other = saved[name]
        if isinstance(other, torch.Tensor) and other.shape != tensor.shape:
            raise CheckpointError(
                f"checkpoint {path} holds another model shape: {name} is {list(other.shape)} in the checkpoint and "
                f"{list(tensor.shape)} in this model; resume with the model it was written with"
            )
    return int(checkpoint["global_step"])
