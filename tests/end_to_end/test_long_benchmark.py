"""The `long` benchmark end to end at toy size: its sweep (in one process), the collector, its report."""

import json
import math

import collect_results
import pytest
from test_benchmark_pipeline import run_sweep

# The preset's shape at toy size: a 4-layer scratch model, full fine-tuning, LISA and GRASS at gamma 2, two
# seeds, one task, 40 steps (the preset's 10-step probe, then windows at steps 10 and 35) and a validation
# every 20. The basic launcher runs the jobs one after another in the sweep's own process.
LONG_TOY = [
    "experiment=bench_long",
    "hydra/launcher=basic",
    "model=scratch_llama",
    "model.config.num_hidden_layers=4",
    "data=arithmetic_one_step",
    "long_method=full,lisa,grass",
    "seed=0,1",
    "data.num_train=32",
    "data.num_val=6",
    "data.num_test=6",
    "data.batch_size=8",
    "trainer.max_steps=40",
    "trainer.val_check_interval=20",
    "model.eval_examples=6",
    "model.max_new_tokens=4",
]

SAMPLED = ("LISA (gamma=2)", "GRASS (gamma=2)")


def test_the_long_sweep_reports_test_scores_curves_windows_and_paired_gaps(tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "results"
    run_sweep(LONG_TOY, sweep)
    collect_results.main([str(sweep), "--preset", "long", "--out", str(out)])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["layers"] == 4
    methods = summary["tasks"]["arithmetic"]["methods"]
    assert list(methods) == ["Full fine-tuning", *SAMPLED]
    assert methods["Full fine-tuning"]["windows_per_run"] is None
    for label in SAMPLED:
        assert methods[label]["windows_per_run"] == [2, 2], "resampled at steps 10 and 35 in each seed"
        assert methods[label]["learning_rate"] == 0.003

    jobs = [json.loads(path.read_text()) for path in sorted(sweep.glob("*/metrics.json"))]
    grass = [job for job in jobs if job["method"] == "grass"]
    assert [job["seed"] for job in grass] == [0, 1]
    curve = methods["GRASS (gamma=2)"]["validation_curve"]
    assert curve["steps"] == [20, 40]
    for index in range(2):
        losses = [job["validation_curve"][index][1] for job in grass]
        assert curve["mean"][index] == math.fsum(losses) / 2
        assert (curve["min"][index], curve["max"][index]) == (min(losses), max(losses))

    paired = summary["tasks"]["arithmetic"]["paired"]
    assert set(paired) == {"GRASS-LISA (gamma=2)", "GRASS-LISA"}
    grass_test = methods["GRASS (gamma=2)"]["test_by_seed"]
    lisa_test = methods["LISA (gamma=2)"]["test_by_seed"]
    expected = (grass_test["0"] - lisa_test["0"] + grass_test["1"] - lisa_test["1"]) / 2
    assert paired["GRASS-LISA"]["mean"] == pytest.approx(expected, abs=1e-9) and paired["GRASS-LISA"]["n"] == 2

    text = (out / "results.md").read_text()
    assert "| GRASS (gamma=2) | 0.003 | 2 |" in text and "| Full fine-tuning | 0.003 | - |" in text
    assert "grass-train -m hydra/launcher=basic experiment=bench_long model=scratch_llama" in text
    records = json.loads((out / "runs.json").read_text())
    assert sorted(record["windows"] or 0 for record in records) == [0, 0, 2, 2, 2, 2]
    for figure in ("learning_curves.png", "test_scores.png", "paired_differences.png", "draw_shares.png"):
        assert (out / figure).stat().st_size > 10_000, figure
        assert f"]({figure})" in text
