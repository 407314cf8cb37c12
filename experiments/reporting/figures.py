"""The benchmark's figures: accuracy against memory, per-task importance, and layer selection frequency."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lightning_grass.app import plots
from reporting.runs import METHOD_LABELS, Run
from reporting.summary import MethodSummary

_MIB = 2**20
_COLORS = {
    "full": "tab:gray",
    "lora": "tab:purple",
    "lisa": "tab:orange",
    "grass_static": "tab:cyan",
    "grass": "tab:blue",
}


def accuracy_vs_memory(table: Mapping[str, Sequence[MethodSummary]], path: str | Path) -> Path:
    """One panel per task: mean exact match (with its standard deviation) against peak memory, per method.

    Args:
        table: From :func:`~reporting.summary.summarize`.
        path: Where to write the PNG.

    Returns:
        The path written.
    """
    fig, axes = _panels(len(table), 5.0)
    for ax, (task, rows) in zip(axes, table.items(), strict=True):
        for row in rows:
            x, y = row.peak_memory_bytes / _MIB, 100 * row.exact_match_mean
            error = 0.0 if np.isnan(row.exact_match_std) else 100 * row.exact_match_std
            ax.errorbar(x, y, yerr=error, fmt="o", capsize=3, color=_COLORS.get(row.method), label=row.label)
            ax.annotate(row.label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("peak memory (MiB)")
        ax.set_ylabel("exact match (%)")
        ax.set_title(Path(task).name)
        ax.grid(alpha=0.3)
    return plots.save_figure(fig, path)


def importance_by_task(histories: Mapping[str, Sequence[dict[str, Any]]], path: str | Path) -> Path:
    """GRASS's mean gradient norm per layer over training, one heatmap per task, side by side.

    Args:
        histories: ``{task: GRASSCallback.history}`` of one GRASS run per task.
        path: Where to write the PNG.

    Returns:
        The path written.
    """
    fig, axes = _panels(len(histories), 5.5)
    for ax, (task, history) in zip(axes, histories.items(), strict=True):
        plots.draw_heatmap(fig, ax, history, "importance")
        ax.set_title(f"{Path(task).name}: mean gradient norm per layer")
    return plots.save_figure(fig, path)


def selection_frequency_by_method(runs: Sequence[Run], path: str | Path) -> Path:
    """One panel per task: the share of sampling windows each layer was active in, per sampling method.

    Counts are summed over seeds. Methods without sampling (full fine-tuning, LoRA) are left out.

    Args:
        runs: From :func:`~reporting.runs.load_runs`.
        path: Where to write the PNG.

    Returns:
        The path written.
    """
    sampled = [run for run in runs if "layer_selection_counts" in run.metrics]
    tasks = sorted({run.task for run in sampled})
    fig, axes = _panels(len(tasks), 5.5)
    for ax, task in zip(axes, tasks, strict=False):
        methods = [m for m in METHOD_LABELS if any(r.method == m and r.task == task for r in sampled)]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            counts = np.sum(
                [r.metrics["layer_selection_counts"] for r in sampled if (r.task, r.method) == (task, method)], axis=0
            )
            share = counts / counts.sum()
            layers = np.arange(len(counts))
            ax.bar(
                layers + (i - (len(methods) - 1) / 2) * width,
                share,
                width,
                color=_COLORS.get(method),
                label=METHOD_LABELS[method],
            )
            ax.set_xticks(layers)
        ax.set_xlabel("layer")
        ax.set_ylabel("share of active slots")
        ax.set_title(Path(task).name)
        ax.legend(fontsize=8)
    return plots.save_figure(fig, path)


def _panels(count: int, width: float) -> tuple[Figure, np.ndarray]:
    """A figure with ``count`` panels side by side, each ``width`` inches wide."""
    fig = Figure(figsize=(width * max(1, count), 3.9))
    return fig, np.atleast_1d(fig.subplots(1, max(1, count)))
