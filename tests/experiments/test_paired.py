"""The deep benchmark's statistics: the rate chosen on validation, test scores, paired gaps and intervals."""

import math
from pathlib import Path

import pytest
from reporting.deep_report import mean_draw_shares
from reporting.paired import Variant, paired_comparisons, paired_difference, select
from reporting.runs import Run


def deep_run(method, seed, lr, validation, test, n_active=2):
    sampler = None if method in ("full", "lora") else {"mode": method, "n_active": n_active}
    config = {"seed": seed, "model": {"lr": lr}, "sampler": sampler, "data": {"task": "arithmetic"}}
    metrics = {
        "method": method,
        "task": "arithmetic",
        "seed": seed,
        "exact_match_after": validation,
        "exact_match_test": test,
    }
    return Run(Path(f"/sweep/{method}-{n_active}-{lr}-{seed}"), metrics, config)


def test_a_paired_gap_has_a_student_t_interval():
    gap = paired_difference({0: 11.0, 1: 12.0, 2: 13.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    # Differences 1, 2, 3: mean 2, standard deviation 1, t(0.975, 2 degrees of freedom) = 4.303.
    half = 4.303 / math.sqrt(3)
    assert gap == {"mean": 2.0, "ci95": [2.0 - half, 2.0 + half], "n": 3}
    assert paired_difference({0: 1.0}, {0: 0.0})["n"] == 1
    assert math.isnan(paired_difference({0: 1.0}, {0: 0.0})["ci95"][0])


def test_each_method_gets_the_rate_with_the_best_mean_validation_and_is_reported_on_test():
    runs = [
        deep_run("lisa", 0, 0.003, 0.10, 0.20),
        deep_run("lisa", 1, 0.003, 0.30, 0.40),
        deep_run("lisa", 0, 0.01, 0.50, 0.05),
        deep_run("lisa", 1, 0.01, 0.10, 0.05),
        deep_run("grass", 0, 0.003, 0.20, 0.30),
        deep_run("grass", 1, 0.003, 0.20, 0.50),
        deep_run("grass", 0, 0.01, 0.10, 0.90),
        deep_run("grass", 1, 0.01, 0.10, 0.90),
    ]
    (lisa, grass) = select(runs)["arithmetic"]
    assert lisa.variant == Variant("lisa", 2) and lisa.learning_rate == 0.01, "mean validation 30 beats 20"
    assert lisa.test_by_seed == {0: 5.0, 1: 5.0}
    assert grass.learning_rate == 0.003 and grass.test_by_seed == {0: 30.0, 1: 50.0}
    assert grass.validation_by_rate == pytest.approx({0.003: 20.0, 0.01: 10.0})
    gaps = paired_comparisons([lisa, grass])
    assert set(gaps) == {"GRASS-LISA (gamma=2)", "GRASS-LISA"}
    assert gaps["GRASS-LISA"]["mean"] == pytest.approx(35.0) and gaps["GRASS-LISA"]["n"] == 2


def test_a_tie_on_validation_takes_the_smaller_rate():
    runs = [deep_run("full", 0, 0.003, 0.5, 0.1), deep_run("full", 0, 0.01, 0.5, 0.9)]
    (full,) = select(runs)["arithmetic"]
    assert full.learning_rate == 0.003 and full.variant == Variant("full", None)


def test_a_sweep_without_a_test_split_is_refused():
    run = deep_run("full", 0, 0.003, 0.5, None)
    with pytest.raises(
        ValueError,
        match=r"has no exact_match_test nor suite score: the benchmark needs data.num_test > 0 or evaluate_suite",
    ):
        select([run])


def test_draw_shares_are_averaged_over_the_seeds_at_the_chosen_rate_only():
    runs = [
        deep_run("grass", 0, 0.003, 0.2, 0.3),
        deep_run("grass", 1, 0.003, 0.2, 0.3),
        deep_run("grass", 0, 0.01, 0.1, 0.9),
        deep_run("full", 0, 0.003, 0.5, 0.5),
    ]
    for run, shares in zip(runs, ([0.5, 0.25, 0.25], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0], None), strict=True):
        run.metrics["draw_share"] = shares
    grass, full = sorted(select(runs)["arithmetic"], key=lambda s: s.variant.method != "grass")
    assert grass.learning_rate == 0.003
    # (0.5 + 0.0) / 2, (0.25 + 0.5) / 2: sums of two binary fractions, halved, are exact.
    assert mean_draw_shares(runs, "arithmetic", grass) == [0.25, 0.375, 0.375]
    assert mean_draw_shares(runs, "arithmetic", full) is None
