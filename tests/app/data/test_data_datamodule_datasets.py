"""``InstructionDataModule`` on local datasets read with the ``datasets`` library, and with chat templates."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict
from jsonargparse import ArgumentParser

from lightning_grass.app.data import (
    DataFormatError,
    Example,
    InstructionDataModule,
    build_char_tokenizer,
    encode_prompt,
    format_prompt,
    tokenize_example,
)
from lightning_grass.errors import SettingValueError

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] + ':' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)

ROWS = [{"question": f"Add {i} and 1.", "response": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(6)]

CONVERSATIONS = [
    {
        "conversations": [
            {"role": "user", "content": f"{i}+1?"},
            {"role": "assistant", "content": f"#### {i + 1}"},
            {"role": "user", "content": "x2?"},
            {"role": "assistant", "content": f"#### {2 * i + 2}"},
        ]
    }
    for i in range(4)
]


@pytest.fixture
def tok():
    return build_char_tokenizer()


@pytest.fixture
def parquet(tmp_path):
    path = tmp_path / "train.parquet"
    Dataset.from_list(ROWS).to_parquet(str(path))
    return path


@pytest.fixture
def chat_jsonl(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CONVERSATIONS))
    return path


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _module(tok, task, **overrides):
    settings = dict(task=str(task), tokenizer=tok, num_val=1, num_test=1, batch_size=8, max_length=200)
    settings.update(overrides)
    return InstructionDataModule(**settings)


def test_a_parquet_file_with_renamed_columns(tok, parquet):
    dm = _module(tok, parquet, columns={"instruction": "question", "input": None, "output": "response"})
    dm.setup("fit")
    examples = [Example(r["question"], "", r["response"], r["response"][-1]) for r in ROWS]
    assert dm.val_examples == examples[4:5] and dm.test_examples == examples[5:]
    batch = next(iter(dm.train_dataloader()))
    rows = sorted(
        (input_ids[mask.bool()].tolist(), labels[mask.bool()].tolist())
        for input_ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True)
    )
    expected = []
    for example in examples[:4]:
        prompt, response = ids(tok, format_prompt(example)), [*ids(tok, example.output), tok.eos_token_id]
        expected.append((prompt + response, [-100] * len(prompt) + response))
    assert rows == sorted(expected)


def test_a_parquet_file_reads_with_the_default_columns(tok, tmp_path):
    path = tmp_path / "alpaca.parquet"
    Dataset.from_list([{"instruction": "Say hi.", "input": "", "output": "hi"}] * 3).to_parquet(str(path))
    dm = _module(tok, path, num_test=0)
    dm.setup("fit")
    assert dm.val_examples == [Example("Say hi.", "", "hi", None)]


def test_conversations_with_a_template_train_on_every_assistant_turn(tok, chat_jsonl):
    dm = _module(tok, chat_jsonl, columns={"messages": "conversations"}, chat_template=TEMPLATE)
    dm.setup("fit")
    assert [e.output for e in dm.val_examples] == ["#### 6"] and [e.answer for e in dm.test_examples] == ["8"]
    assert dm.val_examples[0].chat_template == TEMPLATE
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2
    for input_ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        i = int(tok.decode(input_ids[mask.bool()].tolist())[len("<bos>user:")])
        first, second = f"<bos>user:{i}+1?\nassistant:", "user:x2?\nassistant:"
        expected = [
            *[-100] * len(ids(tok, first)),
            *ids(tok, f"#### {i + 1}<eos>\n"),
            *[-100] * len(ids(tok, second)),
            *ids(tok, f"#### {2 * i + 2}<eos>\n"),
        ]
        assert labels[mask.bool()].tolist() == expected
        assert tok.decode(input_ids[mask.bool()].tolist()) == (
            f"{first}#### {i + 1}<eos>\n{second}#### {2 * i + 2}<eos>\n"
        )
    assert tok.decode(encode_prompt(tok, dm.val_examples[0])) == (
        "<bos>user:2+1?\nassistant:#### 3<eos>\nuser:x2?\nassistant:"
    )


def test_auto_uses_the_tokenizers_template_and_none_the_alpaca_prompt(tok, parquet):
    tok.chat_template = TEMPLATE
    columns = {"instruction": "question", "output": "response"}
    auto = _module(tok, parquet, columns=columns)
    auto.setup("fit")
    example = auto.val_examples[0]
    assert example.chat_template == TEMPLATE
    assert tok.decode(next(iter(auto.val_dataloader()))["input_ids"][0].tolist()) == (
        f"<bos>user:Add 4 and 1.\nassistant:{example.output}<eos>\n"
    )
    none = _module(tok, parquet, columns=columns, chat_template="none")
    none.setup("fit")
    assert none.val_examples[0].chat_template is None
    expected = tokenize_example(tok, none.val_examples[0], 200)
    assert next(iter(none.val_dataloader()))["input_ids"][0].tolist() == expected.input_ids


@pytest.mark.parametrize("chat_template", ["auto", "none"])
def test_conversations_without_a_template_are_refused_at_setup(tok, chat_jsonl, chat_template):
    dm = _module(tok, chat_jsonl, columns={"messages": "conversations"}, chat_template=chat_template)
    with pytest.raises(DataFormatError, match=r"^a conversation \(an example with messages\) needs a chat template"):
        dm.setup("fit")


def test_a_missing_column_is_refused_at_setup(tok, parquet):
    dm = _module(tok, parquet, columns={"instruction": "question", "output": "answer_text"})
    with pytest.raises(DataFormatError) as error:
        dm.setup("fit")
    assert str(error.value) == (
        f"{parquet} has no column 'answer_text', which columns maps field 'output' to; its columns are "
        "question, response. Map 'output' to one of them"
    )


def test_a_dataset_dict_folder_and_its_split(tok, tmp_path):
    path = tmp_path / "saved"
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(4)]
    DatasetDict({"train": Dataset.from_list(rows[:1]), "test": Dataset.from_list(rows)}).save_to_disk(str(path))
    dm = _module(tok, path, split="test", num_test=0)
    dm.setup("fit")
    assert dm.val_examples == [Example("Say 3.", "", "3", None)]


def test_json_without_columns_keeps_load_alpaca(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(DataFormatError) as error:
        _module(tok, path).setup("fit")
    assert str(error.value) == f"{path}, line 2: missing required field 'output'; expected a string"
    with pytest.raises(DataFormatError) as error:
        _module(tok, path, columns={"instruction": "instruction", "output": "output"}).setup("fit")
    assert str(error.value) == f"{path}, row 1: column 'output' (field 'output') must be a string, got NoneType None"


def test_settings_are_checked_when_built(tok, parquet):
    with pytest.raises(SettingValueError) as error:
        _module(tok, parquet, columns={"instruction": "question", "output": "response", "prompt": "question"})
    assert str(error.value) == (
        "columns has an unknown key 'prompt'; the keys are instruction, input, output, answer, messages"
    )
    with pytest.raises(SettingValueError) as error:
        _module(tok, "arithmetic", columns={"messages": "conversations"})
    assert str(error.value) == (
        "columns={'messages': 'conversations'} apply only to local datasets, not to generated task 'arithmetic'"
    )
    with pytest.raises(SettingValueError) as error:
        _module(tok, parquet, split="test")
    assert str(error.value) == (
        f"split='test' chooses a split of a DatasetDict folder written by save_to_disk; task='{parquet}' is not a "
        "folder, so leave split='train'"
    )
    with pytest.raises(SettingValueError) as error:
        _module(tok, parquet, chat_template="Auto")
    assert str(error.value) == (
        "chat_template='Auto' is neither one of ('auto', 'none') nor a Jinja template (it has no '{{' or '{%')"
    )
    with pytest.raises(SettingValueError, match="nor an existing data file"):
        _module(tok, parquet.with_suffix(".csv"))


def test_the_lightning_cli_parses_the_new_arguments(parquet):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(InstructionDataModule, "data", skip={"tokenizer"})
    config = parser.parse_args(
        [
            f"--data.task={parquet}",
            "--data.columns={messages: conversations}",
            "--data.split=train",
            f"--data.chat_template={TEMPLATE}",
        ]
    )
    assert config.data.columns == {"messages": "conversations"}
    assert config.data.chat_template == TEMPLATE
    default = parser.parse_args([f"--data.task={parquet}"])
    assert (default.data.columns, default.data.split, default.data.chat_template) == (None, "train", "auto")
    nulls = parser.parse_args([f"--data.task={parquet}", "--data.columns={instruction: q, input: null, output: r}"])
    assert nulls.data.columns == {"instruction": "q", "input": None, "output": "r"}
