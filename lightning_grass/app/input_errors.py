"""How ``grass-train`` and ``grass-cli`` report bad input: ``error: <message>`` on one line, exit status 2.

Bad input is an :class:`~lightning_grass.errors.InputError` (a setting, a data file, a path), raised directly
or wrapped by Hydra's ``instantiate``. Its message already says what was given and what is allowed, so the
traceback above it only hides it. Every other exception is unexpected and keeps its traceback. Set
``LIGHTNING_GRASS_TRACEBACK=1`` (or Hydra's own ``HYDRA_FULL_ERROR=1``) to see the traceback of bad input too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from lightning_grass.errors import InputError

#: Environment variables that ask for the full traceback of bad input.
TRACEBACK_VARIABLES = ("LIGHTNING_GRASS_TRACEBACK", "HYDRA_FULL_ERROR")

#: The exit status of a command-line entry point given bad input, as for a usage error.
INPUT_ERROR_STATUS = 2


def find_input_error(error: BaseException) -> InputError | None:
    """``error`` itself, or the input error it was raised from (``raise ... from``), or ``None``."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, InputError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def traceback_requested() -> bool:
    """Whether one of :data:`TRACEBACK_VARIABLES` is set to a true value."""
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in TRACEBACK_VARIABLES)


@contextmanager
def report_input_errors() -> Iterator[None]:
    """Turn bad input raised inside the block into ``error: <message>`` on stderr and exit status 2.

    Raises:
        SystemExit: With status 2, for bad input (unless a traceback was requested).
    """
    try:
        yield
    except Exception as error:
        input_error = find_input_error(error)
        if input_error is None or traceback_requested():
            raise
        print(f"error: {input_error}", file=sys.stderr)
        raise SystemExit(INPUT_ERROR_STATUS) from None
