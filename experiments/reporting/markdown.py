"""Pieces of the benchmark reports' Markdown: the header, configs as YAML blocks, the machine in one line."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

from reporting.runs import Run


def split_common(shared: Mapping[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The top-level entries equal on every task, and each task's other entries."""
    configs = list(shared.values())
    common = {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs)}
    return common, {task: {k: v for k, v in c.items() if k not in common} for task, c in shared.items()}


def yaml_block(config: Mapping[str, Any]) -> list[str]:
    """``config`` as the lines of a fenced YAML block, keys sorted, with a blank line after it."""
    return ["```yaml", OmegaConf.to_yaml(OmegaConf.create(dict(config)), sort_keys=True).rstrip(), "```", ""]


def interval_cell(gap: Mapping[str, Any]) -> str:
    """A paired gap's 95% interval as ``[-1.0, +2.0]``, or ``n/a`` with fewer than two pairs."""
    low, high = gap["ci95"]
    return "n/a" if math.isnan(low) else f"[{low:+.1f}, {high:+.1f}]"


def paired_gap_lines(paired: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The table of paired gaps: name, mean, 95% interval and pairs, after a blank line."""
    lines = ["", "| paired gap, test (points) | mean | 95% interval | pairs |", "|---|---|---|---|"]
    lines += [f"| {name} | {gap['mean']:+.1f} | {interval_cell(gap)} | {gap['n']} |" for name, gap in paired.items()]
    return lines


def hyperparameter_lines(shared: Mapping[str, dict[str, Any]]) -> list[str]:
    """The Hyperparameters section: what every task shares, then each task's own entries."""
    common, per_task = split_common(shared)
    lines = ["", "## Hyperparameters", "", "Shared by every method (checked across all runs):", ""]
    lines += yaml_block(common)
    for task, config in per_task.items():
        lines += [f"and on `{task}`:", "", *yaml_block(config)]
    return lines


def describe_machine(machine: Mapping[str, Any]) -> str:
    """One line on the machine a run recorded (``metrics.json``'s ``machine``)."""
    if not machine:
        return "not recorded"
    memory = f", {machine['memory_gib']} GiB RAM" if machine.get("memory_gib") else ""
    device = machine.get("device", "cpu")
    return (
        f"{machine.get('cpu_count')} CPU cores ({machine.get('cpu')}){memory}, "
        f"{'no GPU' if device == 'cpu' else device}; torch {machine.get('torch')}, Python {machine.get('python')}"
    )


def report_header(title: str, commands: Sequence[str], runs: Sequence[Run]) -> list[str]:
    """The lines every ``results.md`` starts with: the title, when and from how many runs, the commands."""
    return [
        f"# {title}",
        "",
        f"Collected on {time.strftime('%Y-%m-%d')} from {len(runs)} runs. Produced by:",
        "",
        "```bash",
        *commands,
        "```",
        "",
    ]


def sweep_minutes(runs: Sequence[Run]) -> float:
    """Minutes from the first job's start to the last one's end (``metrics.json`` times and ``run_seconds``)."""
    ends = [(run.directory / "metrics.json").stat().st_mtime for run in runs]
    starts = [end - float(run.metrics.get("run_seconds") or 0.0) for end, run in zip(ends, runs, strict=True)]
    return (max(ends) - min(starts)) / 60
