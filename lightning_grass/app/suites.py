"""The paper's two test suites, arithmetic and commonsense, read from local files in LLM-Adapters' layout.

LLM-Adapters keeps each test set in ``dataset/<name>/test.json``: a JSON array of records with
``instruction`` (the question, answer options included), ``input`` (usually empty), ``output`` (a
reference solution, unused here) and ``answer`` (the label). :func:`load_suite` reads one suite's sets from
there, under the root you give: the repository's checkout (``<root>/dataset/<name>/test.json``) or its
``dataset`` folder itself (``<root>/<name>/test.json``). Nothing is downloaded. A non-empty ``input`` goes into
the prompt under ``### Input:`` (ours: LLM-Adapters' scripts pass the instruction alone).

The directory names are LLM-Adapters' own; :attr:`Benchmark.title` is the column the paper's tables give the
set.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_grass.app.data import Example
from lightning_grass.app.data.json_text import check_unicode, parse_json
from lightning_grass.app.data.mixture import DATASET_DIR, check_set_names, sets_dir
from lightning_grass.app.data.utf8 import read_utf8
from lightning_grass.app.suite_answers import AnswerRule, FirstChoice, LastNumber
from lightning_grass.errors import DataFormatError, MissingPathError, SettingValueError

#: The file each test set's folder holds.
TEST_FILE = "test.json"

#: The prompt every set is asked in: LLM-Adapters' template, Stanford Alpaca's
#: (:func:`~lightning_grass.app.data.format_prompt`).
PROMPT_FORMAT = "alpaca"


@dataclass(frozen=True)
class Benchmark:
    """One test set of a suite.

    Attributes:
        name: LLM-Adapters' folder name, e.g. ``"gsm8k"`` or ``"social_i_qa"``.
        title: The set's column in the paper's tables, e.g. ``"GSM8K"`` or ``"SIQA"``.
        rule: How its answers are read and scored (:mod:`lightning_grass.app.suite_answers`).
    """

    name: str
    title: str
    rule: AnswerRule


def _numbered(stem: str, count: int) -> FirstChoice:
    """The rule over the answer words ``stem1`` to ``stem<count>``, e.g. ``answer1`` to ``answer5``."""
    return FirstChoice(tuple(f"{stem}{index}" for index in range(1, count + 1)))


#: Each suite's sets, in the column order of the paper's tables. Every arithmetic set but AQuA is scored by its
#: last number, AQuA by its first option letter; the commonsense sets by their first answer word, with
#: LLM-Adapters' word lists (``answer1`` to ``answer5`` for each of SIQA, ARC and OBQA).
SUITES: dict[str, tuple[Benchmark, ...]] = {
    "arithmetic": (
        Benchmark("AddSub", "AddSub", LastNumber()),
        Benchmark("MultiArith", "MultiArith", LastNumber()),
        Benchmark("SingleEq", "SingleEq", LastNumber()),
        Benchmark("gsm8k", "GSM8K", LastNumber()),
        Benchmark("AQuA", "AQuA", FirstChoice(("A", "B", "C", "D", "E"))),
        Benchmark("SVAMP", "SVAMP", LastNumber()),
    ),
    "commonsense": (
        Benchmark("boolq", "BoolQ", FirstChoice(("true", "false"))),
        Benchmark("piqa", "PIQA", _numbered("solution", 2)),
        Benchmark("social_i_qa", "SIQA", _numbered("answer", 5)),
        Benchmark("hellaswag", "HellaSwag", _numbered("ending", 4)),
        Benchmark("winogrande", "WinoGrande", _numbered("option", 2)),
        Benchmark("ARC-Easy", "ARC-e", _numbered("answer", 5)),
        Benchmark("ARC-Challenge", "ARC-c", _numbered("answer", 5)),
        Benchmark("openbookqa", "OBQA", _numbered("answer", 5)),
    ),
}


def select_benchmarks(name: str, sets: Sequence[str] | None = None) -> tuple[Benchmark, ...]:
    """The sets of suite ``name`` that ``sets`` names, in the suite's order; all of them for ``None``.

    Args:
        name: A key of :data:`SUITES`.
        sets: LLM-Adapters' folder names of some of the suite's sets, e.g. ``["boolq", "openbookqa"]``.

    Returns:
        The sets.

    Raises:
        SettingValueError: For an unknown suite, an empty list, a name given twice or a set not in the suite.
    """
    if name not in SUITES:
        raise SettingValueError(f"unknown suite {name!r}; the suites are {list(SUITES)}")
    if sets is None:
        return SUITES[name]
    wanted = check_set_names("sets", sets)
    known = [benchmark.name for benchmark in SUITES[name]]
    unknown = [set_name for set_name in wanted if set_name not in known]
    if unknown:
        raise SettingValueError(
            f"sets={list(wanted)!r}: {unknown} are not sets of the {name} suite; its sets are {known}"
        )
    return tuple(benchmark for benchmark in SUITES[name] if benchmark.name in wanted)


def seeded_subset(count: int, size: int, seed: int, set_name: str) -> list[int]:
    """The indices of a fixed random subset of one set's records, in file order.

    The same ``(count, size, seed, set_name)`` gives the same subset on every machine and Python (the generator
    is Python's Mersenne Twister seeded by a string, which it hashes with SHA-512).

    Args:
        count: The set's records.
        size: How many to take; all of them when ``size >= count``.
        seed: The subset's seed.
        set_name: The set's name, so that sets of equal size get different subsets.

    Returns:
        Sorted indices.
    """
    if size >= count:
        return list(range(count))
    return sorted(random.Random(f"{seed}/{set_name}").sample(range(count), size))


def load_suite(
    name: str, data_root: str | os.PathLike, limit: int | None = None, sets: Sequence[str] | None = None
) -> dict[Benchmark, list[Example]]:
    r"""Read and check every test set of suite ``name``, or those ``sets`` names.

    Args:
        name: ``"arithmetic"`` or ``"commonsense"`` (a key of :data:`SUITES`).
        data_root: A checkout of LLM-Adapters (``<data_root>/dataset/<set>/test.json``) or its ``dataset``
            folder (``<data_root>/<set>/test.json``).
        limit: Read only the first ``limit`` records of each set (all are checked); ``None`` for all.
        sets: LLM-Adapters' names of the sets to read (see :func:`select_benchmarks`); ``None`` for all.

    Returns:
        Each set's examples, in the order of :data:`SUITES`: ``answer`` holds the label as a string, ``output``
        is empty, and ``prompt_format`` is :data:`PROMPT_FORMAT`.

    Raises:
        SettingValueError: For an unknown suite, or ``sets`` that :func:`select_benchmarks` refuses.
        MissingPathError: When ``data_root`` is not a directory, or a set's ``test.json`` is missing (the
            message names every missing set and where it was looked for) or not readable.
        DataFormatError: For a file that is not UTF-8 or not JSON, nests too deeply to parse, is not an array,
            is empty, or has a record that is not an object, lacks a string ``instruction``, has an ``input`` that
            is neither a string nor ``null``, a string holding a lone surrogate (a ``\ud800`` escape), or an
            ``answer`` the set's rule cannot score. The message names the file, the record index (from 0), the
            field, the value and what is allowed.
    """
    benchmarks = select_benchmarks(name, sets)
    folder = sets_dir(
        data_root, "test data root", f"<set>/{TEST_FILE} for the {name} sets {[b.name for b in benchmarks]}"
    )
    files = {benchmark: folder / benchmark.name / TEST_FILE for benchmark in benchmarks}
    missing = [benchmark.name for benchmark, file in files.items() if not file.is_file()]
    if missing:
        raise MissingPathError(
            f"the {name} suite's sets {missing} are missing from {folder}: expected <set>/{TEST_FILE} for each of "
            f"{[b.name for b in benchmarks]} (LLM-Adapters' layout: <root>/{DATASET_DIR}/<set>/{TEST_FILE} or "
            f"<root>/<set>/{TEST_FILE}; the names are case-sensitive)"
        )
    return {benchmark: _read_set(file, benchmark.rule)[:limit] for benchmark, file in files.items()}


def _read_set(path: Path, rule: AnswerRule) -> list[Example]:
    """The examples of one ``test.json``, every record checked.

    Args:
        path: The file.
        rule: The set's answer rule, which checks the labels.

    Returns:
        One example per record, in file order.

    Raises:
        MissingPathError, DataFormatError: As :func:`load_suite`.
    """
    records = parse_json(read_utf8(path), str(path))
    if not isinstance(records, list) or not records:
        got = f"{len(records)} records" if isinstance(records, list) else type(records).__name__
        raise DataFormatError(f"{path}: expected a non-empty JSON array of records at the top level, got {got}")
    return [_to_example(record, f"{path}, record index {index}", rule) for index, record in enumerate(records)]


def _to_example(record: Any, where: str, rule: AnswerRule) -> Example:
    """One checked record as an ``Example``; ``where`` names the file and record in messages."""
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    instruction = record.get("instruction")
    if not isinstance(instruction, str):
        raise DataFormatError(f"{where}: field 'instruction' must be a string, got {instruction!r}")
    check_unicode(instruction, where, "instruction")
    context = record.get("input")
    if context is not None and not isinstance(context, str):
        raise DataFormatError(f"{where}: field 'input' must be a string or null, got {context!r}")
    check_unicode(context or "", where, "input")
    if "answer" not in record:
        raise DataFormatError(f"{where}: missing field 'answer' (the label)")
    check_unicode(str(record["answer"]), where, "answer")
    problem = rule.label_error(record["answer"])
    if problem is not None:
        raise DataFormatError(f"{where}: field 'answer' {problem}")
    return Example(
        instruction=instruction,
        input=context or "",
        output="",
        answer=str(record["answer"]),
        prompt_format=PROMPT_FORMAT,
    )
