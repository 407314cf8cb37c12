"""``CheckpointOnSigterm``: when the job is told to stop, save a checkpoint at the end of the current step.

SLURM and Kubernetes send SIGTERM before they stop a job. Lightning catches it during ``fit`` and stops
at the end of the batch by raising ``SIGTERMException``, without saving anything. This callback saves a
checkpoint just before, at the point where ``ModelCheckpoint`` saves its own, so the run resumes from
it exactly as from any other checkpoint. SIGINT (Ctrl+C) is handled the same way: Lightning alone would
stop at once, save nothing and exit 1.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override


class CheckpointOnSigterm(Checkpoint):
    """Write a checkpoint to ``path`` at the end of the step during which SIGTERM arrived.

    Add it next to your ``ModelCheckpoint`` and point it at the file you resume from, usually that
    callback's ``last.ckpt``::

        trainer = Trainer(callbacks=[ModelCheckpoint(dirpath="ckpt", every_n_train_steps=500, save_last=True),
                                     CheckpointOnSigterm("ckpt/last.ckpt")])

    With ``on_sigint=True`` (the default), SIGINT (Ctrl+C) during ``fit`` does what SIGTERM does: it is handed
    to Lightning's SIGTERM handler, so the step finishes, this callback saves, and ``fit`` ends with
    ``SIGTERMException``; :attr:`stop_signal` then says which signal it was. A second Ctrl+C interrupts at
    once, as without this callback.

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
        on_sigint: Treat SIGINT as SIGTERM during ``fit`` (main thread only).

    Attributes:
        saved_at_step: The global step of the checkpoint written, or ``None`` if none was.
        stop_signal: ``"SIGTERM"`` or ``"SIGINT"`` once one has asked the run to stop, else ``None``.
    """

    def __init__(self, path: str | Path, on_sigint: bool = True) -> None:
        self.path = Path(path)
        self.on_sigint = on_sigint
        self.saved_at_step: int | None = None
        self.stop_signal: str | None = None
        self._previous_sigint: Any = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.on_sigint or threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Save once, on every rank together, when any rank has received SIGTERM (or SIGINT)."""
        if self.saved_at_step is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):
            return
        self.stop_signal = self.stop_signal or "SIGTERM"
        trainer.save_checkpoint(self.path)
        self.saved_at_step = trainer.global_step
        rank_zero_info(f"{self.stop_signal}: checkpoint of step {trainer.global_step} saved to {self.path}")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Warn when a stop signal ended the run after this step's chance to save."""
        if isinstance(exception, SIGTERMException) and self.saved_at_step is None:
            self.stop_signal = self.stop_signal or "SIGTERM"
            rank_zero_warn(
                f"{self.stop_signal} arrived too late in step {trainer.global_step} to be saved; {self.path} was not "
                "written"
            )

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        """Hand the first SIGINT to the SIGTERM handler Lightning installed; a second one interrupts at once."""
        sigterm_handler = signal.getsignal(signal.SIGTERM)
        if self.stop_signal is not None or not callable(sigterm_handler):
            signal.signal(signal.SIGINT, self._previous_sigint or signal.default_int_handler)
            self._previous_sigint = None
            raise KeyboardInterrupt
        self.stop_signal = "SIGINT"
        sigterm_handler(signal.SIGTERM, frame)
