"""The exceptions for bad input: a setting, a data file, a path that the user gave.

They subclass the built-in exception a Python user would catch (``ValueError``, ``TypeError``,
``FileNotFoundError``), so ``except ValueError`` keeps working. Their common base, :class:`InputError`,
tells the command-line entry points which failures to report as one line (``error: <message>``, exit
status 2) rather than as a traceback: every other exception is unexpected and keeps its traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user. The message names what was given, what is allowed, and how to fix it."""


class SettingValueError(InputError, ValueError):
    """A setting has a value outside what is allowed."""


class SettingTypeError(InputError, TypeError):
    """A setting has a value of the wrong type."""


class DataFormatError(InputError, ValueError):
    """A data file or dataset does not have the expected format; the message says where and what is wrong."""


class MissingPathError(InputError, FileNotFoundError):
    """A file or directory that a setting names does not exist, or is not what it should be."""


class StorageError(InputError, OSError):
    """A directory the run writes to is full, gone or not writable; the message names it and the bytes needed.

    Nothing already saved there is damaged: a write that fails leaves the previous version of its file intact.
    """


class CheckpointError(InputError, ValueError):
    """A checkpoint cannot be resumed from: not a checkpoint, truncated, or of another model or run.

    The message names the file and what is wrong with it.
    """


class NothingToTrainError(InputError, RuntimeError):
    """The run would train nothing: no gradient reaches the layers it samples.

    The message names the likely cause and the fix.
    """


class MissingPackageError(InputError, ModuleNotFoundError):
    """A feature the user asked for needs a package that is not installed; the message names the extra to install."""
