"""The `long` benchmark end to end at toy size: its sweep (in one process), the collector, its report."""

import json
import math

import collect_results
import pytest
from omegaconf import OmegaConf
from test_benchmark_pipeline import REPO, run_sweep

CONF = REPO / "conf"

# The preset's shape at toy size: a 4-layer scratch model, GRASS* and GRASS at gamma 2, two seeds, one task, 8 steps
# (a 2-step probe, then windows at steps 2, 4 and 6) and a validation every 4. The basic launcher runs the jobs
# one after another in the sweep's own process. (A run without a sampler has no windows:
# tests/experiments/test_long_report.py.)
LONG_TOY = [
    "experiment=bench_long",
    "hydra/launcher=basic",
    "model=scratch_llama",
    "model.config.num_hidden_layers=4",
    "data=arithmetic_one_step",
    "long_method=grass_static,grass",
    "seed=0,1",
    "data.num_train=32",
    "data.num_val=6",
    "data.num_test=6",
    "data.batch_size=8",
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "sampler.probe_steps=2",
    "sampler.sample_every=2",
    "model.eval_examples=6",
    "model.max_new_tokens=4",
]

SAMPLED = ("GRASS* (gamma=2)", "GRASS (gamma=2)")
#: The rate each method's pilot chose, as its conf/long_method file holds it.
PILOT_RATES = {
    label: OmegaConf.load(CONF / "long_method" / f"{name}.yaml").model.lr
    for label, name in zip(SAMPLED, ("grass_static", "grass"), strict=True)
}


def test_the_long_sweep_reports_test_scores_curves_windows_and_paired_gaps(tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "results"
    run_sweep(LONG_TOY, sweep)
    collect_results.main([str(sweep), "--preset", "long", "--out", str(out)])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["layers"] == 4
    methods = summary["tasks"]["arithmetic"]["methods"]
    assert list(methods) == list(SAMPLED)
    for label in SAMPLED:
        assert methods[label]["windows_per_run"] == [3, 3], "resampled at steps 2, 4 and 6 in each seed"
        assert methods[label]["learning_rate"] == PILOT_RATES[label]

    jobs = [json.loads(path.read_text()) for path in sorted(sweep.glob("*/metrics.json"))]
    grass = [job for job in jobs if job["method"] == "grass"]
    assert [job["seed"] for job in grass] == [0, 1]
    curve = methods["GRASS (gamma=2)"]["validation_curve"]
    assert curve["steps"] == [4, 8]
    for index in range(2):
        losses = [job["validation_curve"][index][1] for job in grass]
        assert curve["mean"][index] == math.fsum(losses) / 2
        assert (curve["min"][index], curve["max"][index]) == (min(losses), max(losses))

    paired = summary["tasks"]["arithmetic"]["paired"]
    assert set(paired) == {"GRASS-GRASS* (gamma=2)", "GRASS-GRASS*"}
    grass_test = methods["GRASS (gamma=2)"]["test_by_seed"]
    static_test = methods["GRASS* (gamma=2)"]["test_by_seed"]
    expected = (grass_test["0"] - static_test["0"] + grass_test["1"] - static_test["1"]) / 2
    gap = paired["GRASS-GRASS*"]
    assert gap["mean"] == pytest.approx(expected, abs=1e-9) and gap["n"] == 2

    text = (out / "results.md").read_text()
    assert f"| GRASS (gamma=2) | {PILOT_RATES['GRASS (gamma=2)']:g} | 3 |" in text
    assert "grass-train -m hydra/launcher=basic experiment=bench_long model=scratch_llama" in text
    records = json.loads((out / "runs.json").read_text())
    assert [record["windows"] for record in records] == [3, 3, 3, 3]
    for figure in ("learning_curves.png", "test_scores.png", "paired_differences.png", "draw_shares.png"):
        assert (out / figure).stat().st_size > 10_000, figure
        assert f"]({figure})" in text
