"""The module-wise comparison's report: paired gaps between the three methods, and the kinds of module drawn."""

import json

import yaml
from reporting.units_report import write_units_results

MODULES = ["0.attn.q", "0.mlp.up", "1.attn.q", "1.mlp.up"]


def write_run(directory, method, seed, test, module_counts=None, task="arithmetic"):
    directory.mkdir(parents=True)
    history = [{"step": 4, "active_units": [0], "active_layers": [1], "resampled": True, "trained": True}]
    metrics = {
        "stage": "finetune",
        "method": method,
        "task": task,
        "seed": seed,
        "exact_match_test": test,
        "validation_curve": [[4, 1.0 + seed]],
        "trainable_parameters_per_step": 100 if method != "grass_module" else 96,
        "median_step_seconds": 0.5,
        "history": history,
        "run_seconds": 1.0,
    }
    if module_counts is not None:
        metrics.update(modules=MODULES, module_selection_counts=module_counts)
    (directory / "metrics.json").write_text(json.dumps(metrics))
    (directory / "resolved_config.yaml").write_text(yaml.safe_dump({"seed": seed, "data": {"task": task}}))


def test_the_report_pairs_each_seed_and_pools_the_module_kinds(tmp_path):
    sweep = tmp_path / "sweep"
    scores = {"lisa": [0.20, 0.30, 0.40], "grass": [0.30, 0.30, 0.50], "grass_module": [0.40, 0.50, 0.60]}
    for method, tests in scores.items():
        for seed, test in enumerate(tests):
            counts = [3, 1, 0, 0] if seed == 0 else [1, 1, 2, 0]
            write_run(sweep / f"{method}-{seed}", method, seed, test, counts if method == "grass_module" else None)
    path = write_units_results(sweep, tmp_path / "out", "Units", ["grass-train -m experiment=bench_units"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["arithmetic"]

    # modules - layers: +10, +20, +10 points; modules - LISA: +20 each; layers - LISA: +10, 0, +10.
    gaps = {name: round(gap["mean"], 9) for name, gap in summary["paired"].items()}
    assert gaps == {"GRASS (modules)-GRASS (layers)": 13.333333333, "GRASS (modules)-LISA": 20.0,
                    "GRASS (layers)-LISA": 6.666666667}  # fmt: skip
    assert summary["paired"]["GRASS (modules)-LISA"]["ci95"] == [20.0, 20.0], "no spread, no width"
    # attn.q: 3 + 0 in seed 0, 1 + 2 in seeds 1 and 2, so 9 of the 12 draws; mlp.up the other 3.
    assert summary["module_kind_shares"] == {"attn.q": 0.75, "mlp.up": 0.25}
    text = path.read_text()
    assert "| GRASS (modules) | 50.0 ± 10.0 | 2.000 ± 1.000 | 96 | 0.50 | 1 | 1.0 |" in text


def test_with_two_tasks_each_task_and_seed_is_one_pair_of_the_pooled_gaps(tmp_path):
    sweep = tmp_path / "sweep"
    scores = {"lisa": (0.2, 0.4), "grass": (0.3, 0.4), "grass_module": (0.5, 0.3)}  # per task, seeds 0 and 1 alike
    for method, (arithmetic, choice) in scores.items():
        for seed in (0, 1):
            counts = [1, 0, 0, 0] if method == "grass_module" else None
            write_run(sweep / f"a-{method}-{seed}", method, seed, arithmetic, counts)
            write_run(sweep / f"m-{method}-{seed}", method, seed, choice + seed / 10, counts, task="multiple_choice")
    write_units_results(sweep, tmp_path / "out", "Units", ["grass-train -m experiment=bench_units_long"])
    pooled = json.loads((tmp_path / "out" / "summary.json").read_text())["pooled"]
    # modules - layers: +20, +20 (arithmetic), -10, -10 (multiple_choice), as 4 pairs.
    assert pooled["GRASS (modules)-GRASS (layers)"]["n"] == 4
    assert round(pooled["GRASS (modules)-GRASS (layers)"]["mean"], 9) == 5.0
