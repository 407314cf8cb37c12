"""``write_results``: turn a benchmark sweep into ``results.md`` and its figures."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reporting import figures
from reporting.markdown import describe_machine, report_header, split_common, sweep_minutes, yaml_block
from reporting.runs import METHOD_LABELS, Run, load_runs
from reporting.summary import (
    MethodSummary,
    method_hyperparameters,
    shared_hyperparameters,
    summarize,
)

_MIB = 2**20
FIGURES = {
    "accuracy": "accuracy_vs_memory.png",
    "importance": "importance_by_task.png",
    "selection": "selection_frequency.png",
}


def write_results(sweep_dir: str | Path, out_dir: str | Path, title: str, commands: Sequence[str]) -> Path:
    """Collect a sweep into ``out_dir/results.md``, ``out_dir/runs.json`` and the figures.

    Args:
        sweep_dir: A ``grass-train -m`` sweep directory.
        out_dir: Where to write; created if missing.
        title: The heading of ``results.md``, e.g. the preset's name.
        commands: The commands that produced the results, in order, shown verbatim.

    Returns:
        The path of ``results.md``.

    Raises:
        FileNotFoundError: If the sweep has no finished runs.
        ValueError: If the methods of a task did not share their hyperparameters.
    """
    out_dir = Path(out_dir)
    runs = load_runs(sweep_dir)
    shared = shared_hyperparameters(runs)
    table = summarize(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures.accuracy_vs_memory(table, out_dir / FIGURES["accuracy"])
    grass_histories = _first_seed_histories(runs, "grass")
    if grass_histories:
        figures.importance_by_task(grass_histories, out_dir / FIGURES["importance"])
    if any("layer_selection_counts" in run.metrics for run in runs):
        figures.selection_frequency_by_method(runs, out_dir / FIGURES["selection"])
    (out_dir / "runs.json").write_text(json.dumps([_run_record(run) for run in runs], indent=2) + "\n")
    text = _markdown(title, commands, runs, table, shared, method_hyperparameters(runs), out_dir)
    path = out_dir / "results.md"
    path.write_text(text)
    return path


def format_table(rows: Sequence[MethodSummary]) -> str:
    """A task's results as a Markdown table, one row per method.

    Args:
        rows: One task's rows from :func:`~reporting.summary.summarize`.

    Returns:
        The table, without a trailing newline.
    """
    header = (
        "| method | seeds | exact match (%) | peak memory (MiB) | optimizer state at peak (MiB) "
        "| trainable params / step | median step (ms) | step time vs LISA |"
    )
    lines = [header, "|" + "---|" * 8]
    for row in rows:
        score = f"{100 * row.exact_match_mean:.1f}"
        score += f" ± {100 * row.exact_match_std:.1f}" if not math.isnan(row.exact_match_std) else " (one seed)"
        relative = f"{row.step_time_vs_lisa:.2f}x" if row.step_time_vs_lisa is not None else "no LISA runs"
        lines.append(
            f"| {row.label} | {len(row.seeds)} | {score} | {row.peak_memory_bytes / _MIB:.0f} "
            f"| {row.optimizer_state_bytes / _MIB:.2f} | {row.trainable_parameters_per_step:,.0f} "
            f"| {1e3 * row.median_step_seconds:.0f} | {relative} |"
        )
    return "\n".join(lines)


def _markdown(
    title: str,
    commands: Sequence[str],
    runs: Sequence[Run],
    table: Mapping[str, Sequence[MethodSummary]],
    shared: Mapping[str, dict[str, Any]],
    own: Mapping[str, dict[str, Any]],
    out_dir: Path,
) -> str:
    machine = runs[0].metrics.get("machine", {})
    run_seconds = sum(float(run.metrics.get("run_seconds") or 0.0) for run in runs)
    parts = [
        *report_header(title, commands, runs),
        f"Machine: {describe_machine(machine)}.",
        f"The sweep ran for {sweep_minutes(runs):.1f} min, from the first job's start to the last one's "
        f"end; the jobs' own wall times add up to {run_seconds / 60:.1f} min (process start-up excluded).",
        "",
        "Exact match is the share of validation examples whose final answer, parsed from a greedy generation, "
        "equals the reference; mean ± sample standard deviation over seeds. Peak memory is "
        + ("`torch.cuda.max_memory_allocated`" if machine.get("device", "cpu") != "cpu" else "the process's peak RSS")
        + " of each run, averaged over seeds. Optimizer state is the most the optimizer held on the device "
        "after any step: `GRASSStrategy` moves the states of layers not being updated to host memory when "
        "training on a GPU, but on a CPU device (`offload: auto`) they stay, so a sampler's column reaches "
        "full fine-tuning's once every layer has been drawn. Step times are the median over seeds of each "
        "run's median optimizer step, and the last column divides them by LISA's on the same task in the "
        "same sweep.",
    ]
    for task, rows in table.items():
        before = rows[0].exact_match_before
        parts += ["", f"## {task}", "", f"Base model before fine-tuning: {100 * before:.1f}% exact match.", ""]
        parts.append(format_table(rows))
    common, per_task = split_common(shared)
    parts += ["", "## Hyperparameters", "", "Shared by every method (checked across all runs):", ""]
    parts += yaml_block(common)
    for task, config in per_task.items():
        parts += [f"and on `{task}`:", "", *yaml_block(config)]
    parts += ["Set per method (the method's own config group, `conf/sampler/<method>.yaml`):", ""]
    parts += ["| method | settings |", "|---|---|"]
    for method, settings in own.items():
        described = ", ".join(f"{k}={v}" for k, v in settings.items()) or "none (every weight trains every step)"
        parts.append(f"| {METHOD_LABELS.get(method, method)} | {described} |")
    parts += ["", "## Figures", ""]
    captions = {
        "accuracy": "Exact match against peak memory, one point per method (error bars: std over seeds).",
        "importance": "GRASS's mean gradient norm per layer over training, per task (first seed).",
        "selection": "Share of active-layer slots each layer got, per sampling method (summed over seeds).",
    }
    for key, name in FIGURES.items():
        if (out_dir / name).is_file():
            parts += [f"![{captions[key]}]({name})", "", captions[key], ""]
    return "\n".join(parts).rstrip() + "\n"


def _first_seed_histories(runs: Sequence[Run], method: str) -> dict[str, list[dict[str, Any]]]:
    histories: dict[str, list[dict[str, Any]]] = {}
    for run in runs:  # sorted by seed within a task
        history = run.metrics.get("history") or []
        has_importance = any(record.get("importance") is not None for record in history)
        if run.method == method and has_importance and run.task not in histories:
            histories[run.task] = history
    return histories


def _run_record(run: Run) -> dict[str, Any]:
    keys = (
        "method",
        "task",
        "seed",
        "exact_match_before",
        "exact_match_after",
        "peak_memory_bytes",
        "optimizer_state_bytes_peak",
        "trainable_parameters_per_step",
        "median_step_seconds",
        "fit_seconds",
        "run_seconds",
        "layer_selection_counts",
    )
    return {"directory": run.directory.name, **{k: run.metrics.get(k) for k in keys}}
