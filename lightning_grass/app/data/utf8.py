"""Reading a data file as UTF-8: the line and byte offset of the first byte that is not, or why it is not readable."""

from __future__ import annotations

import codecs
from pathlib import Path

from lightning_grass.errors import DataFormatError, MissingPathError

#: The byte-order mark some editors write at the start of a UTF-8 file; the loaders accept and drop it.
BOM = "\ufeff"

#: Bytes read at a time by :func:`check_utf8`.
_CHUNK_BYTES = 1 << 20


def _not_utf8(path: Path, error: UnicodeDecodeError, line: int, offset: int) -> DataFormatError:
    """The error for the first byte of ``path`` that is not UTF-8.

    Args:
        path: The file.
        error: The decoder's error; ``error.object[error.start]`` is the bad byte.
        line: The line of the bad byte, counted from 1.
        offset: The bad byte's offset from the start of the file, counted from 0.

    Returns:
        The error to raise.
    """
    return DataFormatError(
        f"{path}, line {line}: byte 0x{error.object[error.start]:02x} at byte offset {offset} (from 0) is not "
        f"valid UTF-8 ({error.reason}); data files must be UTF-8, so convert the file (e.g. with iconv) or fix "
        "that byte"
    )


def not_readable(path: Path, error: PermissionError) -> MissingPathError:
    """The error for a file (data, a model's config or weights) that this process may not read.

    Args:
        path: The file.
        error: The error of opening it.

    Returns:
        The error to raise.
    """
    return MissingPathError(
        f"{path} is not readable ({error.strerror}): give the user running this read permission on it "
        "(chmod a+r), or point to a readable copy"
    )


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file, without the byte-order mark it may start with.

    Args:
        path: The file.

    Returns:
        The decoded text, its line endings as they are.

    Raises:
        MissingPathError: For a file without read permission.
        DataFormatError: For a byte that is not valid UTF-8; the message names the file, the line (from 1) and
            the byte offset (from 0) of the first such byte.
    """
    try:
        data = path.read_bytes()
    except PermissionError as error:
        raise not_readable(path, error) from error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error, data.count(b"\n", 0, error.start) + 1, error.start) from error
    return text.removeprefix(BOM)


def check_utf8(path: Path) -> None:
    """Check that a file is UTF-8, reading it a chunk at a time so that a large file is never held whole.

    Args:
        path: The file.

    Raises:
        MissingPathError, DataFormatError: As :func:`read_utf8`.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = newlines = 0
    try:
        file = path.open("rb")
    except PermissionError as error:
        raise not_readable(path, error) from error
    with file:
        while True:
            chunk = file.read(_CHUNK_BYTES)
            # The decoder keeps the first bytes of a character cut by the chunk's end; an error's position
            # counts them, and they hold no newline (every byte of a multi-byte character is >= 0x80).
            held = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                line = newlines + error.object.count(b"\n", 0, error.start) + 1
                raise _not_utf8(path, error, line, offset - held + error.start) from error
            if not chunk:
                return
            offset += len(chunk)
            newlines += chunk.count(b"\n")
