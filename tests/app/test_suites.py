"""Reading the paper's suites from LLM-Adapters' layout, and what a missing set or a malformed record says."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from suite_files import write_suite

from lightning_grass.app.data import format_prompt
from lightning_grass.app.suites import SUITES, load_suite, seeded_subset, select_benchmarks
from lightning_grass.errors import DataFormatError, MissingPathError, SettingValueError


def test_the_sets_carry_llm_adapters_names_and_the_papers_columns():
    assert [(b.name, b.title) for b in SUITES["arithmetic"]] == [
        ("AddSub", "AddSub"),
        ("MultiArith", "MultiArith"),
        ("SingleEq", "SingleEq"),
        ("gsm8k", "GSM8K"),
        ("AQuA", "AQuA"),
        ("SVAMP", "SVAMP"),
    ]
    assert [(b.name, b.title) for b in SUITES["commonsense"]] == [
        ("boolq", "BoolQ"),
        ("piqa", "PIQA"),
        ("social_i_qa", "SIQA"),
        ("hellaswag", "HellaSwag"),
        ("winogrande", "WinoGrande"),
        ("ARC-Easy", "ARC-e"),
        ("ARC-Challenge", "ARC-c"),
        ("openbookqa", "OBQA"),
    ]


@pytest.mark.parametrize("nested", [True, False], ids=["checkout", "dataset_folder"])
def test_either_root_reads_the_same_sets(tmp_path, nested):
    records = {"gsm8k": [{"instruction": "Add 2 and 2.", "input": None, "output": "4", "answer": "4.0"}]}
    write_suite(tmp_path, "arithmetic", records, nested=nested)
    sets = load_suite("arithmetic", tmp_path)
    assert [b.name for b in sets] == [b.name for b in SUITES["arithmetic"]]
    (gsm8k,) = next(examples for b, examples in sets.items() if b.name == "gsm8k")
    assert (gsm8k.instruction, gsm8k.input, gsm8k.answer) == ("Add 2 and 2.", "", "4.0")
    assert format_prompt(gsm8k) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd 2 and 2.\n\n### Response:\n"
    )
    assert [len(examples) for examples in load_suite("arithmetic", tmp_path, limit=2).values()] == [2, 2, 2, 1, 2, 2]


def test_a_missing_set_is_named_with_where_it_was_looked_for(tmp_path):
    write_suite(tmp_path, "commonsense")
    for name in ("hellaswag", "openbookqa"):
        (tmp_path / "dataset" / name / "test.json").unlink()
    with pytest.raises(MissingPathError) as error:
        load_suite("commonsense", tmp_path)
    assert str(error.value).startswith(
        f"the commonsense suite's sets ['hellaswag', 'openbookqa'] are missing from {tmp_path / 'dataset'}: expected "
        "<set>/test.json for each of ['boolq', 'piqa', 'social_i_qa', 'hellaswag', 'winogrande', 'ARC-Easy', "
        "'ARC-Challenge', 'openbookqa']"
    )


def test_set_names_are_case_sensitive(tmp_path):
    write_suite(tmp_path, "arithmetic", nested=False)
    (tmp_path / "gsm8k").rename(tmp_path / "GSM8K")
    with pytest.raises(MissingPathError, match=r"sets \['gsm8k'\] are missing"):
        load_suite("arithmetic", tmp_path)


def test_a_root_that_is_not_a_directory(tmp_path):
    with pytest.raises(MissingPathError, match=r"test data root '.*nowhere' is not a directory"):
        load_suite("arithmetic", tmp_path / "nowhere")


def test_an_unknown_suite():
    with pytest.raises(
        SettingValueError, match=r"unknown suite 'maths'; the suites are \['arithmetic', 'commonsense'\]"
    ):
        load_suite("maths", ".")


@pytest.mark.parametrize(
    ("set_name", "content", "message"),
    [
        ("boolq", "[{", "{file}: invalid JSON: "),
        (
            "boolq",
            '{"instruction": "x"}',
            "{file}: expected a non-empty JSON array of records at the top level, got dict",
        ),
        ("boolq", "[]", "{file}: expected a non-empty JSON array of records at the top level, got 0 records"),
        (
            "boolq",
            '[{"instruction": "a", "answer": "true"}, 7]',
            "{file}, record index 1: a record must be a JSON object, got int",
        ),
        (
            "piqa",
            '[{"input": "", "answer": "solution1"}]',
            "{file}, record index 0: field 'instruction' must be a string, got None",
        ),
        (
            "piqa",
            '[{"instruction": "a", "input": 3, "answer": "solution1"}]',
            "{file}, record index 0: field 'input' must be a string or null, got 3",
        ),
        ("piqa", '[{"instruction": "a"}]', "{file}, record index 0: missing field 'answer' (the label)"),
        (
            "boolq",
            '[{"instruction": "a", "answer": "true"}, {"instruction": "b", "answer": "yes"}]',
            "{file}, record index 1: field 'answer' must be one of ['true', 'false'], got 'yes'",
        ),
    ],
)
def test_a_malformed_file_names_the_record_field_and_value(tmp_path, set_name, content, message):
    write_suite(tmp_path, "commonsense")
    file = tmp_path / "dataset" / set_name / "test.json"
    file.write_text(content)
    with pytest.raises(DataFormatError) as error:
        load_suite("commonsense", tmp_path)
    assert str(error.value).startswith(message.format(file=file))


def test_a_number_label_that_is_not_a_number(tmp_path):
    write_suite(tmp_path, "arithmetic", {"SVAMP": [{"instruction": "a", "answer": "four"}]})
    file = tmp_path / "dataset" / "SVAMP" / "test.json"
    with pytest.raises(DataFormatError) as error:
        load_suite("arithmetic", tmp_path)
    assert str(error.value) == (
        f"{file}, record index 0: field 'answer' must be a number or a string holding one, got 'four'"
    )


def test_a_file_that_is_not_utf8(tmp_path):
    write_suite(tmp_path, "arithmetic")
    file = tmp_path / "dataset" / "AQuA" / "test.json"
    file.write_bytes(json.dumps([{"instruction": "caf", "answer": "A"}]).encode().replace(b"caf", b"caf\xe9"))
    with pytest.raises(DataFormatError, match=r"line 1: byte 0xe9 at byte offset \d+ \(from 0\) is not valid UTF-8"):
        load_suite("arithmetic", tmp_path)


def test_some_sets_of_a_suite_in_the_suites_order(tmp_path):
    root = write_suite(tmp_path, "commonsense")
    for benchmark in SUITES["commonsense"]:
        if benchmark.name not in ("boolq", "openbookqa", "ARC-Easy"):
            shutil.rmtree(root / "dataset" / benchmark.name)  # the other sets need not be there
    sets = load_suite("commonsense", root, sets=["openbookqa", "boolq", "ARC-Easy"])
    assert [benchmark.title for benchmark in sets] == ["BoolQ", "ARC-e", "OBQA"]
    assert select_benchmarks("commonsense") == SUITES["commonsense"]


def test_a_set_outside_the_suite_is_named():
    with pytest.raises(SettingValueError) as raised:
        select_benchmarks("arithmetic", ["gsm8k", "boolq"])
    assert str(raised.value) == (
        "sets=['gsm8k', 'boolq']: ['boolq'] are not sets of the arithmetic suite; its sets are "
        "['AddSub', 'MultiArith', 'SingleEq', 'gsm8k', 'AQuA', 'SVAMP']"
    )


def test_a_seeded_subset_is_fixed_sorted_and_differs_between_sets_and_seeds():
    subset = seeded_subset(1000, 100, seed=0, set_name="boolq")
    assert subset == sorted(set(subset)) and len(subset) == 100 and subset[0] >= 0 and subset[-1] < 1000
    assert seeded_subset(1000, 100, seed=0, set_name="boolq") == subset
    assert seeded_subset(1000, 100, seed=1, set_name="boolq") != subset
    assert seeded_subset(1000, 100, seed=0, set_name="openbookqa") != subset
    assert seeded_subset(7, 100, seed=0, set_name="boolq") == list(range(7))  # a set smaller than the sample


def test_a_file_nested_too_deeply_is_named(tmp_path):
    write_suite(tmp_path, "commonsense")
    file = tmp_path / "dataset" / "piqa" / "test.json"
    file.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataFormatError) as error:
        load_suite("commonsense", tmp_path)
    assert str(error.value) == (
        f"{file}: JSON nested too deeply to read (arrays or objects inside one another, deeper than Python's JSON "
        "reader allows, about a thousand levels); a record is one object of strings, so the file is damaged or not "
        "instruction data"
    )


@pytest.mark.parametrize(
    ("record", "field", "at"),
    [
        ({"instruction": "Is it?\ud800", "answer": "true"}, "instruction", 6),
        ({"instruction": "Is it?", "input": "\ud800 passage", "answer": "true"}, "input", 0),
        ({"instruction": "Is it?", "answer": "tr\ud800ue"}, "answer", 2),
    ],
)
def test_a_lone_surrogate_names_the_file_the_record_and_the_field(tmp_path, record, field, at):
    write_suite(tmp_path, "commonsense", {"boolq": [{"instruction": "Q?", "answer": "false"}, record]})
    file = tmp_path / "dataset" / "boolq" / "test.json"
    assert "\\ud800" in file.read_text()
    with pytest.raises(DataFormatError) as error:
        load_suite("commonsense", tmp_path)
    assert str(error.value) == (
        f"{file}, record index 1: field {field!r} holds the lone surrogate \\ud800 at character {at} (from 0), which "
        "is not a character: a JSON \\u escape between \\ud800 and \\udfff must be half of a surrogate pair. Replace "
        "it with the character meant, or remove it"
    )


def test_a_file_without_read_permission_is_named(tmp_path, monkeypatch):
    write_suite(tmp_path, "commonsense")
    file = tmp_path / "dataset" / "hellaswag" / "test.json"
    file.chmod(0)
    if os.access(file, os.R_OK):  # as root: refuse it as the system refuses another user
        read_bytes = Path.read_bytes

        def refuse(path):
            if path == file:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return read_bytes(path)

        monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(MissingPathError) as error:
        load_suite("commonsense", tmp_path)
    assert str(error.value) == (
        f"{file} is not readable (Permission denied): give the user running this read permission on it (chmod a+r), "
        "or point to a readable copy"
    )
