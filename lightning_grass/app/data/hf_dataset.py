"""Reading a local dataset with the ``datasets`` library: JSON, JSONL, CSV, Parquet or a ``save_to_disk`` folder."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_from_disk
from datasets.exceptions import DatasetGenerationError

from lightning_grass.app.data.answers import DEFAULT_ANSWER_PATTERN, extract_answer
from lightning_grass.app.data.chat import ROLES
from lightning_grass.app.data.example import Example
from lightning_grass.app.data.utf8 import check_utf8
from lightning_grass.errors import DataFormatError, MissingPathError, SettingValueError

#: File suffixes :func:`load_hf_dataset` reads, with the ``datasets`` reader of each.
READERS = {
    ".json": Dataset.from_json,
    ".jsonl": Dataset.from_json,
    ".csv": Dataset.from_csv,
    ".parquet": Dataset.from_parquet,
}

#: The suffixes of text files, checked to be UTF-8 before their reader sees them.
TEXT_SUFFIXES = (".json", ".jsonl", ".csv")

#: The keys of ``columns``: our fields, each mapped to a column of the dataset.
COLUMN_KEYS = ("instruction", "input", "output", "answer", "messages")

#: The mapping used when ``columns`` is ``None``: the Alpaca schema.
ALPACA_COLUMNS = {"instruction": "instruction", "input": "input", "output": "output"}


def check_columns(columns: Mapping[str, str | None]) -> None:
    """Check that ``columns`` is one of the two forms :func:`load_hf_dataset` reads.

    Args:
        columns: Our fields mapped to column names.

    Raises:
        SettingValueError: For an unknown key, a mapping with both ``messages`` and ``instruction`` /
            ``input`` / ``output``, or one with neither ``messages`` nor both ``instruction`` and ``output``.
    """
    for key in columns:
        if key not in COLUMN_KEYS:
            raise SettingValueError(f"columns has an unknown key {key!r}; the keys are {', '.join(COLUMN_KEYS)}")
    mapped = {key for key, column in columns.items() if column is not None}
    if "messages" in mapped:
        mixed = sorted(mapped & {"instruction", "input", "output"})
        if mixed:
            raise SettingValueError(
                f"columns maps messages and also {', '.join(mixed)}; chat data maps messages (and optionally answer) "
                "only. With grass-train, replace the default mapping: data.columns=null "
                "'data.columns={messages: <column>}'"
            )
        return
    missing = [key for key in ("instruction", "output") if key not in mapped]
    if missing:
        raise SettingValueError(
            f"columns={dict(columns)!r} does not map {' or '.join(missing)}; map instruction and output "
            "(and optionally input and answer) to columns, or messages to a column of conversations"
        )


def _read(path: Path, split: str) -> tuple[Dataset, str]:
    """The dataset in ``path``, held in memory.

    Args:
        path: A file with a suffix in :data:`READERS`, or a ``save_to_disk`` folder.
        split: The split of a ``DatasetDict`` folder.

    Returns:
        The dataset, and how messages name it: the path, and the split of a ``DatasetDict``.

    Raises:
        DataFormatError: For another suffix, an empty file, a text file with a byte that is not UTF-8 (the
            message names the line and the byte offset), a file that its reader refuses (a CSV file with a
            header only, say), or a folder that ``save_to_disk`` did not write.
        SettingValueError: For a ``split`` that the folder lacks, or a ``split`` other than ``"train"`` with a
            single dataset.
    """
    if path.is_dir():
        try:
            loaded = load_from_disk(str(path), keep_in_memory=True)
        except FileNotFoundError as error:
            raise DataFormatError(
                f"{path} is a folder but not a dataset written by Dataset.save_to_disk or DatasetDict.save_to_disk"
            ) from error
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise SettingValueError(f"split={split!r} is not in {path}; its splits are {', '.join(loaded)}")
            return loaded[split], f"{path} (split {split!r})"
        dataset = loaded
    else:
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise DataFormatError(
                f"{path}: unsupported suffix {path.suffix!r}; expected one of {', '.join(READERS)} or a folder "
                "written by save_to_disk"
            )
        if path.stat().st_size == 0:
            raise DataFormatError(f"{path} is empty; expected at least one record")
        if path.suffix.lower() in TEXT_SUFFIXES:
            check_utf8(path)
        # The reader prepares an Arrow copy in its cache; a temporary one keeps it away from the user's data
        # and from ~/.cache, and keep_in_memory holds the rows once the folder is gone.
        with tempfile.TemporaryDirectory(prefix="lightning_grass_datasets_") as cache_dir:
            try:
                dataset = reader(str(path), cache_dir=cache_dir, keep_in_memory=True)
            except (DatasetGenerationError, ValueError) as error:
                detail = error.__cause__ if isinstance(error, DatasetGenerationError) and error.__cause__ else error
                raise DataFormatError(
                    f"{path} could not be read as {path.suffix.lower()[1:]}: {type(detail).__name__}: {detail}"
                ) from error
    if split != "train":
        raise SettingValueError(f"split={split!r} applies to a DatasetDict folder, but {path} holds one dataset")
    return dataset, str(path)


def _string(value: Any, where: str, field: str, column: str) -> str:
    """``value`` when it is a string.

    Args:
        value: The cell.
        where: Dataset and row, for the message.
        field: Our field, for the message.
        column: The column, for the message.

    Returns:
        The value.

    Raises:
        DataFormatError: When the value is not a string.
    """
    if not isinstance(value, str):
        raise DataFormatError(
            f"{where}: column {column!r} (field {field!r}) must be a string, got {type(value).__name__} {value!r}"
        )
    return value


def _messages(value: Any, where: str, column: str) -> tuple[tuple[str, str], ...]:
    """The ``(role, content)`` pairs of one conversation.

    Args:
        value: The cell: a list of ``{"role", "content"}`` dicts.
        where: Dataset and row, for the message.
        column: The column, for the message.

    Returns:
        The pairs, in order.

    Raises:
        DataFormatError: For a value that is not a non-empty list of such dicts, an unknown role, content that
            is not a string, a last message that is not from the assistant, or a first one that is.
    """
    name = f"{where}: column {column!r} (field 'messages')"
    if not isinstance(value, list) or not value:
        raise DataFormatError(
            f"{name} must be a non-empty list of {{'role', 'content'}} messages, got {type(value).__name__} {value!r}"
        )
    pairs = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataFormatError(f"{name}, message {index}: expected a dict with role and content, got {message!r}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataFormatError(f"{name}, message {index}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataFormatError(
                f"{name}, message {index}: content must be a string, got {type(content).__name__} {content!r}"
            )
        pairs.append((role, content))
    if pairs[-1][0] != "assistant":
        raise DataFormatError(f"{name}: the last message must be from the assistant, got {pairs[-1][0]!r}")
    if pairs[0][0] == "assistant":
        raise DataFormatError(f"{name}: the first message must be from the system or the user, got 'assistant'")
    return tuple(pairs)


def _to_example(
    row: dict[str, Any], columns: Mapping[str, str | None], where: str, answer_pattern: str | None
) -> Example:
    """One row as an ``Example``.

    Args:
        row: The row, column names to values.
        columns: A mapping that :func:`check_columns` accepts and whose columns the dataset has.
        where: Dataset and row, for messages.
        answer_pattern: Pattern for :func:`extract_answer` on the output, or ``None`` for no answer.

    Returns:
        The example: a conversation when ``messages`` is mapped, an Alpaca record otherwise.

    Raises:
        DataFormatError: For a value of the wrong type or a malformed conversation.
    """
    if columns.get("messages") is not None:
        messages = _messages(row[columns["messages"]], where, columns["messages"])
        users = [content for role, content in messages if role == "user"]
        instruction, text_input, output = (users[-1] if users else ""), "", messages[-1][1]
    else:
        instruction = _string(row[columns["instruction"]], where, "instruction", columns["instruction"])
        text_input = ""
        if columns.get("input") is not None and row[columns["input"]] is not None:
            text_input = _string(row[columns["input"]], where, "input", columns["input"])
        output = _string(row[columns["output"]], where, "output", columns["output"])
        messages = ()
    answer = extract_answer(output, answer_pattern) if answer_pattern else None
    if columns.get("answer") is not None and row[columns["answer"]] is not None:
        answer = _string(row[columns["answer"]], where, "answer", columns["answer"])
    return Example(instruction=instruction, input=text_input, output=output, answer=answer, messages=messages)


def load_hf_dataset(
    path: str | os.PathLike,
    columns: Mapping[str, str | None] | None = None,
    split: str = "train",
    answer_pattern: str | None = DEFAULT_ANSWER_PATTERN,
) -> list[Example]:
    """Read a local dataset with the ``datasets`` library, mapping its columns to our fields.

    ``path`` is a ``.json`` (an array of records, or one record per line), ``.jsonl``, ``.csv`` or ``.parquet``
    file, or a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``. A text file (JSON,
    JSONL, CSV) must be UTF-8 and may start with a byte-order mark; it is checked before ``datasets`` reads it,
    so that a bad byte is reported with its line and offset. Only local readers are used, so nothing touches
    the network; a file is prepared in a temporary cache and held in memory, so nothing is written next to it.

    ``columns`` takes one of two forms:

    - ``{"instruction": ..., "input": ..., "output": ..., "answer": ...}``: Alpaca records. ``instruction``
      and ``output`` are required; ``input`` and ``answer`` are optional (missing or ``None``). An empty
      cell of the ``input`` column (``None``, as CSV gives) is ``""``.
    - ``{"messages": ..., "answer": ...}``: conversations, each a list of ``{"role", "content"}`` dicts with
      roles ``system``, ``user`` or ``assistant``, the last from the assistant, whose content is the output.

    The answer for exact match is the row's ``answer`` cell when that column is mapped and the cell is not
    ``None``, otherwise the answer extracted from the output with ``answer_pattern``.

    Example::

        examples = load_hf_dataset("train.parquet", columns={"instruction": "question", "output": "response"})

    Args:
        path: The file or folder.
        columns: Our fields mapped to the dataset's columns; ``None`` for ``instruction``, ``input`` and
            ``output`` (then ``input`` may be absent from the dataset).
        split: The split of a ``DatasetDict`` folder; a file or a ``Dataset`` folder holds ``"train"`` only.
        answer_pattern: Pattern for :func:`extract_answer` on the output; ``None`` leaves ``answer`` as ``None``
            unless an ``answer`` column gives one.

    Returns:
        The examples, in the dataset's order.

    Raises:
        MissingPathError: When ``path`` does not exist.
        SettingValueError: For ``columns`` that :func:`check_columns` refuses, or a ``split`` that is not
            there.
        DataFormatError: For another suffix, a file that is empty, not UTF-8 (the message names the line and
            the byte offset of the first bad byte) or that its reader refuses, a folder that is not a saved
            dataset, a mapped column the dataset lacks (the message names it and lists the columns there are),
            or a bad value (the message names the row, counted from 0, and the field).
    """
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"dataset {path} does not exist")
    if columns is None:
        columns = dict(ALPACA_COLUMNS)
        optional_default = {"input"}
    else:
        check_columns(columns)
        optional_default = set()
    dataset, name = _read(path, split)
    for field, column in list(columns.items()):
        if column is not None and column not in dataset.column_names:
            if field in optional_default:
                columns = {**columns, field: None}
                continue
            raise DataFormatError(
                f"{name} has no column {column!r}, which columns maps field {field!r} to; its columns are "
                f"{', '.join(dataset.column_names)}. Map {field!r} to one of them"
                + (" or to null" if field in ("input", "answer") else "")
            )
    return [_to_example(row, columns, f"{name}, row {index}", answer_pattern) for index, row in enumerate(dataset)]
