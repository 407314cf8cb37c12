"""How ``grass-train`` and ``grass-cli`` report bad input: ``error: <message>`` on one line, exit status 2.

Bad input is an :class:`~lightning_grass.errors.InputError` (a setting, a data file, a path), raised directly
or wrapped by Hydra's ``instantiate``. Its message already says what was given and what is allowed, so the
traceback above it only hides it. A malformed command line, which an argument parser told not to exit
reports as an ``argparse.ArgumentError``, is bad input too; its message, in the parser's own words, is put on
one line. Every other exception is unexpected and keeps its traceback. Set ``LIGHTNING_GRASS_TRACEBACK=1`` (or
Hydra's own ``HYDRA_FULL_ERROR=1``) to see the traceback of bad input too.

Lightning's ``Trainer`` refuses its own settings with ``MisconfigurationException``, ``ValueError`` or
``TypeError``; :func:`trainer_settings` turns those into bad input around the Trainer's construction only.
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_grass.errors import InputError, SettingValueError

#: Environment variables that ask for the full traceback of bad input.
TRACEBACK_VARIABLES = ("LIGHTNING_GRASS_TRACEBACK", "HYDRA_FULL_ERROR")

#: The exit status of a command-line entry point given bad input, as for a usage error.
INPUT_ERROR_STATUS = 2

#: The exceptions ``lightning.pytorch.Trainer.__init__`` raises for a setting it cannot take, e.g.
#: ``precision="bogus"`` (ValueError), ``max_steps=-5`` (MisconfigurationException), ``devices="abc"`` (TypeError).
TRAINER_SETTING_ERRORS = (MisconfigurationException, ValueError, TypeError)


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


def one_line(message: str) -> str:
    """``message`` with its line breaks and indentation folded into single spaces."""
    return " ".join(message.split())


@contextmanager
def report_input_errors() -> Iterator[None]:
    """Turn bad input raised inside the block into ``error: <message>`` on stderr and exit status 2.

    Bad input is an :class:`~lightning_grass.errors.InputError`, or an exception raised from one, or an
    ``argparse.ArgumentError`` (a malformed command line, from a parser created with ``exit_on_error=False``).

    Raises:
        SystemExit: With status 2, for bad input (unless a traceback was requested).
    """
    try:
        yield
    except Exception as error:
        input_error = find_input_error(error)
        if traceback_requested() or (input_error is None and not isinstance(error, ArgumentError)):
            raise
        message = str(input_error) if input_error is not None else one_line(str(error))
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(INPUT_ERROR_STATUS) from None


@contextmanager
def trainer_settings(field_prefix: str = "trainer") -> Iterator[None]:
    """Report a setting that Lightning's ``Trainer`` refuses as bad input: ``<field_prefix>: <its message>``.

    Wrap the construction of the Trainer and nothing else, so that only the Trainer's own refusals become bad
    input; a ``ValueError`` from anywhere else stays a failure with its traceback. Under
    :func:`report_input_errors` the run then stops with ``error: trainer: <Lightning's message>`` and exit
    status 2. Our own bad input (a strategy's setting, say) passes through unchanged, as does every other
    exception.

    Example::

        with trainer_settings():
            trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks)

    Args:
        field_prefix: The name of the Trainer's settings, put before Lightning's message: the config node in
            ``grass-train``, the argument group in ``grass-cli``.

    Raises:
        SettingValueError: From an exception of :data:`TRAINER_SETTING_ERRORS` raised in the block, directly or
            wrapped in Hydra's ``InstantiationException``; Lightning's message is put on one line.
    """
    try:
        yield
    except Exception as error:
        if find_input_error(error) is not None:
            raise
        refusal = error.__cause__ if isinstance(error, InstantiationException) else error
        if not isinstance(refusal, TRAINER_SETTING_ERRORS):
            raise
        raise SettingValueError(f"{field_prefix}: {one_line(str(refusal))}") from error
