"""``write_real_results``: the `real` benchmark's ``results.md``, ``summary.json``, ``runs.json`` and figures.

The `real` benchmark fine-tunes SmolLM2-135M-Instruct with every method at the one learning rate its pilot
chose, as the `long` one does, and is reported the same way (test score per method, paired gaps, learning
curves, windows per run, draw shares), with what a real model adds: the commonsense mixture is scored per set
on a fixed, seeded subset of each test split (the score is the mean of the sets' accuracies, LLM-Adapters'
``Avg.``), the base model's own scores come first (``base_scores.json``, written by ``real_base_scores.py``), and
each method's step time, peak memory and trainable parameters per step are tabulated beside full fine-tuning's.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reporting.deep_report import draw_share_table, paired_figure, run_record, scores_figure
from reporting.long_report import (
    FIGURES,
    check_one_rate_each,
    curve_table,
    curves_figure,
    figure_lines,
    long_summary,
    method_table_lines,
    shares_figure,
    windows_of,
)
from reporting.markdown import (
    describe_machine,
    hyperparameter_lines,
    interval_cell,
    paired_gap_lines,
    report_header,
    sweep_minutes,
)
from reporting.paired import Selection, paired_comparisons, paired_difference, select, variant_of
from reporting.runs import Run, load_runs
from reporting.summary import shared_hyperparameters

#: The paired gaps the real benchmark reports: GRASS against each baseline, and LISA against full fine-tuning.
COMPARISONS = (
    ("GRASS-LISA", "grass", "lisa"),
    ("GRASS-GRASS*", "grass", "grass_static"),
    ("GRASS-Full fine-tuning", "grass", "full"),
    ("GRASS-LoRA", "grass", "lora"),
    ("LISA-Full fine-tuning", "lisa", "full"),
)

#: The file of the base model's scores, beside ``results.md``.
BASE_SCORES = "base_scores.json"


def write_real_results(sweep_dir: str | Path, out_dir: str | Path, title: str, commands: Sequence[str]) -> Path:
    """Collect a `real` sweep into ``out_dir``: ``results.md``, ``summary.json``, ``runs.json`` and four figures.

    ``summary.json`` is the `long` benchmark's (test scores in points, paired gaps of :data:`COMPARISONS`,
    windows per run, validation curves) with, per method, ``per_set`` (each commonsense set's accuracy per seed)
    and ``cost`` (median step seconds, peak memory bytes and trainable parameters per step, means over seeds).

    Args:
        sweep_dir: A ``grass-train -m experiment=bench_real`` sweep directory.
        out_dir: Where to write; created if missing. A ``base_scores.json`` already there is reported.
        title: The heading of ``results.md``.
        commands: The commands that produced the results, shown verbatim.

    Returns:
        The path of ``results.md``.

    Raises:
        ValueError: As :func:`~reporting.long_report.write_long_results`.
    """
    out_dir = Path(out_dir)
    runs = load_runs(sweep_dir)
    shared = shared_hyperparameters(runs, also_varying=("model.lr",))
    table = select(runs)
    check_one_rate_each(table)
    summary = long_summary(runs, table)
    for task, selections in table.items():
        paired = paired_comparisons(selections, COMPARISONS)
        if len({s.variant.n_active for s in selections if s.variant.n_active is not None}) == 1:
            paired = {name: gap for name, gap in paired.items() if "(gamma=" not in name}  # pooled is the same
        summary["tasks"][task]["paired"] = paired
        for selection in selections:
            own = sorted((r for r in runs if r.task == task and variant_of(r) == selection.variant), key=_seed)
            entry = summary["tasks"][task]["methods"][selection.variant.label]
            entry["per_set"] = _per_set(own)
            entry["cost"] = _cost(own)
    base_file = out_dir / BASE_SCORES
    base = json.loads(base_file.read_text()) if base_file.is_file() else None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    records = [{**run_record(run), **_run_extras(run)} for run in runs]
    (out_dir / "runs.json").write_text(json.dumps(records, indent=2) + "\n")
    curves_figure(summary, out_dir / FIGURES["curves"])
    scores_figure(table, out_dir / FIGURES["scores"])
    paired_figure(summary, out_dir / FIGURES["paired"])
    shares_figure(runs, table, out_dir / FIGURES["shares"])
    path = out_dir / "results.md"
    path.write_text(_markdown(title, commands, runs, table, summary, shared, base))
    return path


def _seed(run: Run) -> int:
    return run.seed


def _per_set(runs: Sequence[Run]) -> dict[str, dict[str, float]] | None:
    """Each set's accuracy (%) per seed, for runs that scored a suite; ``None`` otherwise."""
    if not all(run.metrics.get("suite_accuracy_percent") for run in runs):
        return None
    sets = list(runs[0].metrics["suite_accuracy_percent"])
    return {name: {str(run.seed): float(run.metrics["suite_accuracy_percent"][name]) for run in runs} for name in sets}


def _cost(runs: Sequence[Run]) -> dict[str, float]:
    """Mean over seeds of the median step time, the peak memory and the trainable parameters per step."""
    return {
        key: statistics.fmean(float(run.metrics[key]) for run in runs)
        for key in (
            "median_step_seconds",
            "peak_memory_bytes",
            "trainable_parameters_per_step",
            "run_seconds",
            "effective_layers_mean",
        )
        if all(run.metrics.get(key) is not None for run in runs)
    }


def _run_extras(run: Run) -> dict[str, Any]:
    """What ``runs.json`` adds for the real benchmark: windows, suite scores and cost."""
    keys = ("suite_average_percent", "suite_accuracy_percent", "median_step_seconds", "peak_memory_bytes")
    return {
        "windows": windows_of(run),
        **{key: run.metrics.get(key) for key in keys},
        "trainable_parameters_per_step": run.metrics.get("trainable_parameters_per_step"),
        "validation_curve": run.metrics.get("validation_curve"),
    }


def _base_lines(base: Mapping[str, Any] | None, tasks: Sequence[str]) -> list[str]:
    if base is None:
        return ["", f"The base model's own scores were not collected (`{BASE_SCORES}` is missing)."]
    lines = ["", "The base model before fine-tuning, on the same test records:", ""]
    for task in tasks:
        score = base.get(task)
        if score is None:
            continue
        sets = score.get("per_set") or {}
        detail = f" ({', '.join(f'{name} {value:.1f}' for name, value in sets.items())})" if sets else ""
        lines.append(f"- `{task}`: {score['score']:.1f}%{detail}; {score['how']}")
    return lines


def _per_set_lines(selections: Sequence[Selection], methods: Mapping[str, Any]) -> list[str]:
    entries = {s.variant.label: methods[s.variant.label] for s in selections}
    if not all(entry.get("per_set") for entry in entries.values()):
        return []
    names = list(next(iter(entries.values()))["per_set"])
    lines = [
        "",
        "Accuracy per set (%), mean ± standard deviation over seeds, and GRASS - LISA per set:",
        "",
        "| method | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, entry in entries.items():
        cells = []
        for name in names:
            values = list(entry["per_set"][name].values())
            spread = statistics.stdev(values) if len(values) > 1 else math.nan
            cells.append(f"{statistics.fmean(values):.1f} ± {spread:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    grass = next((e for label, e in entries.items() if label.startswith("GRASS (")), None)
    lisa = next((e for label, e in entries.items() if label.startswith("LISA")), None)
    if grass is not None and lisa is not None:
        gaps = []
        for name in names:
            gap = paired_difference(
                {int(k): v for k, v in grass["per_set"][name].items()},
                {int(k): v for k, v in lisa["per_set"][name].items()},
            )
            gaps.append(f"{gap['mean']:+.1f} {interval_cell(gap)}")
        lines.append("| GRASS - LISA (paired, 95%) | " + " | ".join(gaps) + " |")
    return lines


def _cost_lines(selections: Sequence[Selection], methods: Mapping[str, Any]) -> list[str]:
    costs = {s.variant.label: methods[s.variant.label]["cost"] for s in selections}
    full = costs.get("Full fine-tuning", {})
    lines = [
        "",
        "Cost per run, mean over seeds (measured in the sweep, two jobs at a time with one thread each, so step "
        "times carry the machine's noise; `real/memory.md` measures memory and speed side by side):",
        "",
        "| method | trainable parameters per step | median step (s) | step / full fine-tuning | peak RSS (GiB) "
        "| run (s) | effective layers |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, cost in costs.items():
        ratio = (
            f"{cost['median_step_seconds'] / full['median_step_seconds']:.2f}"
            if full.get("median_step_seconds")
            else "n/a"
        )
        lines.append(
            f"| {label} | {cost.get('trainable_parameters_per_step', 0):,.0f} | "
            f"{cost.get('median_step_seconds', math.nan):.2f} | {ratio} | "
            f"{cost.get('peak_memory_bytes', math.nan) / 2**30:.2f} | {cost.get('run_seconds', math.nan):.0f} | "
            + (f"{cost['effective_layers_mean']:.1f} |" if "effective_layers_mean" in cost else "- |")
        )
    return lines


def _markdown(
    title: str,
    commands: Sequence[str],
    runs: Sequence[Run],
    table: Mapping[str, Sequence[Selection]],
    summary: Mapping[str, Any],
    shared: Mapping[str, dict[str, Any]],
    base: Mapping[str, Any] | None,
) -> str:
    seeds = sorted({run.seed for run in runs})
    steps = sorted({int(run.metrics["optimizer_steps"]) for run in runs})
    parts = [
        *report_header(title, commands, runs),
        f"Machine: {describe_machine(runs[0].metrics.get('machine', {}))}. The sweep ran for "
        f"{sweep_minutes(runs):.1f} min, from the first job's start to the last one's end.",
        "",
        f"Base: SmolLM2-135M-Instruct ({summary['layers']} layers). Every run trained "
        f"{', '.join(map(str, steps))} optimizer steps on seeds {seeds}; the same seed gives every method the same "
        "data order. Each method ran the one learning rate its pilot chose (`pilot.md`). The score is the test "
        "accuracy in points: on the commonsense mixture the mean of the sets' accuracies on the same seeded "
        "subset of each test split for every run (LLM-Adapters' answer rule: the first answer word of the "
        "response, case-sensitive), on arithmetic the exact match of the final number on the held-out test "
        "split. Mean ± standard deviation over seeds; paired gaps are the mean of the seed-by-seed differences "
        "with a Student-t 95% interval. Windows: how many times the sampler drew its layers in a run.",
        *_base_lines(base, list(table)),
    ]
    for task, selections in table.items():
        methods = summary["tasks"][task]["methods"]
        parts += [*method_table_lines(task, selections, methods), *paired_gap_lines(summary["tasks"][task]["paired"])]
        parts += _per_set_lines(selections, methods)
        parts += _cost_lines(selections, methods)
        parts += curve_table(methods)
        parts += draw_share_table(
            runs, task, selections, "Layers drawn: each layer's share of the draws (%), mean over seeds."
        )
    parts += hyperparameter_lines(shared)
    parts += figure_lines("Test score per method")
    return "\n".join(parts)
