"""``grass-train`` that sends itself a signal as its final evaluation starts, for the tests of signals after fit.

``python signal_in_evaluation.py SIGTERM <overrides>``: the signal is sent at the second exact-match scoring,
the first after ``fit`` when ``evaluate_before`` is on.
"""

import os
import signal
import sys

from lightning_grass.app import train


def main() -> None:
    name = sys.argv.pop(1)
    scored = []
    exact_match = train.exact_match

    def exact_match_then_signal(*args, **kwargs):
        scored.append(True)
        if len(scored) == 2:
            os.kill(os.getpid(), getattr(signal, name))
        return exact_match(*args, **kwargs)

    train.exact_match = exact_match_then_signal
    train.main()


if __name__ == "__main__":
    main()
