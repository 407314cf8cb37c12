"""A callback that sends its own process a signal at the end of a chosen step, for grass-train's resume tests.

Loaded into a ``grass-train`` subprocess with ``PYTHONPATH`` set to this folder:
``+callbacks.stop._target_=signal_at_step.SignalAtStep +callbacks.stop.step=7 +callbacks.stop.signal=SIGKILL``.
"""

import os
import signal

from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    """Send ``signal`` (a name, e.g. ``"SIGKILL"``) to this process once ``global_step`` reaches ``step``."""

    def __init__(self, step: int, signal: str) -> None:
        self.step = step
        self.signal = signal
        self.sent = False

    def on_train_batch_end(self, trainer, *unused) -> None:
        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal))
