"""``write_long_results``: the `long` benchmark's ``results.md``, ``summary.json`` and figures.

Every method runs one learning rate, chosen beforehand in a pilot on seeds that are not reported, so the
report has no selection step: a method's score is its test exact match over the paired seeds. Beside it come
the learning curves (validation loss every ``trainer.val_check_interval`` steps, mean and spread over seeds),
the number of sampling windows of every run, and each layer's share of the draws.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lightning_grass.app.plots import save_figure
from reporting.deep_report import (
    deep_summary,
    draw_share_table,
    mean_draw_shares,
    paired_figure,
    run_record,
    scores_figure,
)
from reporting.markdown import (
    describe_machine,
    hyperparameter_lines,
    paired_gap_lines,
    report_header,
    sweep_minutes,
)
from reporting.paired import Selection, select, variant_of
from reporting.runs import Run, load_runs
from reporting.summary import shared_hyperparameters

FIGURES = {
    "curves": "learning_curves.png",
    "scores": "test_scores.png",
    "paired": "paired_differences.png",
    "shares": "draw_shares.png",
}


def write_long_results(sweep_dir: str | Path, out_dir: str | Path, title: str, commands: Sequence[str]) -> Path:
    """Collect a `long` sweep into ``out_dir``: ``results.md``, ``summary.json``, ``runs.json`` and four figures.

    ``summary.json`` has the deep benchmark's shape (``{"layers": L, "tasks": {task: {"methods": {label:
    ...}, "paired": {"GRASS-LISA": {"mean", "ci95", "n"}, ...}}}}``, in points of exact match); each method
    also carries ``windows_per_run`` (one count per seed, ``null`` for full fine-tuning and LoRA) and
    ``validation_curve`` (``steps``, ``mean``, ``std``, ``min``, ``max`` of the validation loss over seeds).

    Args:
        sweep_dir: A ``grass-train -m experiment=bench_long`` sweep directory.
        out_dir: Where to write; created if missing.
        title: The heading of ``results.md``.
        commands: The commands that produced the results, shown verbatim.

    Returns:
        The path of ``results.md``.

    Raises:
        ValueError: If the methods of a task differ in anything but their own settings, the learning rate and
            the seed, a run has no test score, or a method ran more than one learning rate (the long
            benchmark's rates are fixed in advance).
    """
    out_dir = Path(out_dir)
    runs = load_runs(sweep_dir)
    shared = shared_hyperparameters(runs, also_varying=("model.lr",))
    table = select(runs)
    check_one_rate_each(table)
    summary = long_summary(runs, table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    records = [{**run_record(run), "windows": windows_of(run)} for run in runs]
    (out_dir / "runs.json").write_text(json.dumps(records, indent=2) + "\n")
    curves_figure(summary, out_dir / FIGURES["curves"])
    scores_figure(table, out_dir / FIGURES["scores"])
    paired_figure(summary, out_dir / FIGURES["paired"])
    shares_figure(runs, table, out_dir / FIGURES["shares"])
    path = out_dir / "results.md"
    path.write_text(_markdown(title, commands, runs, table, summary, shared))
    return path


def windows_of(run: Run) -> int | None:
    """How many sampling windows a run trained in: its resamples before its last step.

    Returns:
        The count; ``None`` for a run without a sampler. A resample at the last step starts no window.
    """
    history = run.metrics.get("history")
    if history is None:
        return None
    steps = int(run.metrics["optimizer_steps"])
    return sum(1 for record in history if record["resampled"] and record["step"] < steps)


def validation_curve(runs: Sequence[Run]) -> dict[str, list[float]]:
    """The validation loss at each step that every one of ``runs`` validated at, across runs.

    Returns:
        ``{"steps", "mean", "std", "min", "max"}``, one entry per step; ``std`` is the sample standard deviation
        (``nan`` for a single run).
    """
    curves = [{int(step): float(loss) for step, loss in run.metrics.get("validation_curve") or []} for run in runs]
    steps = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
    columns = [[curve[step] for curve in curves] for step in steps]
    return {
        "steps": steps,
        "mean": [statistics.fmean(column) for column in columns],
        "std": [statistics.stdev(column) if len(column) > 1 else math.nan for column in columns],
        "min": [min(column) for column in columns],
        "max": [max(column) for column in columns],
    }


def long_summary(runs: Sequence[Run], table: Mapping[str, Sequence[Selection]]) -> dict[str, Any]:
    """The ``summary.json`` of :func:`write_long_results`."""
    summary = deep_summary(runs, table)
    for task, selections in table.items():
        for selection in selections:
            own = [run for run in runs if run.task == task and variant_of(run) == selection.variant]
            own.sort(key=lambda run: run.seed)
            entry = summary["tasks"][task]["methods"][selection.variant.label]
            windows = [windows_of(run) for run in own]
            entry["windows_per_run"] = None if all(w is None for w in windows) else windows
            entry["validation_curve"] = validation_curve(own)
    return summary


def check_one_rate_each(table: Mapping[str, Sequence[Selection]]) -> None:
    for task, selections in table.items():
        for selection in selections:
            if len(selection.validation_by_rate) > 1:
                rates = sorted(selection.validation_by_rate)
                raise ValueError(
                    f"{selection.variant.label} on {task} ran learning rates {rates}: the long benchmark runs one "
                    "rate per method, chosen in its pilot; collect a pilot with --preset long_pilot"
                )


def final_loss_cell(entry: Mapping[str, Any]) -> str:
    curve = entry["validation_curve"]
    if not curve["steps"]:
        return "n/a"
    return f"{curve['mean'][-1]:.3f} ± {curve['std'][-1]:.3f}"


def windows_cell(entry: Mapping[str, Any]) -> str:
    windows = entry["windows_per_run"]
    if windows is None:
        return "-"
    return f"{min(windows)}" if min(windows) == max(windows) else f"{min(windows)}-{max(windows)}"


def _markdown(
    title: str,
    commands: Sequence[str],
    runs: Sequence[Run],
    table: Mapping[str, Sequence[Selection]],
    summary: Mapping[str, Any],
    shared: Mapping[str, dict[str, Any]],
) -> str:
    seeds = sorted({run.seed for run in runs})
    steps = sorted({int(run.metrics["optimizer_steps"]) for run in runs})
    parts = [
        *report_header(title, commands, runs),
        f"Machine: {describe_machine(runs[0].metrics.get('machine', {}))}. The sweep ran for "
        f"{sweep_minutes(runs):.1f} min, from the first job's start to the last one's end.",
        "",
        f"Base: {summary['layers']} layers. Every run trained {', '.join(map(str, steps))} optimizer steps on "
        f"seeds {seeds}; the same seed gives every method the same data order and the same base. Each method ran "
        "the one learning rate its pilot chose (see `pilot.md`), and is reported by its test exact match: mean ± "
        "standard deviation over seeds, in points. Paired gaps are the mean of the seed-by-seed differences of "
        "test scores, with a Student-t 95% interval; pooled rows pair each seed at both gammas. Windows: how "
        "many times the sampler drew its layers in a run. Figures that depend on the machine are given as a "
        "spread over seeds: they were measured on this machine, and floating-point summation order differs "
        "between CPUs.",
    ]
    for task, selections in table.items():
        methods = summary["tasks"][task]["methods"]
        parts += [*method_table_lines(task, selections, methods), *paired_gap_lines(summary["tasks"][task]["paired"])]
        parts += curve_table(methods)
        parts += draw_share_table(
            runs, task, selections, "Layers drawn: each layer's share of the draws (%), mean over seeds."
        )
    parts += hyperparameter_lines(shared)
    parts += figure_lines("Test exact match per method")
    return "\n".join(parts)


def method_table_lines(task: str, selections: Sequence[Selection], methods: Mapping[str, Any]) -> list[str]:
    """A task's heading and its table: each method's rate, windows, final validation loss and test score."""
    lines = [
        "",
        f"## {task}",
        "",
        "| method | learning rate | windows per run | final validation loss | test (%) |",
        "|---|---|---|---|---|",
    ]
    for s in selections:
        entry = methods[s.variant.label]
        lines.append(
            f"| {s.variant.label} | {s.learning_rate:g} | {windows_cell(entry)} | {final_loss_cell(entry)} "
            f"| {s.test_mean:.1f} ± {s.test_std:.1f} |"
        )
    return lines


def figure_lines(scores_caption: str) -> list[str]:
    """The Figures section: the learning curves, the scores (captioned ``scores_caption``), gaps and shares."""
    return [
        "## Figures",
        "",
        f"![Validation loss over training, mean and range over seeds]({FIGURES['curves']})",
        "",
        f"![{scores_caption}]({FIGURES['scores']})",
        "",
        f"![Paired gaps with 95% intervals]({FIGURES['paired']})",
        "",
        f"![Each layer's share of the draws]({FIGURES['shares']})",
        "",
    ]


def curve_table(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    curves = {label: entry["validation_curve"] for label, entry in methods.items()}
    steps = sorted(set.intersection(*(set(curve["steps"]) for curve in curves.values())))
    if not steps:
        return []
    shown = steps[1::2] if len(steps) > 6 else steps
    index = {label: {step: i for i, step in enumerate(curve["steps"])} for label, curve in curves.items()}
    return [
        "",
        "Validation loss during training, mean over seeds:",
        "",
        "| method | " + " | ".join(f"step {step}" for step in shown) + " |",
        "|---|" + "---|" * len(shown),
        *(
            f"| {label} | " + " | ".join(f"{curve['mean'][index[label][step]]:.3f}" for step in shown) + " |"
            for label, curve in curves.items()
        ),
    ]


def curves_figure(summary: Mapping[str, Any], path: Path) -> Path:
    tasks = summary["tasks"]
    fig = Figure(figsize=(5.5 * len(tasks), 3.8))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, (task, entry) in zip(axes, tasks.items(), strict=True):
        for label, method in entry["methods"].items():
            curve = method["validation_curve"]
            if not curve["steps"]:
                continue
            (line,) = ax.plot(curve["steps"], curve["mean"], label=label, linewidth=1.2)
            ax.fill_between(curve["steps"], curve["min"], curve["max"], color=line.get_color(), alpha=0.15)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{task}: mean, range over seeds")
    axes[-1].legend(fontsize=7, loc="upper right")
    return save_figure(fig, path)


def shares_figure(runs: Sequence[Run], table: Mapping[str, Sequence[Selection]], path: Path) -> Path:
    fig = Figure(figsize=(5.5 * len(table), 3.2))
    axes = fig.subplots(1, len(table), squeeze=False)[0]
    for ax, (task, selections) in zip(axes, table.items(), strict=True):
        rows = [(s.variant.label, mean_draw_shares(runs, task, s)) for s in selections]
        rows = [(label, shares) for label, shares in rows if shares is not None]
        if not rows:
            continue
        image = ax.imshow([[100 * share for share in shares] for _, shares in rows], aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
        ax.set_xticks(range(len(rows[0][1])))
        ax.set_xlabel("layer")
        ax.set_title(f"{task}: share of draws (%)")
        fig.colorbar(image, ax=ax)
    return save_figure(fig, path)
