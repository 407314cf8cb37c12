"""The long benchmark's statistics: windows per run, learning curves over seeds, the pilot's choice of rate."""

import math
from pathlib import Path

import pytest
from reporting.long_report import long_summary, validation_curve, windows_of
from reporting.paired import Variant, select
from reporting.pilot import pilot_choices
from reporting.runs import Run


def long_run(method, seed, curve=(), test=0.5, validation=0.5, lr=0.003, task="arithmetic", resamples=None):
    sampler = None if method in ("full", "lora") else {"mode": method, "n_active": 2}
    config = {"seed": seed, "model": {"lr": lr}, "sampler": sampler, "data": {"task": task}}
    metrics = {
        "method": method,
        "task": task,
        "seed": seed,
        "exact_match_after": validation,
        "exact_match_test": test,
        "validation_curve": [list(point) for point in curve],
        "optimizer_steps": 100,
    }
    if resamples is not None:
        metrics["history"] = [{"step": 10 * i, "resampled": r} for i, r in enumerate(resamples)]
        metrics["layer_selection_counts"] = [1, 1, 0, 0]
        metrics["draw_share"] = [0.5, 0.5, 0.0, 0.0]
    return Run(Path(f"/sweep/{task}-{method}-{lr}-{seed}"), metrics, config)


def test_windows_are_the_resamples_before_the_last_step_and_none_without_a_sampler():
    assert windows_of(long_run("grass", 0, resamples=[False, True, False, True, True])) == 3
    run = long_run("grass", 0, resamples=[False, True, True])
    run.metrics["optimizer_steps"] = 20  # the resample at step 20 starts no window
    assert windows_of(run) == 1
    assert windows_of(long_run("full", 0)) is None


def test_a_learning_curve_is_taken_over_seeds_at_the_steps_every_seed_validated_at():
    runs = [
        long_run("lisa", 0, curve=[(50, 2.0), (100, 1.0), (150, 0.5)]),
        long_run("lisa", 1, curve=[(50, 3.0), (100, 2.0)]),
        long_run("lisa", 2, curve=[(50, 4.0), (100, 6.0)]),
    ]
    curve = validation_curve(runs)
    assert curve["steps"] == [50, 100]
    assert curve["mean"] == [3.0, 3.0]
    assert curve["std"] == [1.0, pytest.approx(math.sqrt(7.0), rel=1e-15)]  # sample deviations of (1,2,6): 7
    assert (curve["min"], curve["max"]) == ([2.0, 1.0], [4.0, 6.0])
    assert math.isnan(validation_curve(runs[:1])["std"][0])


def test_the_summary_adds_windows_and_curves_to_the_deep_shape():
    runs = [
        long_run("lisa", 0, curve=[(50, 2.0)], test=0.25, resamples=[True, True]),
        long_run("lisa", 1, curve=[(50, 4.0)], test=0.50, resamples=[True, True, True]),
        long_run("grass", 0, curve=[(50, 1.0)], test=0.50, resamples=[False, True, True]),
        long_run("grass", 1, curve=[(50, 3.0)], test=0.75, resamples=[False, True, True]),
    ]
    summary = long_summary(runs, select(runs))
    assert summary["layers"] == 4
    methods = summary["tasks"]["arithmetic"]["methods"]
    assert methods["LISA (gamma=2)"]["windows_per_run"] == [2, 3]
    assert methods["GRASS (gamma=2)"]["validation_curve"]["mean"] == [2.0]
    # Seed 0: 50 - 25, seed 1: 75 - 50 points.
    assert summary["tasks"]["arithmetic"]["paired"]["GRASS-LISA"] == {"mean": 25.0, "ci95": [25.0, 25.0], "n": 2}


def test_calibrated_grass_is_its_own_method_beside_the_papers_defaults():
    calibrated = long_run("grass", 0, test=0.75, resamples=[True])
    calibrated.config["sampler"]["target_effective_layers"] = 4
    runs = [
        long_run("lisa", 0, test=0.25, resamples=[True]),
        long_run("grass", 0, test=0.5, resamples=[True]),
        calibrated,
    ]
    labels = [selection.variant.label for selection in select(runs)["arithmetic"]]
    assert labels == ["LISA (gamma=2)", "GRASS (gamma=2)", "GRASS calibrated (gamma=2)"]
    paired = long_summary(runs, select(runs))["tasks"]["arithmetic"]["paired"]
    assert paired["GRASS-LISA"]["mean"] == 25.0 and paired["GRASS calibrated-LISA"]["mean"] == 50.0


def test_the_pilot_chooses_the_rate_with_the_best_validation_mean_over_tasks_and_seeds():
    runs = [
        long_run("full", 100, validation=0.50, lr=0.001, task="arithmetic"),
        long_run("full", 100, validation=0.70, lr=0.003, task="arithmetic"),
        long_run("full", 100, validation=0.40, lr=0.001, task="multiple_choice"),
        long_run("full", 100, validation=0.10, lr=0.003, task="multiple_choice"),
        long_run("lisa", 100, validation=0.30, lr=0.001, task="arithmetic"),
        long_run("lisa", 100, validation=0.30, lr=0.003, task="arithmetic"),
    ]
    choices = pilot_choices(runs)
    full = choices[Variant("full", None)]
    assert full["by_task"] == {"arithmetic": {0.001: 50.0, 0.003: 70.0}, "multiple_choice": {0.001: 40.0, 0.003: 10.0}}
    assert full["by_rate"] == {0.001: 45.0, 0.003: 40.0} and full["chosen"] == 0.001, "45 beats 40 over both tasks"
    assert choices[Variant("lisa", 2)]["chosen"] == 0.001, "a tie goes to the smaller rate"
