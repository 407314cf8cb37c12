"""The benchmark end to end: the `bench_small` sweep on tiny settings, then the collector."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
METHODS = ["Full fine-tuning", "LoRA", "LISA", "GRASS*", "GRASS"]
# Every method, both tasks, one seed, a few steps of a scratch model: the preset's shape, in seconds per job.
TINY = [
    "experiment=bench_small",
    "model=scratch_llama",
    "data.num_train=32",
    "data.num_val=8",
    "data.batch_size=8",
    "trainer.max_steps=14",
    "model.eval_examples=4",
    "model.max_new_tokens=4",
    "seed=0",
    "hydra.launcher.jobs=2",
    "hydra.launcher.threads_per_job=1",
]


@pytest.mark.slow  # 60-90 s; the deep sweep below runs the same sweep-to-report path
def test_sweep_and_collector_fill_every_row_and_draw_every_figure(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_grass.app.train", "-m", *TINY, f"paths.output_dir={sweep}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 10, "5 methods x 2 tasks x 1 seed"
    assert all((job / "job.log").is_file() and (job / "metrics.json").is_file() for job in jobs)

    out = tmp_path / "results"
    collect = [sys.executable, "experiments/collect_results.py", str(sweep), "--preset", "tiny", "--out", str(out)]
    result = subprocess.run(collect, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    text = (out / "results.md").read_text()
    launcher = "hydra.launcher.jobs=2 hydra.launcher.threads_per_job=1"  # Hydra's own overrides come first
    assert f"grass-train -m {launcher} experiment=bench_small model=scratch_llama" in text
    assert "python experiments/collect_results.py" in text
    assert re.search(r"Machine: \d+ CPU cores", text)
    for task in ("arithmetic", "multiple_choice"):
        section = text.split(f"## {task}\n", 1)[1].split("\n## ", 1)[0]
        rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method")]
        assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == METHODS
        for row in rows:
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            assert len(cells) == 8 and all(cells) and not any("nan" in cell for cell in cells), row
        lisa = next(row for row in rows if row.startswith("| LISA |"))
        assert lisa.rstrip(" |").endswith("1.00x")
    assert "| LoRA | r=8, lora_alpha=16" in text and "| GRASS | unit=layer, n_active=2" in text
    for figure in ("accuracy_vs_memory.png", "importance_by_task.png", "selection_frequency.png"):
        assert (out / figure).stat().st_size > 10_000, figure
        assert f"]({figure})" in text

    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 10
    by_method = {(run["method"], run["task"]): run for run in runs}
    full, lora = by_method["full", "arithmetic"], by_method["lora", "arithmetic"]
    assert lora["trainable_parameters_per_step"] < full["trainable_parameters_per_step"]
    assert lora["optimizer_state_bytes_peak"] < full["optimizer_state_bytes_peak"]
    assert sum(by_method["grass", "arithmetic"]["layer_selection_counts"]) == 2, "one window after 10 probe steps"


def run_sweep(overrides, sweep):
    command = [sys.executable, "-m", "lightning_grass.app.train", "-m", *overrides, f"paths.output_dir={sweep}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def collect(sweep, preset, out):
    command = [sys.executable, "experiments/collect_results.py", str(sweep), "--preset", preset, "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return (out / "results.md").read_text()


# The deep preset's shape at toy size: a 4-layer scratch model, the samplers at gamma 2 (and 4 for two of
# them), two seeds, a two-rate grid, one task.
DEEP_TOY = [
    "experiment=bench_deep",
    "model=scratch_llama",
    "model.config.num_hidden_layers=4",
    "data=arithmetic_one_step",
    "sampler=lisa,grass_static_calibrated,grass_calibrated,lisa_gamma4,grass_calibrated_gamma4",
    "model.lr=1e-3,3e-3",
    "seed=0,1",
    "data.num_train=32",
    "data.num_val=6",
    "data.num_test=6",
    "data.batch_size=8",
    "trainer.max_steps=6",
    "sampler.probe_steps=2",
    "sampler.sample_every=2",
    "model.eval_examples=6",
    "model.max_new_tokens=4",
]


@pytest.mark.slow  # 100-140 s: the statistics are unit-tested in tests/experiments, multiruns in test_grass_train
def test_the_deep_sweep_chooses_rates_on_validation_and_reports_paired_test_gaps(tmp_path):
    run_sweep(DEEP_TOY, tmp_path / "sweep")
    text = collect(tmp_path / "sweep", "deep", tmp_path / "results")
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["layers"] == 4
    (task,) = summary["tasks"]
    methods = summary["tasks"][task]["methods"]
    assert set(methods) == {
        "LISA (gamma=2)",
        "GRASS* calibrated (gamma=2)",
        "GRASS calibrated (gamma=2)",
        "LISA (gamma=4)",
        "GRASS calibrated (gamma=4)",
    }
    for entry in methods.values():
        validation = entry["validation_by_learning_rate"]
        assert set(validation) == {"0.001", "0.003"}
        assert validation[str(entry["learning_rate"])] == max(validation.values()), "chosen on validation"
        assert set(entry["test_by_seed"]) == {"0", "1"}
    paired = summary["tasks"][task]["paired"]
    assert set(paired) == {
        "GRASS calibrated-LISA (gamma=2)",
        "GRASS calibrated-LISA (gamma=4)",
        "GRASS calibrated-LISA",
        "GRASS calibrated-GRASS* calibrated (gamma=2)",
        "GRASS calibrated-GRASS* calibrated",
    }
    pooled, at_2 = paired["GRASS calibrated-LISA"], paired["GRASS calibrated-LISA (gamma=2)"]
    assert pooled["n"] == 4 and at_2["n"] == 2
    grass = methods["GRASS calibrated (gamma=2)"]["test_by_seed"]
    lisa = methods["LISA (gamma=2)"]["test_by_seed"]
    expected = (grass["0"] - lisa["0"] + grass["1"] - lisa["1"]) / 2
    assert at_2["mean"] == pytest.approx(expected, abs=1e-9)
    low, high = at_2["ci95"]
    assert low <= expected <= high
    assert "| GRASS calibrated (gamma=2) |" in text and "| GRASS calibrated-LISA |" in text
    for figure in ("test_scores.png", "paired_differences.png"):
        assert (tmp_path / "results" / figure).stat().st_size > 10_000


@pytest.mark.slow  # 40 s: the deep sweep above runs the sweep-to-report path; this adds the T_s x target table
def test_the_sensitivity_sweep_tabulates_ts_and_the_target(tmp_path):
    overrides = [o for o in DEEP_TOY if not o.startswith(("sampler", "model.lr", "seed", "experiment"))]
    run_sweep(
        [
            "experiment=bench_deep_sensitivity",
            *overrides,
            "sampler.probe_steps=2",
            "sampler.sample_every=2,4",
            "sampler.target_effective_layers=2,3",
            "seed=0",
        ],
        tmp_path / "sweep",
    )
    text = collect(tmp_path / "sweep", "deep_sensitivity", tmp_path / "results")
    cells = json.loads((tmp_path / "results" / "cells.json").read_text())
    assert [(c["sample_every"], c["target_effective_layers"]) for c in cells] == [
        (2, 2.0),
        (2, 3.0),
        (4, 2.0),
        (4, 3.0),
    ]
    assert "| T_s (sample_every) | target_effective_layers |" in text
    assert (tmp_path / "results" / "sensitivity.png").stat().st_size > 10_000
