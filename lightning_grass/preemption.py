"""``CheckpointOnSigterm``: when the job is told to stop, save a checkpoint at the end of the current step.

SLURM and Kubernetes send SIGTERM before they stop a job. Lightning catches it during ``fit`` and stops
at the end of the batch by raising ``SIGTERMException``, without saving anything. This callback saves a
checkpoint just before, at the point where ``ModelCheckpoint`` saves its own, so the run resumes from
it exactly as from any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn


class CheckpointOnSigterm(Checkpoint):
    """Write a checkpoint to ``path`` at the end of the step during which SIGTERM arrived.

    Add it next to your ``ModelCheckpoint`` and point it at the file you resume from, usually that
    callback's ``last.ckpt``::

        trainer = Trainer(callbacks=[ModelCheckpoint(dirpath="ckpt", every_n_train_steps=500, save_last=True),
                                     CheckpointOnSigterm("ckpt/last.ckpt")])

    Lightning then ends ``fit`` by raising ``lightning.pytorch.utilities.exceptions.SIGTERMException`` (a
    ``SystemExit``). Being a ``Checkpoint``, it runs after every other callback's ``on_train_batch_end``, so a
    signal that arrives during those hooks is still caught; one that arrives later in the step (during the
    LightningModule's own ``on_train_batch_end``, say) stops the run without a new checkpoint, and a warning
    says so. Under data parallelism every rank takes part in the save as soon as any rank has
    received the signal. With gradient accumulation, a step cut short keeps its weights and states but
    loses the gradients accumulated so far.

    Args:
        path: The checkpoint file to write. The write is atomic: a save cut short leaves the previous
            file intact.

    Attributes:
        saved_at_step: The global step of the checkpoint written, or ``None`` if none was.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.saved_at_step: int | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Save once, on every rank together, when any rank has received SIGTERM."""
        if self.saved_at_step is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):
            return
        trainer.save_checkpoint(self.path)
        self.saved_at_step = trainer.global_step
        rank_zero_info(f"SIGTERM: checkpoint of step {trainer.global_step} saved to {self.path}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Warn when SIGTERM stopped the run after this step's chance to save."""
        if isinstance(exception, SIGTERMException) and self.saved_at_step is None:
            rank_zero_warn(
                f"SIGTERM arrived too late in step {trainer.global_step} to be saved; {self.path} was not written"
            )
