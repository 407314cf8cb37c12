"""A training mixture of LLM-Adapters-format sets: each set's ``train.json`` under one root, shuffled together.

LLM-Adapters keeps every commonsense set as ``dataset/<set>/train.json`` and ``test.json`` (Alpaca records with
an ``answer`` label); the paper's Commonsense170K is the mixture of eight such training splits. A mixture of
any of them is read here from the root you give: a checkout of LLM-Adapters (``<root>/dataset/<set>/...``) or its
``dataset`` folder (``<root>/<set>/...``). The test splits are scored by :mod:`lightning_grass.app.suites`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

from lightning_grass.app.data.alpaca import load_alpaca
from lightning_grass.app.data.example import Example
from lightning_grass.errors import MissingPathError, SettingTypeError, SettingValueError

#: The folder of a checkout of LLM-Adapters that holds the sets.
DATASET_DIR = "dataset"

#: The file each set's folder holds its training split in.
TRAIN_FILE = "train.json"


def sets_dir(data_root: str | os.PathLike, root_name: str, wanted: str) -> Path:
    """The folder that holds the sets' folders: ``<data_root>/dataset`` when there is one, else ``data_root``.

    Args:
        data_root: A checkout of LLM-Adapters, or its ``dataset`` folder; it must be a directory.
        root_name: What the message calls ``data_root``, e.g. ``"data root"``.
        wanted: What the message says ``data_root`` should hold, e.g. ``"<set>/train.json for the sets ['boolq']"``.

    Returns:
        The folder.

    Raises:
        MissingPathError: When ``data_root`` is not a directory.
    """
    root = Path(data_root)
    if not root.is_dir():
        raise MissingPathError(
            f"{root_name} {str(root)!r} is not a directory: give a checkout of LLM-Adapters or its "
            f"{DATASET_DIR!r} folder, holding {wanted}"
        )
    nested = root / DATASET_DIR
    return nested if nested.is_dir() else root


def check_set_names(field: str, sets: object) -> tuple[str, ...]:
    """Check a list of set names given by a setting.

    Args:
        field: The setting's name, for messages.
        sets: Its value.

    Returns:
        The names, as a tuple.

    Raises:
        SettingTypeError: For a value that is not a list of strings.
        SettingValueError: For an empty list or a name given twice.
    """
    if isinstance(sets, str) or not isinstance(sets, Sequence) or not all(isinstance(s, str) for s in sets):
        raise SettingTypeError(f"{field}={sets!r} must be a list of set names, e.g. [boolq, ARC-Easy, openbookqa]")
    if not sets:
        raise SettingValueError(f"{field}=[] names no set; give at least one, e.g. [boolq, ARC-Easy, openbookqa]")
    repeated = sorted({s for s in sets if list(sets).count(s) > 1})
    if repeated:
        raise SettingValueError(f"{field}={list(sets)!r} names {repeated} more than once; name each set once")
    return tuple(sets)


def load_mixture(
    data_root: str | os.PathLike, sets: Sequence[str], seed: int, answer_pattern: str | None = None
) -> list[Example]:
    """Every record of each set's training split, shuffled together by ``seed``.

    Args:
        data_root: A checkout of LLM-Adapters or its ``dataset`` folder.
        sets: The sets' folder names, e.g. ``["boolq", "ARC-Easy", "openbookqa"]`` (case-sensitive).
        seed: Seed of the shuffle; the same seed gives the same order.
        answer_pattern: Pattern for the answer in ``output`` of records without an ``answer`` field.

    Returns:
        The examples of all sets, in one seeded random order.

    Raises:
        MissingPathError: When ``data_root`` is not a directory, or a set's ``train.json`` is missing; the
            message names every missing set and where it was looked for.
        DataFormatError: For a file :func:`~lightning_grass.app.data.load_alpaca` refuses.
    """
    folder = sets_dir(data_root, "data root", f"<set>/{TRAIN_FILE} for the sets {list(sets)}")
    files = [folder / name / TRAIN_FILE for name in sets]
    missing = [name for name, file in zip(sets, files, strict=True) if not file.is_file()]
    if missing:
        found = sorted(p.name for p in folder.iterdir() if (p / TRAIN_FILE).is_file())
        raise MissingPathError(
            f"the sets {missing} have no {TRAIN_FILE} in {folder} (expected <set>/{TRAIN_FILE}; names are "
            f"case-sensitive); the sets there are {found}"
        )
    examples = [example for file in files for example in load_alpaca(file, answer_pattern)]
    random.Random(seed).shuffle(examples)
    return examples
