"""The training mixture of LLM-Adapters-format sets: every record once, a seeded order, and one-line refusals."""

import json

import pytest

from lightning_grass.app.data import InstructionDataModule, build_char_tokenizer
from lightning_grass.app.data.mixture import check_set_names, load_mixture
from lightning_grass.errors import MissingPathError, SettingTypeError, SettingValueError

SETS = {"boolq": ("true", 5), "ARC-Easy": ("answer1", 3), "openbookqa": ("answer2", 4)}


def write_training_sets(root, sets=SETS, nested=True):
    folder = root / "dataset" if nested else root
    for name, (label, count) in sets.items():
        records = [
            {"instruction": f"{name} question {i}", "output": f"the correct answer is {label}", "answer": label}
            for i in range(count)
        ]
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "train.json").write_text(json.dumps(records))
    return root


@pytest.mark.parametrize("nested", [True, False])
def test_every_record_of_every_set_once_in_a_seeded_order(tmp_path, nested):
    root = write_training_sets(tmp_path, nested=nested)
    mixture = load_mixture(root, list(SETS), seed=0)
    expected = {f"{name} question {i}": label for name, (label, count) in SETS.items() for i in range(count)}
    assert {example.instruction: example.answer for example in mixture} == expected
    assert len(mixture) == 12
    assert [e.instruction for e in load_mixture(root, list(SETS), seed=0)] == [e.instruction for e in mixture]
    other = [e.instruction for e in load_mixture(root, list(SETS), seed=1)]
    assert sorted(other) == sorted(expected) and other != [e.instruction for e in mixture]


def test_only_the_named_sets_are_read(tmp_path):
    root = write_training_sets(tmp_path)
    mixture = load_mixture(root, ["openbookqa"], seed=0)
    assert sorted(e.instruction for e in mixture) == [f"openbookqa question {i}" for i in range(4)]


def test_a_missing_set_is_named_with_the_sets_that_are_there(tmp_path):
    root = write_training_sets(tmp_path)
    with pytest.raises(MissingPathError) as raised:
        load_mixture(root, ["boolq", "piqa", "arc-easy"], seed=0)
    assert str(raised.value) == (
        f"the sets ['piqa', 'arc-easy'] have no train.json in {tmp_path / 'dataset'} (expected <set>/train.json; "
        "names are case-sensitive); the sets there are ['ARC-Easy', 'boolq', 'openbookqa']"
    )


def test_a_root_that_is_not_a_directory(tmp_path):
    with pytest.raises(MissingPathError, match=r"data root .* is not a directory: give a checkout of LLM-Adapters"):
        load_mixture(tmp_path / "nowhere", ["boolq"], seed=0)


@pytest.mark.parametrize(
    ("sets", "error", "message"),
    [
        ("boolq", SettingTypeError, "sets='boolq' must be a list of set names, e.g. [boolq, ARC-Easy, openbookqa]"),
        ([1], SettingTypeError, "sets=[1] must be a list of set names, e.g. [boolq, ARC-Easy, openbookqa]"),
        ([], SettingValueError, "sets=[] names no set; give at least one, e.g. [boolq, ARC-Easy, openbookqa]"),
        (
            ["boolq", "piqa", "boolq"],
            SettingValueError,
            "sets=['boolq', 'piqa', 'boolq'] names ['boolq'] more than once; name each set once",
        ),
    ],
)
def test_bad_set_lists_are_refused(sets, error, message):
    with pytest.raises(error) as raised:
        check_set_names("sets", sets)
    assert str(raised.value) == message


def test_the_datamodule_trains_on_the_mixture_and_holds_out_its_tail(tmp_path):
    root = write_training_sets(tmp_path)
    module = InstructionDataModule(
        task=str(root), sets=list(SETS), num_val=3, seed=7, prompt_format="alpaca", chat_template="none"
    )
    module.tokenizer = build_char_tokenizer()
    module.setup("fit")
    order = [e.instruction for e in load_mixture(root, list(SETS), seed=7)]
    assert [e.instruction for e in module.val_examples] == order[-3:]
    assert {e.prompt_format for e in module.val_examples} == {"alpaca"}
    assert len(module.train_dataloader().dataset) == 9


def test_the_datamodule_refuses_sets_with_a_file_or_columns(tmp_path):
    root = write_training_sets(tmp_path)
    file = root / "dataset" / "boolq" / "train.json"
    with pytest.raises(SettingValueError, match=r"task=.* must be a directory with sets=\['boolq'\]"):
        InstructionDataModule(task=str(file), sets=["boolq"])
    with pytest.raises(SettingValueError, match=r"columns=.* do not apply to sets=\['boolq'\]"):
        InstructionDataModule(task=str(root), sets=["boolq"], columns={"instruction": "q", "output": "a"})
