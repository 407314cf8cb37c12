"""Aggregation of a sweep's runs into table rows, and the shared-hyperparameter check."""

import copy
import math
from pathlib import Path

import pytest
from reporting import format_table, method_hyperparameters, shared_hyperparameters, summarize
from reporting.runs import Run

CONFIG = {
    "seed": 0,
    "task_name": "bench",
    "paths": {"output_dir": "x"},
    "trainer": {"max_steps": 100},
    "data": {"task": "arithmetic", "seed": 0, "batch_size": 32},
    "model": {"lr": 0.002, "lora": None},
    "sampler": None,
}
SAMPLER = {
    "_target_": "lightning_grass.GRASSCallback",
    "mode": "grass",
    "n_active": 2,
    "seed": 0,
    "ema": 0.5,
    "probe_steps": 10,
}


def make_run(method, seed, score, step, task="arithmetic", memory=100 * 2**20, config_changes=None):
    config = copy.deepcopy(CONFIG)
    config["seed"] = config["data"]["seed"] = seed
    config["data"]["task"] = task
    if method in ("lisa", "grass_static", "grass"):
        config["sampler"] = {**SAMPLER, "mode": method, "seed": seed}
    if method == "lora":
        config["model"]["lora"] = {"r": 8, "lora_alpha": 16}
    for dotted, value in (config_changes or {}).items():
        parent, leaf = dotted.split(".")
        config[parent][leaf] = value
    metrics = {
        "method": method,
        "task": task,
        "seed": seed,
        "exact_match_before": 0.1,
        "exact_match_after": score,
        "peak_memory_bytes": memory,
        "optimizer_state_bytes_peak": 2**20,
        "trainable_parameters_per_step": 1000,
        "median_step_seconds": step,
    }
    return Run(Path(f"/sweep/{method}-{task}-{seed}"), metrics, config)


def test_mean_std_and_step_time_relative_to_lisa():
    runs = [make_run("lisa", s, score, step) for s, score, step in [(0, 0.25, 0.2), (1, 0.5, 0.1), (2, 0.75, 0.3)]]
    runs += [make_run("grass", s, 0.5, step) for s, step in [(0, 0.3), (1, 0.3), (2, 0.6)]]
    (rows,) = summarize(runs).values()
    lisa, grass = rows
    assert (lisa.method, lisa.seeds, lisa.exact_match_mean, lisa.exact_match_std) == ("lisa", [0, 1, 2], 0.5, 0.25)
    assert lisa.median_step_seconds == 0.2 and lisa.step_time_vs_lisa == 1.0
    assert grass.exact_match_std == 0.0 and grass.step_time_vs_lisa == 0.3 / 0.2  # the medians' own division
    assert grass.label == "GRASS"


def test_tasks_are_summarized_separately_and_without_lisa_have_no_ratio():
    runs = [make_run("full", 0, 0.4, 0.5, task="arithmetic"), make_run("full", 0, 0.8, 0.5, task="multiple_choice")]
    table = summarize(runs)
    assert [row.exact_match_mean for row in table["arithmetic"]] == [0.4]
    assert [row.exact_match_mean for row in table["multiple_choice"]] == [0.8]
    assert math.isnan(table["arithmetic"][0].exact_match_std)
    assert table["arithmetic"][0].step_time_vs_lisa is None


def test_table_shows_every_column():
    runs = [make_run("lisa", s, score, 0.2) for s, score in [(0, 0.25), (1, 0.75)]] + [make_run("full", 0, 0.5, 0.4)]
    text = format_table(summarize(runs)["arithmetic"])
    lines = text.splitlines()
    assert lines[2] == "| LISA | 2 | 50.0 ± 35.4 | 100 | 1.00 | 1,000 | 200 | 1.00x |"
    assert lines[3] == "| Full fine-tuning | 1 | 50.0 (one seed) | 100 | 1.00 | 1,000 | 400 | 2.00x |"


def test_methods_may_differ_only_in_their_own_settings():
    runs = [make_run("full", 0, 0.5, 0.1), make_run("lora", 1, 0.5, 0.1), make_run("grass", 2, 0.5, 0.1)]
    shared = shared_hyperparameters(runs)
    assert shared["arithmetic"] == {
        "trainer": {"max_steps": 100},
        "data": {"task": "arithmetic", "batch_size": 32},
        "model": {"lr": 0.002},
    }
    own = method_hyperparameters(runs)
    assert own == {
        "full": {},
        "lora": {"r": 8, "lora_alpha": 16},
        "grass": {"n_active": 2, "ema": 0.5, "probe_steps": 10},
    }


def test_settings_a_mode_ignores_are_not_listed_for_it():
    runs = [make_run("lisa", 0, 0.5, 0.1), make_run("grass_static", 0, 0.5, 0.1)]
    assert method_hyperparameters(runs) == {"lisa": {"n_active": 2}, "grass_static": {"n_active": 2, "probe_steps": 10}}


def test_a_method_tuned_on_its_own_is_refused():
    runs = [make_run("full", 0, 0.5, 0.1), make_run("grass", 0, 0.5, 0.1, config_changes={"model.lr": 0.01})]
    with pytest.raises(ValueError, match=r"model\.lr=0\.002 vs 0\.01 differs between .*full.* and .*grass"):
        shared_hyperparameters(runs)
