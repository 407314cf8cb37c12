"""Loading Alpaca-format instruction data from a local ``.json`` or ``.jsonl`` file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_grass.app.data.answers import DEFAULT_ANSWER_PATTERN, extract_answer
from lightning_grass.app.data.example import Example
from lightning_grass.app.data.json_text import check_unicode, parse_json
from lightning_grass.app.data.utf8 import read_utf8
from lightning_grass.errors import DataFormatError, MissingPathError

#: File suffixes :func:`load_alpaca` reads.
SUFFIXES = (".json", ".jsonl")


def _string_field(record: dict[str, Any], field: str, where: str, default: str | None = None) -> str:
    """The string value of ``record[field]``.

    Args:
        record: The record.
        field: The field's name.
        where: File and record or line, for the message.
        default: The value of a missing field, and of one that is ``null``; ``None`` makes the field required.

    Returns:
        The field's value.

    Raises:
        DataFormatError: When the field is required and missing, is not a string (a required one ``null``), or
            holds a lone surrogate (:func:`~lightning_grass.app.data.json_text.check_unicode`).
    """
    value = record.get(field)
    if value is None and default is not None:
        return default
    if field not in record:
        raise DataFormatError(f"{where}: missing required field {field!r}; expected a string")
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r}")
    return check_unicode(value, where, field)


def _to_example(record: Any, where: str, answer_pattern: str | None) -> Example:
    """Validate one record and turn it into an ``Example``.

    Args:
        record: The parsed JSON value.
        where: File and record or line, for the message.
        answer_pattern: Pattern for :func:`extract_answer` on ``output``, or ``None`` for no answer.

    Returns:
        The example. An explicit string ``answer`` field wins over the extracted answer.

    Raises:
        DataFormatError: For a record that is not an object, or a missing, non-string or non-Unicode field.
    """
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: record must be a JSON object, got {type(record).__name__}")
    output = _string_field(record, "output", where)
    answer = extract_answer(output, answer_pattern) if answer_pattern else None
    if record.get("answer") is not None:
        answer = _string_field(record, "answer", where)
    return Example(
        instruction=_string_field(record, "instruction", where),
        input=_string_field(record, "input", where, default=""),
        output=output,
        answer=answer,
    )


def _parse_json(text: str, path: Path) -> list[tuple[Any, str]]:
    """Records of a ``.json`` file holding one array, each with where it is.

    Args:
        text: The file's content.
        path: The file, for messages.

    Returns:
        ``(record, "file, record index i")`` pairs.

    Raises:
        DataFormatError: For invalid JSON, JSON nested too deeply to parse, or a top-level value that is not an
            array.
    """
    data = parse_json(text, str(path))
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON array of records at the top level, got {type(data).__name__}")
    return [(record, f"{path}, record index {index}") for index, record in enumerate(data)]


def _parse_jsonl(text: str, path: Path) -> list[tuple[Any, str]]:
    r"""Records of a ``.jsonl`` file, one per non-blank line, each with where it is.

    Lines end at ``"\n"`` only, as JSON Lines says: a string may hold a raw U+2028 or another character
    that ``str.splitlines`` would break at (``json.dumps(..., ensure_ascii=False)`` writes them so). A
    ``"\r"`` before the ``"\n"`` is whitespace to the JSON parser.

    Args:
        text: The file's content.
        path: The file, for messages.

    Returns:
        ``(record, "file, line n")`` pairs, ``n`` counted from 1.

    Raises:
        DataFormatError: For a line that is not valid JSON, or nests too deeply to parse.
    """
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        records.append((parse_json(line, where), where))
    return records


def load_alpaca(path: str | os.PathLike, answer_pattern: str | None = DEFAULT_ANSWER_PATTERN) -> list[Example]:
    r"""Read Alpaca records (``instruction``, optional ``input``, ``output``, optional ``answer``) from a file.

    A ``.json`` file holds one JSON array of records; a ``.jsonl`` file holds one record per line, blank
    lines allowed, each ending with ``"\n"`` or ``"\r\n"``. The file is UTF-8 and may start with a
    byte-order mark. ``instruction`` and ``output`` must be strings, ``input`` is a string, ``null`` or
    missing (both ``""``). The answer is a string ``answer`` field when the record has one, otherwise the answer
    extracted from ``output`` with ``answer_pattern``.

    Args:
        path: The ``.json`` or ``.jsonl`` file, UTF-8.
        answer_pattern: Pattern for :func:`extract_answer` on ``output``; ``None`` leaves ``answer`` as
            ``None`` unless the record has an ``answer`` field.

    Returns:
        The examples, in file order.

    Raises:
        MissingPathError: When ``path`` does not exist or is not readable.
        DataFormatError: For another suffix, a byte that is not UTF-8 (the message names the line and the
            byte offset), invalid JSON or JSON nested too deeply to parse, a record that is not an object, a
            missing or non-string field or one holding a lone surrogate (a ``\ud800`` escape), or a file without
            records. The message names the file and the record index (``.json``) or the line, counted from 1
            (``.jsonl``).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"Alpaca data file {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataFormatError(f"{path}: unsupported suffix {path.suffix!r}; expected one of {SUFFIXES}")
    text = read_utf8(path)
    parse = _parse_json if suffix == ".json" else _parse_jsonl
    records = parse(text, path) if text.strip() else []
    if not records:
        raise DataFormatError(f"{path} contains no examples; expected at least one record")
    return [_to_example(record, where, answer_pattern) for record, where in records]
