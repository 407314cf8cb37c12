r"""Reading JSON data files: a value nested too deeply, and a string that is not Unicode text, named where they are.

Python's JSON reader recurses once per level of arrays and objects, so a file nested deeper than the
interpreter's recursion limit (about a thousand levels) raises ``RecursionError`` rather than
``JSONDecodeError``; and it decodes a ``\ud800`` escape that is not half of a surrogate pair into a string
that no tokenizer and no UTF-8 writer accepts. :func:`parse_json` and :func:`check_unicode` turn both into a
:class:`~lightning_grass.errors.DataFormatError` that names the file and the record or line.
"""

from __future__ import annotations

import json
from typing import Any

from lightning_grass.errors import DataFormatError


def parse_json(text: str, where: str) -> Any:
    """The value of one JSON text.

    Args:
        text: The JSON text: a whole ``.json`` file, or one line of a ``.jsonl`` file.
        where: The file, and the line for a ``.jsonl`` file, for messages.

    Returns:
        The parsed value.

    Raises:
        DataFormatError: For text that is not valid JSON, or that nests arrays and objects too deeply to parse.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{where}: invalid JSON: {error}") from error
    except RecursionError as error:
        raise DataFormatError(
            f"{where}: JSON nested too deeply to read (arrays or objects inside one another, deeper than Python's "
            "JSON reader allows, about a thousand levels); a record is one object of strings, so the file is "
            "damaged or not instruction data"
        ) from error


def check_unicode(value: str, where: str, field: str) -> str:
    r"""``value`` when it is Unicode text, which a lone surrogate such as the escape ``"\ud800"`` is not.

    Args:
        value: A string read from a JSON record.
        where: The file and record or line, for the message.
        field: The record's field, for the message.

    Returns:
        ``value``.

    Raises:
        DataFormatError: For a string holding a lone surrogate; the message names the field, the code point (as
            the escape) and its position, counted in characters from 0.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataFormatError(
            f"{where}: field {field!r} holds the lone surrogate \\u{ord(value[error.start]):04x} at character "
            f"{error.start} (from 0), which is not a character: a JSON \\u escape between \\ud800 and \\udfff "
            "must be half of a surrogate pair. Replace it with the character meant, or remove it"
        ) from error
    return value
