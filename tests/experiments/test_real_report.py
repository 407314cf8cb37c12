"""The real benchmark's report: suite scores as test scores, gaps against baselines without gamma, the pilot's
choice by validation loss, and the rates frozen into the method configs."""

import json
from pathlib import Path

import pytest
from freeze_pilot_rates import freeze
from reporting.paired import held_out_score, paired_comparisons, select
from reporting.pilot import pilot_choices
from reporting.real_report import COMPARISONS
from reporting.runs import Run

SETS = ["boolq", "ARC-Easy", "openbookqa"]


def real_run(method, seed, suite=None, test=None, val_loss=1.0, lr=1e-4):
    sampler = None if method in ("full", "lora") else {"mode": method, "n_active": 2}
    config = {"seed": seed, "model": {"lr": lr}, "sampler": sampler, "data": {"task": "/data", "sets": SETS}}
    metrics = {"method": method, "task": "/data", "seed": seed, "exact_match_after": 0.0, "val/loss": val_loss}
    if suite is not None:
        metrics["suite_average_percent"] = suite
    metrics["exact_match_test"] = test
    return Run(Path(f"/sweep/{method}-{lr}-{seed}"), metrics, config)


def test_a_mixture_is_named_by_its_sets_and_scored_by_its_suite_average():
    run = real_run("grass", 0, suite=41.5, test=0.2)
    assert run.task == "boolq+ARC-Easy+openbookqa"
    assert held_out_score(run) == 41.5  # the suite wins over the exact match of the test split
    assert held_out_score(real_run("grass", 0, test=0.25)) == 25.0
    assert held_out_score(real_run("grass", 0)) is None
    with pytest.raises(ValueError, match="has no exact_match_test nor suite score"):
        select([real_run("grass", 0)])


def test_grass_is_paired_with_baselines_that_have_no_gamma():
    runs = [
        real_run("full", 0, suite=50.0),
        real_run("full", 1, suite=60.0),
        real_run("lisa", 0, suite=40.0),
        real_run("lisa", 1, suite=44.0),
        real_run("grass", 0, suite=45.0),
        real_run("grass", 1, suite=46.0),
    ]
    paired = paired_comparisons(select(runs)["boolq+ARC-Easy+openbookqa"], COMPARISONS)
    # Seed by seed: GRASS - full = -5, -14 (mean -9.5); GRASS - LISA = +5, +2 (mean 3.5).
    assert paired["GRASS-Full fine-tuning (gamma=2)"]["mean"] == -9.5
    assert paired["GRASS-Full fine-tuning"]["n"] == 2
    assert paired["GRASS-LISA"]["mean"] == 3.5
    assert paired["LISA-Full fine-tuning"]["mean"] == (-10.0 - 16.0) / 2
    assert "GRASS-LoRA" not in paired and "GRASS-GRASS*" not in paired  # those methods did not run


def test_the_pilot_chooses_the_rate_of_lowest_validation_loss():
    runs = [
        real_run("grass", 100, val_loss=1.2, lr=3e-5),
        real_run("grass", 100, val_loss=0.9, lr=1e-4),
        real_run("grass", 100, val_loss=0.9, lr=3e-4),  # a tie goes to the smaller rate
        real_run("full", 100, val_loss=0.8, lr=3e-5),
        real_run("full", 100, val_loss=2.0, lr=1e-4),
    ]
    choices = {variant.method: choice["chosen"] for variant, choice in pilot_choices(runs, "val_loss").items()}
    assert choices == {"full": 3e-5, "grass": 1e-4}


def test_the_chosen_rates_are_written_into_the_method_configs(tmp_path):
    pilot = tmp_path / "pilot.json"
    pilot.write_text(json.dumps({"GRASS (gamma=2)": {"method": "grass", "chosen": 0.0003}}))
    config = tmp_path / "grass.yaml"
    config.write_text("# a comment\nmodel:\n  lr: 1.0e-04\n\nsampler:\n  probe_steps: 4\n")
    assert freeze(pilot, tmp_path) == {"grass": 0.0003}
    assert config.read_text() == "# a comment\nmodel:\n  lr: 3.0e-04\n\nsampler:\n  probe_steps: 4\n"
    config.write_text("model:\n  lr: 1\n  lr: 2\n")
    with pytest.raises(ValueError, match="must hold exactly one 'lr:' line"):
        freeze(pilot, tmp_path)
