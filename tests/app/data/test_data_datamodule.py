from __future__ import annotations

import json
import re

import pytest
import torch

import lightning_grass.app.data.datamodule as datamodule_module
from lightning_grass.app.data import (
    InstructionDataModule,
    arithmetic_examples,
    build_char_tokenizer,
    multiple_choice_examples,
    tokenize_example,
)
from lightning_grass.errors import DataFormatError, SettingTypeError, SettingValueError


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture
def messages(monkeypatch):
    logged = []
    monkeypatch.setattr(datamodule_module, "rank_zero_info", logged.append)
    return logged


def _module(tok, **overrides):
    settings = dict(task="arithmetic", tokenizer=tok, num_train=40, num_val=10, max_length=256, batch_size=8)
    settings.update(overrides)
    return InstructionDataModule(**settings)


def test_batches_shapes_and_dtypes(tok, messages):
    dm = _module(tok)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 5
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert batch["input_ids"].shape[0] == 8
        assert all(tensor.dtype == torch.long for tensor in batch.values())
        assert all(tensor.shape == batch["input_ids"].shape for tensor in batch.values())
        lengths = batch["attention_mask"].sum(dim=1)
        assert int(lengths.max()) == batch["input_ids"].shape[1]
        assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id)
        assert torch.all(batch["labels"][batch["attention_mask"] == 0] == -100)
    assert sum(int(batch["attention_mask"].sum()) for batch in batches) == sum(len(t.input_ids) for t in dm._train)
    assert (dm.num_truncated, dm.num_skipped) == (0, 0)
    assert messages == []


def test_splits_follow_the_generator(tok, messages):
    dm = _module(tok, seed=7)
    dm.setup("fit")
    examples = arithmetic_examples(50, seed=7)
    assert dm.val_examples == examples[40:]
    expected_val = [tokenize_example(tok, example, 256) for example in examples[40:]]
    val_batch = next(iter(dm.val_dataloader()))
    first = expected_val[0].input_ids
    assert val_batch["input_ids"][0, : len(first)].tolist() == first
    assert val_batch["labels"][0, : len(first)].tolist() == expected_val[0].labels
    train_ids = sorted(tuple(t.input_ids) for t in dm._train)
    assert train_ids == sorted(tuple(tokenize_example(tok, e, 256).input_ids) for e in examples[:40])


def test_a_test_split_follows_validation_and_is_never_trained_on(tok, messages):
    dm = _module(tok, seed=7, num_test=6)
    dm.setup("fit")
    examples = arithmetic_examples(56, seed=7)
    assert dm.val_examples == examples[40:50] and dm.test_examples == examples[50:]
    assert len(dm._train) == 40
    without = _module(tok, seed=7)
    without.setup("fit")
    assert without.test_examples == [] and without.val_examples == dm.val_examples


def test_task_options_reach_the_generator(tok, messages):
    dm = _module(tok, task="multiple_choice", task_options={"num_choices": 2}, seed=3)
    dm.setup("fit")
    assert dm.val_examples == multiple_choice_examples(50, seed=3, num_choices=2)[40:]
    assert all(len(example.instruction.split("\n")) == 3 for example in dm.val_examples)


def _train_order(dm):
    return [row.tolist() for batch in dm.train_dataloader() for row in batch["input_ids"]]


def test_shuffle_is_deterministic_for_a_seed(tok, messages):
    first, again, other = _module(tok, seed=1), _module(tok, seed=1), _module(tok, seed=2)
    for dm in (first, again, other):
        dm.setup("fit")
    order = _train_order(first)
    assert order == _train_order(again)
    assert order == _train_order(first)
    unshuffled = [t.input_ids for t in first._train]
    assert [row[: len(ids)] for row, ids in zip(order, unshuffled, strict=True)] != unshuffled
    val_rows = [row.tolist() for batch in first.val_dataloader() for row in batch["input_ids"]]
    assert [row[: len(t.input_ids)] for row, t in zip(val_rows, first._val, strict=True)] == [
        t.input_ids for t in first._val
    ]
    other_order = [row for batch in other.train_dataloader() for row in batch["input_ids"].tolist()]
    assert other_order != order


def test_truncation_is_counted_and_logged_once(tok, messages):
    dm = _module(tok, num_train=60, num_val=20, max_length=150)
    examples = arithmetic_examples(80, seed=0)
    results = [tokenize_example(tok, example, 150) for example in examples]
    lengths = [len(tokenize_example(tok, example, 10**6).input_ids) for example in examples]
    expected_truncated = [sum(n > 150 for n in lengths[:60]), sum(n > 150 for n in lengths[60:])]
    assert all(result is not None for result in results)
    assert expected_truncated[0] > 0 and expected_truncated[1] > 0
    dm.setup("fit")
    dm.setup("validate")
    assert dm.num_truncated == sum(expected_truncated)
    assert dm.num_skipped == 0
    assert messages == [
        f"{expected_truncated[0]} of 60 training examples were longer than max_length=150 and were truncated",
        f"{expected_truncated[1]} of 20 validation examples were longer than max_length=150 and were truncated",
    ]
    assert max(len(t.input_ids) for t in dm._train) == 150
    assert len(dm._train) == 60 and len(dm.val_examples) == 20


def test_skip_policy_drops_long_examples(tok, messages):
    dm = _module(tok, num_train=60, num_val=20, max_length=150, truncation="skip")
    examples = arithmetic_examples(80, seed=0)
    lengths = [len(tokenize_example(tok, example, 10**6).input_ids) for example in examples]
    skipped_train = sum(n > 150 for n in lengths[:60])
    skipped_val = sum(n > 150 for n in lengths[60:])
    dm.setup("fit")
    assert (dm.num_truncated, dm.num_skipped) == (0, skipped_train + skipped_val)
    assert len(dm._train) == 60 - skipped_train
    assert dm.val_examples == [e for e, n in zip(examples[60:], lengths[60:], strict=True) if n <= 150]
    assert messages[0] == f"{skipped_train} of 60 training examples were longer than max_length=150 and were skipped"


def test_prompt_longer_than_max_length_is_skipped_when_truncating(tok, messages):
    dm = _module(tok, num_train=60, num_val=20, max_length=120)
    dm.setup("fit")
    assert dm.num_skipped > 0 and dm.num_truncated > 0
    assert any(m.endswith("and were skipped (their prompt alone fills max_length)") for m in messages)
    assert len(dm._train) + len(dm.val_examples) + dm.num_skipped == 80


def test_tokenizer_assigned_later(tok, messages):
    dm = _module(None)
    assert "tokenizer" not in dm.hparams and dm.hparams["task"] == "arithmetic"
    with pytest.raises(ValueError, match=r"InstructionDataModule\.tokenizer is None; pass tokenizer=\.\.\. or set"):
        dm.setup("fit")
    dm.tokenizer = tok
    dm.setup("fit")
    assert len(dm._train) == 40


def test_tokenizer_without_pad_token(messages):
    no_pad = build_char_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="tokenizer has no pad token"):
        _module(no_pad).setup("fit")


def test_unknown_task(tok):
    message = (
        "task='gsm8k' is neither a known task (arithmetic, multiple_choice) nor an existing data file "
        "(.json, .jsonl, .csv, .parquet) or save_to_disk folder"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        InstructionDataModule(task="gsm8k")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"truncation": "left"}, "truncation='left' is not supported; use one of ('truncate', 'skip')"),
        ({"num_train": 0}, "num_train=0 must be an integer >= 1"),
        ({"num_val": 0}, "num_val=0 must be an integer >= 1"),
        ({"num_test": -1}, "num_test=-1 must be an integer >= 0"),
        ({"batch_size": 0}, "batch_size=0 must be an integer >= 1"),
        ({"max_length": 0}, "max_length=0 must be an integer >= 1"),
        ({"num_workers": -1}, "num_workers=-1 must be an integer >= 0"),
    ],
)
def test_invalid_arguments(tok, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _module(tok, **overrides)


def test_empty_split_after_skipping(tok, messages):
    dm = _module(tok, max_length=40)
    with pytest.raises(ValueError, match="the training split of task 'arithmetic' contains no examples after skipping"):
        dm.setup("fit")


def test_used_before_setup(tok):
    dm = _module(tok)
    with pytest.raises(RuntimeError, match=r"setup\(\) must run before a dataloader"):
        dm.train_dataloader()
    with pytest.raises(RuntimeError, match=r"setup\(\) must run before val_examples"):
        _ = dm.val_examples
    with pytest.raises(RuntimeError, match=r"setup\(\) must run before test_examples"):
        _ = dm.test_examples


def _write_jsonl(path, count):
    records = [{"instruction": f"What is {i} + 1?", "output": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(count)]
    path.write_text("\n".join(json.dumps(record) for record in records), encoding="utf-8")
    return path


def test_file_task_split(tok, tmp_path, messages):
    path = _write_jsonl(tmp_path / "sums.jsonl", 20)
    dm = _module(tok, task=str(path), num_val=5)
    dm.setup("fit")
    assert [example.answer for example in dm.val_examples] == ["16", "17", "18", "19", "20"]
    assert len(dm._train) == 15
    half = _module(tok, task=str(path), num_val=10)
    half.setup("fit")
    assert [example.answer for example in half.val_examples] == [str(i) for i in range(11, 21)]
    assert len(half._train) == 10
    with_test = _module(tok, task=str(path), num_val=5, num_test=3)
    with_test.setup("fit")
    assert [example.answer for example in with_test.test_examples] == ["18", "19", "20"]
    assert [example.answer for example in with_test.val_examples] == ["13", "14", "15", "16", "17"]
    assert len(with_test._train) == 12
    no_answers = _module(tok, task=str(path), answer_pattern="", num_val=5)
    no_answers.setup("fit")
    assert all(example.answer is None for example in no_answers.val_examples)


def test_file_task_errors(tok, tmp_path, messages):
    single = _write_jsonl(tmp_path / "one.jsonl", 1)
    message = (
        f"task {str(single)!r} holds 1 record; training and validation need at least one each, so it must hold at "
        "least 2"
    )
    with pytest.raises(DataFormatError, match=re.escape(message)):
        _module(tok, task=str(single), num_val=1).setup("fit")
    with pytest.raises(ValueError, match=r"task_options=.* apply only to generated tasks"):
        _module(tok, task=str(single), task_options={"num_choices": 2})


def _untokenizable():
    """A character tokenizer whose ``encode`` fails the test: a check must come before any tokenizing."""
    tokenizer = build_char_tokenizer()

    def encode(*args, **kwargs):
        raise AssertionError("the data was tokenized before the split sizes were checked")

    tokenizer.encode = encode
    return tokenizer


@pytest.mark.parametrize(
    ("num_val", "num_test", "message"),
    [
        (
            1,
            50,
            "num_test=50 leaves 0 of the 40 records of task {task!r} for training and validation, which need "
            "at least one each; num_test must be at most 38",
        ),
        (
            1,
            80,
            "num_test=80 leaves 0 of the 40 records of task {task!r} for training and validation, which need "
            "at least one each; num_test must be at most 38",
        ),
        (
            1,
            39,
            "num_test=39 leaves 1 of the 40 records of task {task!r} for training and validation, which need "
            "at least one each; num_test must be at most 38",
        ),
        (
            200,
            0,
            "num_val=200 is more than half of the 40 records that task {task!r} has for training and "
            "validation (40 records, num_test=0); at least as many must remain for training, so num_val must be at "
            "most 20",
        ),
        (
            16,
            10,
            "num_val=16 is more than half of the 30 records that task {task!r} has for training and "
            "validation (40 records, num_test=10); at least as many must remain for training, so num_val must be at "
            "most 15",
        ),
    ],
)
def test_splits_larger_than_the_data_are_refused_before_tokenizing(tmp_path, num_val, num_test, message):
    task = str(_write_jsonl(tmp_path / "sums.jsonl", 40))
    dm = _module(_untokenizable(), task=task, num_val=num_val, num_test=num_test)
    with pytest.raises(SettingValueError) as info:
        dm.setup("fit")
    assert str(info.value) == message.format(task=task)


def test_the_largest_splits_the_data_allows(tok, tmp_path, messages):
    task = str(_write_jsonl(tmp_path / "sums.jsonl", 40))
    most_test = _module(tok, task=task, num_val=1, num_test=38)
    most_test.setup("fit")
    assert (len(most_test._train), len(most_test.val_examples), len(most_test.test_examples)) == (1, 1, 38)
    most_val = _module(tok, task=task, num_val=15, num_test=10)
    most_val.setup("fit")
    assert (len(most_val._train), len(most_val.val_examples), len(most_val.test_examples)) == (15, 15, 10)
    assert [example.answer for example in most_val.test_examples] == [str(i) for i in range(31, 41)]


@pytest.mark.parametrize("name", ["num_train", "num_val", "num_test", "max_length", "batch_size", "num_workers"])
@pytest.mark.parametrize("value", ["abc", True, float("nan"), 16.0])
def test_counts_that_are_not_integers(tok, name, value):
    minimum = 0 if name in ("num_test", "num_workers") else 1
    with pytest.raises(SettingTypeError) as info:
        _module(tok, **{name: value})
    assert str(info.value) == f"{name}={value!r} must be an integer >= {minimum}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seed": "0"}, "seed='0' must be an integer"),
        ({"seed": 1.5}, "seed=1.5 must be an integer"),
        ({"truncation": 1}, "truncation=1 must be a string, not int"),
        ({"answer_pattern": None}, "answer_pattern=None must be a string, not NoneType"),
        ({"split": 0}, "split=0 must be a string, not int"),
        ({"chat_template": False}, "chat_template=False must be a string, not bool"),
        ({"task": 7}, "task=7 must be a task name or the path of a data file or folder, not int"),
    ],
)
def test_other_settings_of_the_wrong_type(tok, overrides, message):
    with pytest.raises(SettingTypeError) as info:
        _module(tok, **overrides)
    assert str(info.value) == message


def _too_many(name, value, total):
    return (
        f"{name}={value} asks for more examples than a generated task holds in memory: num_train + num_val + "
        f"num_test may be at most 1,000,000 (about 4 KB each once tokenized, 4 GB in all) and is {total:,}; lower "
        f"{name}, or train on a local dataset"
    )


@pytest.mark.parametrize(
    ("task", "overrides", "message"),
    [
        ("arithmetic", {"num_train": 10**11}, _too_many("num_train", 10**11, 10**11 + 10)),
        ("multiple_choice", {"num_test": 10**11}, _too_many("num_test", 10**11, 10**11 + 50)),
        (
            "arithmetic",
            {"num_train": 600_000, "num_val": 400_000, "num_test": 1},
            _too_many("num_train", 600_000, 1_000_001),
        ),
    ],
)
def test_a_generated_task_larger_than_memory_is_refused_before_generating(tok, monkeypatch, task, overrides, message):
    monkeypatch.setitem(datamodule_module.TASKS, task, None)  # a call would fail: nothing may be generated
    with pytest.raises(SettingValueError) as refused:
        _module(tok, task=task, **overrides)
    assert str(refused.value) == message


def test_the_largest_generated_task_and_any_count_for_a_file_are_accepted(tok, tmp_path):
    _module(tok, num_train=999_000, num_val=990, num_test=10)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "q", "output": "a"}] * 4))
    _module(tok, task=str(data), num_train=10**11, num_val=1)  # num_train is unused for a file
