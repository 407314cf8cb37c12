"""A data file that this process may not read, as a user without read permission meets it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest


def make_unreadable(path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``chmod 000`` ``path``; where this process reads it anyway (as root, or with ``CAP_DAC_OVERRIDE``), make
    ``Path.open`` of that file raise the ``PermissionError`` another user gets.

    Args:
        path: The file.
        monkeypatch: The test's ``monkeypatch``, which undoes the patch.

    Returns:
        ``path``.
    """
    path.chmod(0)
    if os.access(path, os.R_OK):
        opened = Path.open

        def refusing_open(self, *args, **kwargs):
            if self == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return opened(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", refusing_open)
    return path
