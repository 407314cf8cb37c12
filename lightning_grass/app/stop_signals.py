"""Stop signals outside ``fit``: SIGTERM or SIGINT during ``grass-train``'s final evaluation and writing.

During ``fit``, :class:`~lightning_grass.persistence.preemption.CheckpointOnSigterm` turns a stop signal into a
checkpoint at the end of the step. After ``fit`` Lightning's handlers are gone, and SIGTERM's default action would
end the process in the middle of the evaluation without a word. Inside :func:`stop_signals_raise` both signals raise
:class:`StopRequested` instead, so the caller can say how to resume and exit with ``128 + signal``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

#: The signals a scheduler or a user sends to stop a job.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """A stop signal arrived. A ``BaseException``, like ``KeyboardInterrupt``, so ``except Exception`` passes it on.

    Attributes:
        signal_name: ``"SIGTERM"`` or ``"SIGINT"``.
        exit_status: ``128 + signal number``, the status a shell reports for a process ended by that signal.
    """

    def __init__(self, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        self.exit_status = 128 + signum
        super().__init__(self.signal_name)


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Raise :class:`StopRequested` in the main thread when SIGTERM or SIGINT arrives inside the block.

    The previous handlers are restored on exit. Outside the main thread, where Python cannot set handlers,
    the block runs with the handlers as they are.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_stop(signum: int, frame: FrameType | None) -> None:
        raise StopRequested(signum)

    previous = {signum: signal.signal(signum, raise_stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
