"""`experiment=paper_arithmetic` and `experiment=paper_commonsense` end to end, at toy size on CPU, in process.

The presets' own settings are checked as composed; then each trains a tiny saved Llama for two steps on a tiny
file in LLM-Adapters' format and scores it on its suite read from LLM-Adapters' layout, as `grass-train` does.
"""

import json

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from suite_files import write_suite

from lightning_grass.app import evaluate_cli, suite_evaluation
from lightning_grass.app.suites import SUITES
from lightning_grass.app.train import CONFIG_PACKAGE, run

TOY = [
    "trainer=cpu",
    "trainer.precision=32-true",
    "trainer.max_steps=2",
    "data.num_val=2",
    "data.max_length=512",  # the character tokenizer spends a token per character of the long Alpaca preamble
    "model.eval_examples=2",
    "sampler.probe_steps=1",
    "sampler.sample_every=1",
    "evaluate_suite.batch_size=3",
    "evaluate_suite.max_new_tokens=4",
    "logger=none",
    "callbacks=none",
    "ckpt_every_n_steps=0",
    "save_plots=false",
]

# The arithmetic run's responses come from a stub, so that its scores can be worked out by hand:
# (instruction, label, response) per set.
ARITHMETIC = {
    "AddSub": [("a1", "1234", "There are 1,234."), ("a2", "5", "None are left.")],  # 1 of 2: no number
    "MultiArith": [("m1", "3.5", "It costs 3.50")],  # 1 of 1
    "SingleEq": [("s1", "-7", "It is -7 degrees.")],  # 1 of 1
    "gsm8k": [("g1", "10", "10, then 11")],  # 0 of 1: the last number
    "AQuA": [("q1", "B", "Answer: (B)")],  # 0 of 1: the first capital A to E is the "A" of "Answer"
    "SVAMP": [("v1", "2.0", "2"), ("v2", "3", "three")],  # 1 of 2
}
ARITHMETIC_RIGHT = {
    "AddSub": (1, 2),
    "MultiArith": (1, 1),
    "SingleEq": (1, 1),
    "gsm8k": (0, 1),
    "AQuA": (0, 1),
    "SVAMP": (1, 2),
}


def compose_preset(tmp_path, preset, overrides=()):
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        del cfg["hydra"]  # the job's config, as hydra.main passes it
    return cfg


@pytest.mark.parametrize(
    ("preset", "suite", "tokens"), [("paper_arithmetic", "arithmetic", 256), ("paper_commonsense", "commonsense", 32)]
)
def test_the_presets_hold_the_papers_and_llm_adapters_settings(tmp_path, preset, suite, tokens):
    cfg = compose_preset(tmp_path, preset)
    assert cfg.model._target_.endswith("CausalLMModule") and OmegaConf.is_missing(cfg.model, "pretrained_path")
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.max_epochs, cfg.trainer.max_steps) == (
        "gpu",
        1,
        3,
        -1,
    )
    assert (cfg.data.prompt_format, cfg.data.chat_template, cfg.data.max_length, cfg.data.batch_size) == (
        "alpaca",
        "none",
        256,
        16,
    )
    assert (cfg.sampler.mode, cfg.sampler.n_active, cfg.sampler.sample_every) == ("grass", 2, 25)
    assert (cfg.model.warmup_steps, cfg.model.weight_decay) == (100, 0.0)
    assert (cfg.evaluate_suite.name, cfg.evaluate_suite.max_new_tokens) == (suite, tokens)
    assert OmegaConf.is_missing(cfg.evaluate_suite, "data_root") and OmegaConf.is_missing(cfg.data, "task")


def _train_file(tmp_path, suite):
    if suite == "arithmetic":
        records = [
            {"instruction": f"What is {a} + 2?", "input": "", "output": f"The answer is {a + 2}.", "answer": str(a + 2)}
            for a in range(8)
        ]
    else:
        records = [
            {
                "instruction": f"Is {a} odd? Answer format: true/false",
                "input": "",
                "output": f"the correct answer is {str(a % 2 == 1).lower()}",
                "answer": str(a % 2 == 1).lower(),
            }
            for a in range(8)
        ]
    path = tmp_path / ("math_10k.json" if suite == "arithmetic" else "commonsense_170k.json")
    path.write_text(json.dumps(records))
    return path


def _train(tmp_path, preset, suite, model_dir, records=None):
    root = write_suite(tmp_path / "LLM-Adapters", suite, records)
    overrides = [
        f"model.pretrained_path={model_dir}",
        f"data.task={_train_file(tmp_path, suite)}",
        f"evaluate_suite.data_root={root}",
        *TOY,
    ]
    out = tmp_path / preset
    metrics = run(compose_preset(tmp_path, preset, overrides), out)
    return root, out, metrics, json.loads((out / "suite" / f"{suite}.json").read_text())


def test_paper_arithmetic_scores_the_saved_model_as_worked_out_by_hand(tmp_path, tiny_pretrained_dir, monkeypatch):
    responses = {instruction: response for cases in ARITHMETIC.values() for instruction, _, response in cases}
    prompts = []

    def stub(model, tokenizer, examples, max_new_tokens, batch_size):
        assert (max_new_tokens, batch_size) == (4, 3)
        prompts.extend(examples)
        return [responses[example.instruction] for example in examples]

    monkeypatch.setattr(suite_evaluation, "generate_answers", stub)
    records = {
        name: [{"instruction": i, "input": "", "answer": label} for i, label, _ in cases]
        for name, cases in ARITHMETIC.items()
    }
    _, out, metrics, summary = _train(tmp_path, "paper_arithmetic", "arithmetic", tiny_pretrained_dir, records)
    assert {name: (s["correct"], s["total"]) for name, s in summary["sets"].items()} == ARITHMETIC_RIGHT
    average = (50 + 100 + 100 + 0 + 0 + 50) / 6
    assert summary["average_percent"] == pytest.approx(average)
    assert metrics["suite_average_percent"] == pytest.approx(average)
    written = json.loads((out / "metrics.json").read_text())
    assert written["suite"] == "arithmetic" and written["suite_average_percent"] == pytest.approx(average)
    assert written["optimizer_steps"] == 2 and (out / "model" / "config.json").is_file()
    assert summary["model"] == str(out / "model") and {e.prompt_format for e in prompts} == {"alpaca"}


def test_paper_commonsense_scores_the_saved_model_as_grass_evaluate_does(tmp_path, tiny_pretrained_dir):
    root, out, metrics, summary = _train(tmp_path, "paper_commonsense", "commonsense", tiny_pretrained_dir)
    # A tiny random model's answers are arbitrary: the totals are known, and the counts agree with the predictions.
    lines = [json.loads(line) for line in (out / "suite" / "commonsense_predictions.jsonl").read_text().splitlines()]
    assert [s["total"] for s in summary["sets"].values()] == [3] * len(SUITES["commonsense"])
    assert [s["correct"] for s in summary["sets"].values()] == [
        sum(line["correct"] for line in lines if line["set"] == name) for name in summary["sets"]
    ]
    assert metrics["suite_average_percent"] == pytest.approx(summary["average_percent"])
    # grass-evaluate on the saved model directory writes the same predictions.
    again_dir = tmp_path / "again"
    arguments = ["--model", str(out / "model"), "--suite", "commonsense", "--data-root", str(root)]
    evaluate_cli.main([*arguments, "--out", str(again_dir), "--batch-size", "3", "--max-new-tokens", "4"])
    again = (again_dir / "commonsense_predictions.jsonl").read_text()
    assert again == (out / "suite" / "commonsense_predictions.jsonl").read_text()
