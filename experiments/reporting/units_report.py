"""The module-wise comparison: layer-wise GRASS, module-wise GRASS and LISA at the same trainable parameters.

Written from a sweep of ``experiment=bench_units`` (SmolLM2-135M-Instruct) or ``experiment=bench_units_long`` (the
long preset's base): per task, each method's test score and cost, the paired gaps between the three with Student-t
95% intervals, and which kinds of module the module-wise draws took.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from reporting.markdown import describe_machine, interval_cell, report_header, sweep_minutes
from reporting.paired import held_out_score, paired_difference
from reporting.runs import METHOD_LABELS, Run, load_runs

#: The methods compared, in table order.
METHODS = ("lisa", "grass", "grass_module")

#: The paired gaps reported: (name, the method measured, the one it is measured against).
COMPARISONS = (
    ("GRASS (modules)-GRASS (layers)", "grass_module", "grass"),
    ("GRASS (modules)-LISA", "grass_module", "lisa"),
    ("GRASS (layers)-LISA", "grass", "lisa"),
)


def _mean_sd(values: Sequence[float], digits: int = 1) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {spread:.{digits}f}"


def _scores(runs: Sequence[Run], task: str, method: str) -> dict[int, float]:
    return {
        run.seed: score
        for run in runs
        if (run.task, run.method) == (task, method) and (score := held_out_score(run)) is not None
    }


def _kind_shares(runs: Sequence[Run]) -> dict[str, float]:
    """Each kind of module's share of the module-wise draws (``self_attn.q_proj``), pooled over ``runs``."""
    counts: dict[str, int] = {}
    for run in runs:
        for name, count in zip(run.metrics["modules"], run.metrics["module_selection_counts"], strict=True):
            kind = name.split(".", 1)[1]
            counts[kind] = counts.get(kind, 0) + count
    total = sum(counts.values()) or 1
    return {kind: count / total for kind, count in counts.items()}


def _layer_reach(run: Run) -> float:
    """The mean over the windows that trained of the lowest layer holding an active unit."""
    lowest = [min(r["active_layers"]) for r in run.metrics["history"] if r["resampled"] and r["trained"]]
    return statistics.fmean(lowest) if lowest else float("nan")


def _pooled_lines(runs: Sequence[Run], summary: dict[str, dict]) -> list[str]:
    """The paired gaps with every task's seeds pooled (each pair a task and a seed), added to ``summary``."""
    tasks = sorted({run.task for run in runs})
    if len(tasks) < 2:
        return []
    lines = [
        "## Both tasks, pooled",
        "",
        "Each pair is one task at one seed; the tasks' scores are both accuracies in points, on different scales.",
        "",
        "| paired gap, test (points) | mean | 95% interval | pairs |",
        "|---|---|---|---|",
    ]
    summary["pooled"] = {}
    for name, better, baseline in COMPARISONS:
        pairs = [(task, seed) for task in tasks for seed in _scores(runs, task, better)]
        gap = paired_difference(
            {index: _scores(runs, task, better)[seed] for index, (task, seed) in enumerate(pairs)},
            {
                index: _scores(runs, task, baseline)[seed]
                for index, (task, seed) in enumerate(pairs)
                if seed in _scores(runs, task, baseline)
            },
        )
        summary["pooled"][name] = gap
        lines.append(f"| {name} | {gap['mean']:+.1f} | {interval_cell(gap)} | {gap['n']} |")
    return [*lines, ""]


def write_units_results(sweep_dir: str | Path, out_dir: str | Path, title: str, commands: Sequence[str]) -> Path:
    """Collect a module-wise comparison sweep into ``out_dir``: ``results.md`` and ``summary.json``.

    Args:
        sweep_dir: The sweep directory.
        out_dir: Where to write.
        title: The report's title.
        commands: The sweep's and the collector's command lines.

    Returns:
        The path of ``results.md``.
    """
    runs = [run for run in load_runs(sweep_dir) if run.method in METHODS]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = {**METHOD_LABELS, "grass": "GRASS (layers)", "grass_module": "GRASS (modules)"}
    seeds = sorted({run.seed for run in runs})
    lines = [
        *report_header(title, commands, runs),
        f"Machine: {describe_machine(runs[0].metrics.get('machine', {}))}. The sweep ran for "
        f"{sweep_minutes(runs):.1f} min. Seeds {seeds}: the same seed gives every method the same data order. "
        "Every method at n_active=2: LISA and layer-wise GRASS draw two layers, module-wise GRASS draws attention "
        "and MLP matrices until no other fits in the parameters of two layers; module-wise GRASS runs at "
        "layer-wise GRASS's learning rate and settings. Scores in points, mean ± standard deviation over seeds; "
        "paired gaps are the mean of the seed-by-seed differences with a Student-t 95% interval.",
        "",
    ]
    summary: dict[str, dict] = {}
    for task in sorted({run.task for run in runs}):
        task_runs = [run for run in runs if run.task == task]
        summary[task] = {"methods": {}, "paired": {}}
        lines += [
            f"## {task}",
            "",
            "| method | test (%) | final validation loss | trainable parameters per step | median step (s) "
            "| windows | mean lowest active layer |",
            "|---|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            of = [run for run in task_runs if run.method == method]
            if not of:
                continue
            scores = list(_scores(of, task, method).values())
            losses = [run.metrics["validation_curve"][-1][1] for run in of if run.metrics.get("validation_curve")]
            trainable = statistics.fmean(run.metrics["trainable_parameters_per_step"] for run in of)
            step = statistics.fmean(run.metrics["median_step_seconds"] for run in of)
            windows = statistics.fmean(
                sum(1 for r in run.metrics["history"] if r["resampled"] and r["trained"]) for run in of
            )
            reach = statistics.fmean(_layer_reach(run) for run in of)
            lines.append(
                f"| {labels[method]} | {_mean_sd(scores)} | {_mean_sd(losses, 3)} | {trainable:,.0f} | {step:.2f} "
                f"| {windows:.0f} | {reach:.1f} |"
            )
            summary[task]["methods"][method] = {
                "scores": _scores(of, task, method),
                "trainable_parameters_per_step": trainable,
                "median_step_seconds": step,
            }
        lines += ["", "| paired gap, test (points) | mean | 95% interval | pairs |", "|---|---|---|---|"]
        for name, better, baseline in COMPARISONS:
            gap = paired_difference(_scores(task_runs, task, better), _scores(task_runs, task, baseline))
            summary[task]["paired"][name] = gap
            lines.append(f"| {name} | {gap['mean']:+.1f} | {interval_cell(gap)} | {gap['n']} |")
        modules = [run for run in task_runs if run.method == "grass_module"]
        if modules:
            shares = _kind_shares(modules)
            lines += [
                "",
                "Module-wise GRASS's draws by kind of module (share of all module draws, pooled over seeds). Every "
                "layer has one module of each kind, but kinds differ in size, and more small modules than large "
                "ones fit in one draw's parameter budget:",
                "",
                "| " + " | ".join(shares) + " |",
                "|" + "---|" * len(shares),
                "| " + " | ".join(f"{100 * share:.1f}%" for share in shares.values()) + " |",
            ]
            summary[task]["module_kind_shares"] = shares
        lines.append("")
    lines += _pooled_lines(runs, summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    path = out_dir / "results.md"
    path.write_text("\n".join(lines))
    return path
