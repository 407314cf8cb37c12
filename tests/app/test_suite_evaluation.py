"""Scoring a suite: hand-computed scores from fixed responses, the files written, the config node, a tiny Llama."""

import json

import pytest
from omegaconf import OmegaConf
from suite_files import write_suite
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_grass.app.suite_evaluation import SuiteEvaluation, score_suite
from lightning_grass.app.suites import SUITES, seeded_subset
from lightning_grass.errors import SettingTypeError, SettingValueError

# (instruction, label, the stub's response) per set, and how many of each set are right, worked out by hand.
CASES = {
    "AddSub": [
        ("a1", "4", "The answer is 4."),  # right
        ("a2", "1234", "So 1,234 apples"),  # right: thousands separator
        ("a3", "3.5", "It costs 3.50\n\n### Response: 9"),  # right: 3.50, and the second header cuts the 9 off
        ("a4", "-5", "It is 5."),  # wrong: the sign
    ],
    "MultiArith": [("m1", "15.0", "15"), ("m2", "6.0", "no idea")],  # 1 of 2: no number is wrong
    "SingleEq": [("s1", "0.6666666666666666", "2/3 = 0.667")],  # 1 of 1: within 1e-3
    "gsm8k": [
        ("g1", "576.0", "24 * 24 = 576 tiles. The answer is 576."),  # right
        ("g2", "120.0", "The answer is 120 and then 12"),  # wrong: the last number is 12
    ],
    "AQuA": [
        ("q1", "B", "The answer is (B)."),  # right
        ("q2", "C", "Answer: (C)"),  # wrong: the "A" of "Answer" comes first
        ("q3", "D", "the answer is (d)"),  # wrong: no capital letter
    ],
    "SVAMP": [("v1", "8.0", "8"), ("v2", "2.0", "")],  # 1 of 2
}
RIGHT = {"AddSub": (3, 4), "MultiArith": (1, 2), "SingleEq": (1, 1), "gsm8k": (1, 2), "AQuA": (1, 3), "SVAMP": (1, 2)}
AVERAGE = (75 + 50 + 100 + 50 + 100 / 3 + 50) / 6  # 59.72


def stub(examples):
    responses = {instruction: response for cases in CASES.values() for instruction, _, response in cases}
    return [responses[example.instruction] for example in examples]


def test_fixed_responses_score_as_worked_out_by_hand(tmp_path):
    records = {
        name: [{"instruction": i, "input": "", "answer": label} for i, label, _ in cases]
        for name, cases in CASES.items()
    }
    evaluation = SuiteEvaluation("arithmetic", write_suite(tmp_path / "data", "arithmetic", records))
    result = score_suite("arithmetic", evaluation.sets, stub)
    assert {s.benchmark.name: (s.correct, s.total) for s in result.scores} == RIGHT
    assert result.average_percent == pytest.approx(AVERAGE)
    assert result.metrics() == {
        "suite": "arithmetic",
        "suite_average_percent": pytest.approx(AVERAGE),
        "suite_accuracy_percent": pytest.approx(
            {"AddSub": 75.0, "MultiArith": 50.0, "SingleEq": 100.0, "GSM8K": 50.0, "AQuA": 100 / 3, "SVAMP": 50.0}
        ),
    }

    out = tmp_path / "out"
    evaluation.write(result, out, "stub")
    table = (out / "arithmetic.md").read_text().splitlines()
    assert table[2:5] == [
        "| Model | AddSub | MultiArith | SingleEq | GSM8K | AQuA | SVAMP | Avg. |",
        "|---|---|---|---|---|---|---|---|",
        "| stub | 75.00 | 50.00 | 100.00 | 50.00 | 33.33 | 50.00 | 59.72 |",
    ]
    assert "| AQuA | 1 | 3 | 33.33 |" in table
    summary = json.loads((out / "arithmetic.json").read_text())
    assert {name: (s["correct"], s["total"]) for name, s in summary["sets"].items()} == RIGHT
    assert summary["sets"]["gsm8k"]["title"] == "GSM8K" and summary["average_percent"] == pytest.approx(AVERAGE)
    assert (summary["batch_size"], summary["max_new_tokens"], summary["decoding"]) == (16, 256, "greedy")
    lines = [json.loads(line) for line in (out / "arithmetic_predictions.jsonl").read_text().splitlines()]
    assert len(lines) == sum(total for _, total in RIGHT.values())
    by_instruction = {line["instruction"]: line for line in lines}
    assert by_instruction["a3"] == {
        "set": "AddSub",
        "index": 2,
        "instruction": "a3",
        "label": "3.5",
        "response": "It costs 3.50",
        "prediction": 3.5,
        "correct": True,
    }
    assert (by_instruction["q2"]["prediction"], by_instruction["m2"]["prediction"]) == ("A", None)


def test_the_config_node(tmp_path):
    root = str(write_suite(tmp_path, "commonsense"))
    assert SuiteEvaluation.from_config(None) is None
    evaluation = SuiteEvaluation.from_config({"name": "commonsense", "data_root": root})
    assert (evaluation.batch_size, evaluation.max_new_tokens, evaluation.limit) == (16, 32, None)  # LLM-Adapters' 32
    assert [b.name for b in evaluation.sets] == [b.name for b in SUITES["commonsense"]]
    limited = SuiteEvaluation.from_config(OmegaConf.create({"name": "commonsense", "data_root": root, "limit": 1}))
    assert {len(examples) for examples in limited.sets.values()} == {1}


@pytest.mark.parametrize(
    ("node", "error", "message"),
    [
        (
            {"name": "arithmetic", "data_root": "???"},
            SettingValueError,
            "evaluate_suite needs ['data_root']: evaluate_suite.name (one of ['arithmetic', 'commonsense']) and "
            "evaluate_suite.data_root (a checkout of LLM-Adapters or its dataset folder)",
        ),
        (
            {"name": "arithmetic", "data_root": "x", "batchsize": 8},
            SettingValueError,
            "evaluate_suite: unknown settings ['batchsize']; the settings are "
            "['name', 'data_root', 'batch_size', 'max_new_tokens', 'limit', 'sets', 'sample', 'sample_seed']",
        ),
        (
            {"name": "maths", "data_root": "x"},
            SettingValueError,
            "evaluate_suite.name='maths' is not a suite; use one of ['arithmetic', 'commonsense']",
        ),
        (
            {"name": "arithmetic", "data_root": 3},
            SettingTypeError,
            "evaluate_suite.data_root=3 must be a directory's path",
        ),
        (
            {"name": "arithmetic", "data_root": "x", "batch_size": 0},
            SettingValueError,
            "evaluate_suite.batch_size=0 must be an integer >= 1",
        ),
        (
            {"name": "arithmetic", "data_root": "x", "max_new_tokens": "8"},
            SettingTypeError,
            "evaluate_suite.max_new_tokens='8' must be an integer >= 1",
        ),
        (
            {"name": "arithmetic", "data_root": "x", "limit": 0},
            SettingValueError,
            "evaluate_suite.limit=0 must be an integer >= 1",
        ),
        (
            {"name": "arithmetic", "data_root": "x", "sample": 0},
            SettingValueError,
            "evaluate_suite.sample=0 must be an integer >= 1",
        ),
    ],
)
def test_a_bad_config_node_is_named(node, error, message):
    with pytest.raises(error) as raised:
        SuiteEvaluation.from_config(OmegaConf.create(node))
    assert str(raised.value) == message


def test_a_tiny_llama_scored_on_the_commonsense_suite(tmp_path, tiny_pretrained_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_pretrained_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_pretrained_dir, local_files_only=True)
    evaluation = SuiteEvaluation(
        "commonsense", write_suite(tmp_path / "data", "commonsense"), batch_size=2, max_new_tokens=4
    )
    result = evaluation.run(model, tokenizer, tmp_path / "out", "tiny")
    # A random model's answers are arbitrary: the files must agree with each other and with the rules.
    summary = json.loads((tmp_path / "out" / "commonsense.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "out" / "commonsense_predictions.jsonl").read_text().splitlines()]
    rules = {b.name: b.rule for b in SUITES["commonsense"]}
    for name, scores in summary["sets"].items():
        mine = [line for line in lines if line["set"] == name]
        assert scores["total"] == len(mine) == 3
        assert scores["correct"] == sum(line["correct"] for line in mine)
        for line in mine:
            assert line["prediction"] == rules[name].extract(line["response"])
            assert line["correct"] == rules[name].is_correct(line["prediction"], line["label"])
    assert summary["average_percent"] == pytest.approx(result.average_percent)
    assert summary["average_percent"] == pytest.approx(sum(s["accuracy_percent"] for s in summary["sets"].values()) / 8)


def test_a_seeded_sample_of_some_sets_is_the_same_records_for_every_model(tmp_path):
    records = {
        name: [{"instruction": f"{name} {i}", "input": "", "output": "", "answer": label} for i in range(9)]
        for name, label in (("boolq", "true"), ("openbookqa", "answer1"), ("ARC-Easy", "answer2"))
    }
    root = str(write_suite(tmp_path, "commonsense", records))
    node = {"name": "commonsense", "data_root": root, "sets": ["openbookqa", "boolq"], "sample": 4, "sample_seed": 3}
    evaluation = SuiteEvaluation.from_config(OmegaConf.create(node))
    assert [b.name for b in evaluation.sets] == ["boolq", "openbookqa"]
    for benchmark, examples in evaluation.sets.items():
        indices = seeded_subset(9, 4, 3, benchmark.name)
        assert evaluation.indices[benchmark] == indices
        assert [e.instruction for e in examples] == [f"{benchmark.name} {i}" for i in indices]
    again = SuiteEvaluation.from_config(node)
    assert {b.name: [e.instruction for e in x] for b, x in again.sets.items()} == {
        b.name: [e.instruction for e in x] for b, x in evaluation.sets.items()
    }


def test_the_predictions_name_each_records_index_in_its_file(tmp_path):
    records = {"boolq": [{"instruction": f"q{i}", "input": "", "output": "", "answer": "true"} for i in range(6)]}
    root = write_suite(tmp_path, "commonsense", records)
    evaluation = SuiteEvaluation("commonsense", root, sets=["boolq"], sample=3, sample_seed=0)
    result = score_suite(
        "commonsense", evaluation.sets, lambda examples: ["true" for _ in examples], evaluation.indices
    )
    evaluation.write(result, tmp_path / "out", "stub")
    lines = [json.loads(line) for line in (tmp_path / "out" / "commonsense_predictions.jsonl").read_text().splitlines()]
    assert [(line["index"], line["instruction"]) for line in lines] == [
        (i, f"q{i}") for i in seeded_subset(6, 3, 0, "boolq")
    ]
    summary = json.loads((tmp_path / "out" / "commonsense.json").read_text())
    assert (summary["sample"], summary["sample_seed"], summary["sets"]["boolq"]["correct"]) == (3, 0, 3)


def test_limit_and_sample_together_are_refused(tmp_path):
    root = write_suite(tmp_path, "commonsense")
    with pytest.raises(SettingValueError) as raised:
        SuiteEvaluation("commonsense", root, limit=2, sample=2)
    assert str(raised.value) == "limit=2 and sample=2 both choose the records to score; give one of them"
