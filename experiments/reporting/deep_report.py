"""``write_deep_results``: the `deep` benchmark's ``results.md``, ``summary.json`` and figures.

Each method gets its learning rate chosen on validation and is reported on test (:mod:`reporting.paired`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lightning_grass.app.plots import save_figure
from reporting.markdown import (
    describe_machine,
    hyperparameter_lines,
    paired_gap_lines,
    report_header,
    sweep_minutes,
)
from reporting.paired import Selection, learning_rate_of, paired_comparisons, select, variant_of
from reporting.runs import Run, load_runs
from reporting.summary import shared_hyperparameters

FIGURES = {"scores": "test_scores.png", "paired": "paired_differences.png"}


def write_deep_results(sweep_dir: str | Path, out_dir: str | Path, title: str, commands: Sequence[str]) -> Path:
    """Collect a `deep` sweep into ``out_dir``: ``results.md``, ``summary.json``, ``runs.json`` and two figures.

    ``summary.json`` is ``{"layers": L, "tasks": {task: {"methods": {label: ...}, "paired": {"GRASS-LISA":
    {"mean": m, "ci95": [lo, hi], "n": k}, ...}}}}``, in points of exact match.

    Args:
        sweep_dir: A ``grass-train -m experiment=bench_deep`` sweep directory.
        out_dir: Where to write; created if missing.
        title: The heading of ``results.md``.
        commands: The commands that produced the results, shown verbatim.

    Returns:
        The path of ``results.md``.

    Raises:
        ValueError: If the methods of a task differ in anything but their own settings, the learning rate and
            the seed, or a run has no test score.
    """
    out_dir = Path(out_dir)
    runs = load_runs(sweep_dir)
    shared = shared_hyperparameters(runs, also_varying=("model.lr",))
    table = select(runs)
    summary = deep_summary(runs, table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "runs.json").write_text(json.dumps([run_record(run) for run in runs], indent=2) + "\n")
    scores_figure(table, out_dir / FIGURES["scores"])
    paired_figure(summary, out_dir / FIGURES["paired"])
    path = out_dir / "results.md"
    path.write_text(_markdown(title, commands, runs, table, summary, shared))
    return path


def deep_summary(runs: Sequence[Run], table: Mapping[str, Sequence[Selection]]) -> dict[str, Any]:
    """The ``summary.json`` of :func:`write_deep_results`."""
    layers = next(
        len(run.metrics["layer_selection_counts"]) for run in runs if run.metrics.get("layer_selection_counts")
    )
    tasks: dict[str, Any] = {}
    for task, selections in table.items():
        methods = {
            s.variant.label: {
                "learning_rate": s.learning_rate,
                "validation_by_learning_rate": {str(rate): score for rate, score in s.validation_by_rate.items()},
                "test_mean": s.test_mean,
                "test_std": s.test_std,
                "test_by_seed": {str(seed): score for seed, score in sorted(s.test_by_seed.items())},
            }
            for s in selections
        }
        tasks[task] = {"methods": methods, "paired": paired_comparisons(selections)}
    return {"layers": layers, "tasks": tasks}


def _markdown(
    title: str,
    commands: Sequence[str],
    runs: Sequence[Run],
    table: Mapping[str, Sequence[Selection]],
    summary: Mapping[str, Any],
    shared: Mapping[str, dict[str, Any]],
) -> str:
    rates = sorted({float(run.config["model"]["lr"]) for run in runs})
    seeds = sorted({run.seed for run in runs})
    parts = [
        *report_header(title, commands, runs),
        f"Machine: {describe_machine(runs[0].metrics.get('machine', {}))}. The sweep ran for "
        f"{sweep_minutes(runs):.1f} min, from the first job's start to the last one's end.",
        "",
        f"Base: {summary['layers']} layers. Every method ran every learning rate of {rates} on seeds {seeds}; the "
        "same seed gives every method the same data order and the same base. Per task and method (a sampler at "
        "each gamma counts as its own), the learning rate with the best mean validation exact match was chosen, "
        "and the method is reported by its test exact match at that rate: mean ± standard deviation over seeds, "
        "in points. Paired gaps are the mean of the seed-by-seed differences of test scores, with a Student-t "
        "95% interval; pooled rows pair each seed at both gammas.",
    ]
    for task, selections in table.items():
        parts += ["", f"## {task}", "", "| method | learning rate | validation (%) | test (%) |", "|---|---|---|---|"]
        for s in selections:
            parts.append(
                f"| {s.variant.label} | {s.learning_rate:g} | {s.validation_by_rate[s.learning_rate]:.1f} "
                f"| {s.test_mean:.1f} ± {s.test_std:.1f} |"
            )
        parts += paired_gap_lines(summary["tasks"][task]["paired"])
        parts += draw_share_table(runs, task, selections)
    parts += hyperparameter_lines(shared)
    parts += [
        "## Figures",
        "",
        f"![Test exact match per method]({FIGURES['scores']})",
        "",
        f"![Paired gaps with 95% intervals]({FIGURES['paired']})",
        "",
    ]
    return "\n".join(parts)


def mean_draw_shares(runs: Sequence[Run], task: str, selection: Selection) -> list[float] | None:
    """Each layer's share of the draws of ``selection``'s variant at its chosen rate, averaged over seeds.

    Returns:
        One share per layer, or ``None`` for a method that does not sample layers.
    """
    shares = [
        run.metrics["draw_share"]
        for run in runs
        if run.task == task
        and variant_of(run) == selection.variant
        and learning_rate_of(run) == selection.learning_rate
        and run.metrics.get("draw_share")
    ]
    if not shares:
        return None
    return [math.fsum(column) / len(shares) for column in zip(*shares, strict=True)]


def draw_share_table(
    runs: Sequence[Run],
    task: str,
    selections: Sequence[Selection],
    caption: str = "Layers drawn: each layer's share of the draws (%), at the chosen learning rate, mean over seeds.",
) -> list[str]:
    """The Markdown lines of a table of each sampler's mean share of draws per layer, under ``caption``."""
    rows = [(s.variant.label, mean_draw_shares(runs, task, s)) for s in selections]
    rows = [(label, shares) for label, shares in rows if shares is not None]
    if not rows:
        return []
    layers = len(rows[0][1])
    return [
        "",
        caption,
        "",
        "| method | " + " | ".join(str(layer) for layer in range(layers)) + " |",
        "|---|" + "---|" * layers,
        *(f"| {label} | " + " | ".join(f"{100 * share:.0f}" for share in shares) + " |" for label, shares in rows),
    ]


def scores_figure(table: Mapping[str, Sequence[Selection]], path: Path) -> Path:
    """A bar per method of its mean test score, with its standard deviation over seeds; a panel per task."""
    fig = Figure(figsize=(5.0 * len(table), 3.6))
    axes = fig.subplots(1, len(table), squeeze=False)[0]
    for ax, (task, selections) in zip(axes, table.items(), strict=True):
        labels = [s.variant.label for s in selections]
        ax.barh(range(len(selections)), [s.test_mean for s in selections], xerr=[s.test_std for s in selections])
        ax.set_yticks(range(len(selections)), labels)
        ax.invert_yaxis()
        ax.set_xlabel("test exact match (%)")
        ax.set_title(task)
    return save_figure(fig, path)


def paired_figure(summary: Mapping[str, Any], path: Path) -> Path:
    """Each paired gap of ``summary`` with its 95% interval; a panel per task."""
    tasks = summary["tasks"]
    fig = Figure(figsize=(5.0 * len(tasks), 3.0))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, (task, entry) in zip(axes, tasks.items(), strict=True):
        gaps = entry["paired"]
        names = list(gaps)
        means = [gaps[name]["mean"] for name in names]
        errors = [[m - gaps[name]["ci95"][0] for m, name in zip(means, names, strict=True)]]
        errors.append([gaps[name]["ci95"][1] - m for m, name in zip(means, names, strict=True)])
        ax.errorbar(means, range(len(names)), xerr=errors, fmt="o", capsize=4)
        ax.axvline(0.0, color="grey", linewidth=0.8)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel("test gap (points), 95% interval")
        ax.set_title(task)
    return save_figure(fig, path)


def run_record(run: Run) -> dict[str, Any]:
    """A run's entry of ``runs.json``: its method, rate, gamma, scores, time and draw shares."""
    keys = ("method", "task", "seed", "exact_match_before", "exact_match_after", "exact_match_test", "run_seconds")
    sampler = run.config.get("sampler") or {}
    return {
        "directory": run.directory.name,
        "learning_rate": run.config["model"]["lr"],
        "n_active": sampler.get("n_active"),
        **{k: run.metrics.get(k) for k in keys},
        "draw_share": run.metrics.get("draw_share"),
        "effective_layers_mean": run.metrics.get("effective_layers_mean"),
    }
