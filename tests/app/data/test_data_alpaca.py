from __future__ import annotations

import json
import re

import pytest
from unreadable_files import make_unreadable

from lightning_grass.app.data import DataFormatError, Example, load_alpaca
from lightning_grass.errors import MissingPathError

RECORDS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5\n#### 5"},
    {"instruction": "Pick one.", "input": "A) x\nB) y", "output": "The answer is B\n#### B"},
    {"instruction": "Say hi.", "output": "hi"},
    {"instruction": "Count.", "output": "1 2 3\n#### 3", "answer": "three"},
]

EXPECTED = [
    Example("Add 2 and 3.", "", "2 + 3 = 5\n#### 5", "5"),
    Example("Pick one.", "A) x\nB) y", "The answer is B\n#### B", "B"),
    Example("Say hi.", "", "hi", None),
    Example("Count.", "", "1 2 3\n#### 3", "three"),
]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_load_json(tmp_path):
    path = _write(tmp_path / "train.json", json.dumps(RECORDS, indent=2))
    assert load_alpaca(path) == EXPECTED
    assert load_alpaca(str(path)) == EXPECTED


def test_load_jsonl_with_blank_lines(tmp_path):
    lines = [json.dumps(record) for record in RECORDS]
    path = _write(tmp_path / "train.JSONL", "\n".join([lines[0], "", lines[1], "   ", lines[2], lines[3], ""]))
    assert load_alpaca(path) == EXPECTED


def test_answer_pattern(tmp_path):
    path = _write(tmp_path / "d.jsonl", json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[3]))
    assert [example.answer for example in load_alpaca(path, answer_pattern=None)] == [None, "three"]
    assert [example.answer for example in load_alpaca(path, answer_pattern=r"= (\d+)")] == ["5", "three"]
    null_answer = dict(RECORDS[0], answer=None)
    path = _write(tmp_path / "n.json", json.dumps([null_answer]))
    assert load_alpaca(path)[0].answer == "5"


def _error(path):
    with pytest.raises(DataFormatError) as info:
        load_alpaca(path)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_jsonl_invalid_json_names_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", json.dumps(RECORDS[0]) + "\n\n{not json}\n")
    message = _error(path)
    assert message.startswith(f"{path}, line 3: invalid JSON: ")
    assert "Expecting property name enclosed in double quotes" in message


def test_jsonl_record_not_object(tmp_path):
    path = _write(tmp_path / "list.jsonl", json.dumps(RECORDS[0]) + "\n[1, 2]\n")
    assert _error(path) == f"{path}, line 2: record must be a JSON object, got list"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"input": "", "output": "x"}, "missing required field 'instruction'; expected a string"),
        ({"instruction": "q"}, "missing required field 'output'; expected a string"),
        ({"instruction": 3, "output": "x"}, "field 'instruction' must be a string, got int 3"),
        ({"instruction": "q", "output": None}, "field 'output' must be a string, got NoneType None"),
        ({"instruction": "q", "input": ["a"], "output": "x"}, "field 'input' must be a string, got list ['a']"),
        ({"instruction": "q", "output": "x", "answer": 42}, "field 'answer' must be a string, got int 42"),
    ],
)
def test_jsonl_field_errors(tmp_path, record, message):
    path = _write(tmp_path / "fields.jsonl", json.dumps(RECORDS[0]) + "\n" + json.dumps(record) + "\n")
    assert _error(path) == f"{path}, line 2: {message}"


def test_json_errors_name_record_index(tmp_path):
    path = _write(tmp_path / "fields.json", json.dumps([RECORDS[0], RECORDS[1], {"instruction": "q"}]))
    assert _error(path) == f"{path}, record index 2: missing required field 'output'; expected a string"
    path = _write(tmp_path / "scalar.json", json.dumps([RECORDS[0], "text"]))
    assert _error(path) == f"{path}, record index 1: record must be a JSON object, got str"


def test_json_invalid_and_not_array(tmp_path):
    path = _write(tmp_path / "broken.json", '[{"instruction": "q",\n')
    message = _error(path)
    assert message.startswith(f"{path}: invalid JSON: ")
    assert "line 2" in message
    path = _write(tmp_path / "object.json", json.dumps(RECORDS[0]))
    assert _error(path) == f"{path}: expected a JSON array of records at the top level, got dict"


@pytest.mark.parametrize(("name", "text"), [("empty.json", "[]"), ("blank.json", "  \n"), ("blank.jsonl", "\n\n")])
def test_no_examples(tmp_path, name, text):
    path = _write(tmp_path / name, text)
    assert _error(path) == f"{path} contains no examples; expected at least one record"


def test_missing_file_and_unknown_suffix(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match=re.escape(f"Alpaca data file {missing} does not exist")):
        load_alpaca(missing)
    path = _write(tmp_path / "data.csv", "instruction,output\n")
    assert _error(path) == f"{path}: unsupported suffix '.csv'; expected one of ('.json', '.jsonl')"


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_non_utf8_byte_names_line_and_offset(tmp_path, suffix):
    first = json.dumps(RECORDS[0]).encode() + b"\n"
    second = b'{"instruction": "caf\xe9", "output": "x"}\n'
    data = first + second if suffix == ".jsonl" else b"[" + first + b"," + second + b"]"
    path = _write_bytes(tmp_path / f"latin1{suffix}", data)
    offset = data.index(b"\xe9")
    assert offset == len(first) + 20 + (suffix == ".json") * 2
    assert _error(path) == (
        f"{path}, line 2: byte 0xe9 at byte offset {offset} (from 0) is not valid UTF-8 (invalid continuation "
        "byte); data files must be UTF-8, so convert the file (e.g. with iconv) or fix that byte"
    )


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    # str.splitlines breaks at each of these; JSON Lines breaks at "\n" only.
    separators = "\u2028\u2029\x0b\x0c\x1c\x1d\x1e\x85"
    record = {"instruction": f"one{separators}line", "output": "#### 1"}
    lines = [json.dumps(record, ensure_ascii=False), json.dumps(RECORDS[2]), "{broken"]
    path = _write(tmp_path / "raw.jsonl", "\n".join(lines) + "\n")
    message = _error(path)
    assert message.startswith(f"{path}, line 3: invalid JSON: ")
    path = _write(tmp_path / "raw.jsonl", "\n".join(lines[:2]) + "\n")
    assert load_alpaca(path) == [Example(f"one{separators}line", "", "#### 1", "1"), EXPECTED[2]]


def test_jsonl_with_crlf_line_endings(tmp_path):
    lines = [json.dumps(record) for record in RECORDS]
    path = _write_bytes(tmp_path / "windows.jsonl", "\r\n".join([lines[0], "", *lines[1:]]).encode() + b"\r\n")
    assert load_alpaca(path) == EXPECTED
    path = _write_bytes(tmp_path / "windows.jsonl", "\r\n".join([lines[0], "", "[1]"]).encode())
    assert _error(path) == f"{path}, line 3: record must be a JSON object, got list"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_bom_and_null_input(tmp_path, suffix):
    records = [dict(RECORDS[0], input=None), RECORDS[1]]
    text = json.dumps(records) if suffix == ".json" else "\n".join(json.dumps(record) for record in records)
    path = _write_bytes(tmp_path / f"bom{suffix}", b"\xef\xbb\xbf" + text.encode())
    assert load_alpaca(path) == EXPECTED[:2]


TOO_DEEP = (
    "JSON nested too deeply to read (arrays or objects inside one another, deeper than Python's JSON reader allows, "
    "about a thousand levels); a record is one object of strings, so the file is damaged or not instruction data"
)


def test_json_nested_too_deeply_names_the_file_and_the_line(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = _write(tmp_path / "deep.json", deep)
    assert _error(path) == f"{path}: {TOO_DEEP}"
    path = _write(tmp_path / "deep.jsonl", json.dumps(RECORDS[0]) + "\n\n" + deep + "\n")
    assert _error(path) == f"{path}, line 3: {TOO_DEEP}"


def _surrogate(where, field, at):
    return (
        f"{where}: field {field!r} holds the lone surrogate \\ud800 at character {at} (from 0), which is not a "
        "character: a JSON \\u escape between \\ud800 and \\udfff must be half of a surrogate pair. Replace it with "
        "the character meant, or remove it"
    )


@pytest.mark.parametrize("field", ["instruction", "input", "output", "answer"])
def test_a_lone_surrogate_names_the_file_the_record_and_the_field(tmp_path, field):
    record = {**RECORDS[3], "input": "", field: "ab\ud800"}
    # json.dumps writes the lone surrogate as the escape \ud800, as a file holding one does.
    path = _write(tmp_path / "surrogate.json", json.dumps([RECORDS[0], record]))
    assert "\\ud800" in path.read_text()
    assert _error(path) == _surrogate(f"{path}, record index 1", field, 2)
    path = _write(tmp_path / "surrogate.jsonl", json.dumps(RECORDS[0]) + "\n" + json.dumps(record) + "\n")
    assert _error(path) == _surrogate(f"{path}, line 2", field, 2)


def test_a_file_without_read_permission_is_named(tmp_path, monkeypatch):
    path = make_unreadable(_write(tmp_path / "train.json", json.dumps(RECORDS)), monkeypatch)
    with pytest.raises(MissingPathError) as refused:
        load_alpaca(path)
    assert str(refused.value) == (
        f"{path} is not readable (Permission denied): give the user running this read permission on it "
        "(chmod a+r), or point to a readable copy"
    )
