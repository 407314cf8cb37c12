from __future__ import annotations

import json
import re
import socket

import pytest
from datasets import Dataset, DatasetDict

from lightning_grass.app.data import DataFormatError, Example, load_alpaca, load_hf_dataset
from lightning_grass.errors import MissingPathError, SettingValueError

RECORDS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5\n#### 5"},
    {"instruction": "Pick one.", "input": "A) x\nB) y", "output": "The answer is B\n#### B"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]

EXPECTED = [
    Example("Add 2 and 3.", "", "2 + 3 = 5\n#### 5", "5"),
    Example("Pick one.", "A) x\nB) y", "The answer is B\n#### B", "B"),
    Example("Say hi.", "", "hi", None),
]

CONVERSATIONS = [
    {
        "conversations": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "#### 2"},
        ],
        "gold": "2",
    },
    {
        "conversations": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4 #### 4"},
        ],
        "gold": None,
    },
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every read here is local: opening a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("load_hf_dataset tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _write(tmp_path, fmt, records=RECORDS, name="train"):
    if fmt == "json":
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(records), encoding="utf-8")
    elif fmt == "jsonl":
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(record) for record in records) + "\n", encoding="utf-8")
    elif fmt == "csv":
        path = tmp_path / f"{name}.csv"
        Dataset.from_list(records).to_csv(str(path), index=False)
    elif fmt == "parquet":
        path = tmp_path / f"{name}.parquet"
        Dataset.from_list(records).to_parquet(str(path))
    else:
        path = tmp_path / name
        Dataset.from_list(records).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet", "save_to_disk"])
def test_each_format_reads_the_alpaca_records(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert load_hf_dataset(path) == EXPECTED
    assert load_hf_dataset(str(path), {"instruction": "instruction", "input": "input", "output": "output"}) == EXPECTED
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache written next to the data


def test_a_dataset_dict_folder_reads_the_chosen_split(tmp_path):
    path = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(RECORDS[:2]), "test": Dataset.from_list(RECORDS[2:])}).save_to_disk(path)
    assert load_hf_dataset(path) == EXPECTED[:2]
    assert load_hf_dataset(path, split="test") == EXPECTED[2:]
    with pytest.raises(SettingValueError, match=re.escape(f"split='validation' is not in {path}; its splits are ")):
        load_hf_dataset(path, split="validation")
    with pytest.raises(SettingValueError) as error:
        load_hf_dataset(path, split="validation")
    assert str(error.value).endswith("its splits are train, test")


def test_a_split_other_than_train_needs_a_dataset_dict(tmp_path):
    path = _write(tmp_path, "parquet")
    with pytest.raises(SettingValueError) as error:
        load_hf_dataset(path, split="test")
    assert str(error.value) == f"split='test' applies to a DatasetDict folder, but {path} holds one dataset"


def test_renamed_columns_and_an_answer_column(tmp_path):
    records = [
        {"question": "Add 2 and 3.", "context": None, "response": "5 #### 5", "gold": "five"},
        {"question": "Pick one.", "context": "A) x", "response": "A #### A", "gold": None},
    ]
    path = _write(tmp_path, "parquet", records)
    columns = {"instruction": "question", "input": "context", "output": "response", "answer": "gold"}
    assert load_hf_dataset(path, columns) == [
        Example("Add 2 and 3.", "", "5 #### 5", "five"),
        Example("Pick one.", "A) x", "A #### A", "A"),
    ]
    no_input = {"instruction": "question", "input": None, "output": "response"}
    assert load_hf_dataset(path, no_input, answer_pattern=None) == [
        Example("Add 2 and 3.", "", "5 #### 5", None),
        Example("Pick one.", "", "A #### A", None),
    ]


def test_default_columns_allow_a_dataset_without_input(tmp_path):
    path = _write(tmp_path, "jsonl", [{"instruction": "Say hi.", "output": "hi"}])
    assert load_hf_dataset(path) == [Example("Say hi.", "", "hi", None)]


def test_a_missing_column_names_it_and_lists_the_columns(tmp_path):
    path = _write(tmp_path, "csv")
    with pytest.raises(DataFormatError) as error:
        load_hf_dataset(path, {"instruction": "instruction", "output": "response"})
    assert str(error.value) == (
        f"{path} has no column 'response', which columns maps field 'output' to; its columns are "
        "instruction, input, output. Map 'output' to one of them"
    )
    with pytest.raises(DataFormatError) as error:
        load_hf_dataset(path, {"instruction": "instruction", "input": "context", "output": "output"})
    assert str(error.value) == (
        f"{path} has no column 'context', which columns maps field 'input' to; its columns are "
        "instruction, input, output. Map 'input' to one of them or to null"
    )


def test_columns_are_checked(tmp_path):
    path = _write(tmp_path, "json")
    with pytest.raises(SettingValueError) as error:
        load_hf_dataset(path, {"instruction": "instruction", "output": "output", "prompt": "instruction"})
    assert (
        str(error.value)
        == "columns has an unknown key 'prompt'; the keys are instruction, input, output, answer, messages"
    )
    with pytest.raises(SettingValueError, match=r"^columns maps messages and also input, instruction, output; "):
        load_hf_dataset(path, {"instruction": "instruction", "input": "input", "output": "output", "messages": "m"})
    with pytest.raises(SettingValueError) as error:
        load_hf_dataset(path, {"instruction": "instruction", "output": None})
    assert str(error.value).startswith("columns={'instruction': 'instruction', 'output': None} does not map output;")


def test_bad_values_name_the_row_and_the_field(tmp_path):
    records = [dict(RECORDS[0]), {"instruction": "Say hi.", "input": "", "output": 7}]
    path = _write(tmp_path, "json", records)
    with pytest.raises(DataFormatError) as error:
        load_hf_dataset(path)
    assert str(error.value) == f"{path}, row 1: column 'output' (field 'output') must be a string, got int 7"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "save_to_disk"])
def test_conversations(tmp_path, fmt):
    path = _write(tmp_path, fmt, CONVERSATIONS)
    examples = load_hf_dataset(path, {"messages": "conversations", "answer": "gold"})
    assert examples == [
        Example(
            instruction="1+1?",
            input="",
            output="#### 2",
            answer="2",
            messages=(("system", "Be brief."), ("user", "1+1?"), ("assistant", "#### 2")),
        ),
        Example(
            instruction="2+2?",
            input="",
            output="4 #### 4",
            answer="4",
            messages=(("user", "Hi"), ("assistant", "Hello"), ("user", "2+2?"), ("assistant", "4 #### 4")),
        ),
    ]


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": "Hi"}], "the last message must be from the assistant, got 'user'"),
        (
            [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}],
            "message 0: role 'tool' is not one of system, user, assistant",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}],
            "message 1: content must be a string, got int 3",
        ),
        (
            [{"role": "assistant", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
            "the first message must be from the system or the user, got 'assistant'",
        ),
        ([], "must be a non-empty list of {'role', 'content'} messages, got list []"),
    ],
)
def test_bad_conversations_name_the_row_and_the_field(tmp_path, messages, message):
    records = [CONVERSATIONS[0], {"conversations": messages, "gold": None}]
    path = _write(tmp_path, "jsonl", records)
    with pytest.raises(DataFormatError) as error:
        load_hf_dataset(path, {"messages": "conversations"})
    text = str(error.value)
    assert text.startswith(f"{path}, row 1: column 'conversations' (field 'messages')")
    assert text.endswith(message)


def test_missing_path_unsupported_suffix_and_foreign_folder(tmp_path):
    with pytest.raises(MissingPathError, match="does not exist"):
        load_hf_dataset(tmp_path / "absent.parquet")
    text = tmp_path / "train.txt"
    text.write_text("hello")
    with pytest.raises(DataFormatError) as error:
        load_hf_dataset(text)
    assert str(error.value) == (
        f"{text}: unsupported suffix '.txt'; expected one of .json, .jsonl, .csv, .parquet or a folder written by "
        "save_to_disk"
    )
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataFormatError) as error:
        load_hf_dataset(folder)
    assert str(error.value) == (
        f"{folder} is a folder but not a dataset written by Dataset.save_to_disk or DatasetDict.save_to_disk"
    )


def test_files_the_reader_refuses(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataFormatError) as error:
        load_hf_dataset(empty)
    assert str(error.value) == f"{empty} is empty; expected at least one record"
    header_only = tmp_path / "header.csv"
    header_only.write_text("instruction,input,output\n")
    with pytest.raises(DataFormatError) as error:
        load_hf_dataset(header_only)
    assert (
        str(error.value)
        == f'{header_only} could not be read as csv: ValueError: Instruction "train" corresponds to no data!'
    )
    broken = tmp_path / "broken.parquet"
    broken.write_text("not parquet")
    with pytest.raises(DataFormatError, match=re.escape(f"{broken} could not be read as parquet: ArrowInvalid: ")):
        load_hf_dataset(broken)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("latin1.jsonl", b'{"instruction": "a", "output": "x"}\n{"instruction": "caf\xe9", "output": "x"}\n'),
        ("latin1.json", b'[{"instruction": "a", "output": "x"},\n {"instruction": "caf\xe9", "output": "x"}]'),
        ("latin1.csv", b"instruction,output\ncaf\xe9,x\n"),
    ],
)
def test_non_utf8_text_files_name_the_line_and_the_byte(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(DataFormatError) as info:
        load_hf_dataset(path)
    assert str(info.value) == (
        f"{path}, line 2: byte 0xe9 at byte offset {offset} (from 0) is not valid UTF-8 (invalid "
        "continuation byte); data files must be UTF-8, so convert the file (e.g. with iconv) or fix that byte"
    )


def test_raw_line_separators_in_jsonl(tmp_path):
    separators = "\u2028\u2029\x0b\x0c\x1c\x1d\x1e\x85"
    records = [dict(RECORDS[0], instruction=f"one{separators}line"), RECORDS[1]]
    path = tmp_path / "raw.jsonl"
    path.write_text("\r\n".join(json.dumps(record, ensure_ascii=False) for record in records), encoding="utf-8")
    assert load_hf_dataset(path) == [Example(f"one{separators}line", "", EXPECTED[0].output, "5"), EXPECTED[1]]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_both_loaders_agree_on_a_bom_and_a_null_input(tmp_path, suffix):
    records = [dict(RECORDS[0], input=None), RECORDS[1], {"instruction": "Say hi.", "output": "hi"}]
    text = json.dumps(records) if suffix == ".json" else "\n".join(json.dumps(record) for record in records)
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_hf_dataset(path) == EXPECTED
    assert load_alpaca(path) == EXPECTED
