"""``write_sensitivity_results``: GRASS's score over T_s and over its temperature or target, like the paper's figure."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from lightning_grass.app.plots import save_figure
from reporting.markdown import describe_machine, report_header
from reporting.runs import Run, load_runs

FIGURE = "sensitivity.png"
SPREAD_KEYS = ("target_effective_layers", "temperature")


def write_sensitivity_results(sweep_dir: str | Path, out_dir: str | Path, title: str, commands: Sequence[str]) -> Path:
    """Mean validation and test exact match of each (T_s, spread setting) cell of a sweep, a table and a figure.

    The spread setting is ``sampler.target_effective_layers`` when the sweep varies it, else
    ``sampler.temperature``.

    Args:
        sweep_dir: A ``grass-train -m experiment=bench_deep_sensitivity`` sweep directory.
        out_dir: Where to write ``results.md``, ``cells.json`` and the figure; created if missing.
        title: The heading of ``results.md``.
        commands: The commands that produced the results.

    Returns:
        The path of ``results.md``.
    """
    out_dir = Path(out_dir)
    runs = load_runs(sweep_dir)
    key = next((k for k in SPREAD_KEYS if len({_setting(run, k) for run in runs}) > 1), SPREAD_KEYS[-1])
    cells: dict[tuple[int, float], list[Run]] = {}
    for run in runs:
        cells.setdefault((int(_setting(run, "sample_every")), float(_setting(run, key))), []).append(run)
    rows = {
        cell: {
            "validation": 100 * statistics.fmean(float(r.metrics["exact_match_after"]) for r in group),
            "test": 100 * statistics.fmean(float(r.metrics["exact_match_test"]) for r in group),
            "effective_layers": statistics.fmean(float(r.metrics["effective_layers_mean"]) for r in group),
            "seeds": sorted(r.seed for r in group),
        }
        for cell, group in sorted(cells.items())
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cells.json").write_text(
        json.dumps([{"sample_every": t, key: v, **row} for (t, v), row in rows.items()], indent=2) + "\n"
    )
    _figure(rows, key, out_dir / FIGURE)
    lines = [
        *report_header(title, commands, runs),
        f"Machine: {describe_machine(runs[0].metrics.get('machine', {}))}.",
        "",
        f"| T_s (sample_every) | {key} | effective layers | validation (%) | test (%) | seeds |",
        "|---|---|---|---|---|---|",
        *(
            f"| {t} | {v:g} | {row['effective_layers']:.1f} | {row['validation']:.1f} | {row['test']:.1f} "
            f"| {len(row['seeds'])} |"
            for (t, v), row in rows.items()
        ),
        "",
        f"![Test exact match over T_s, one line per {key}]({FIGURE})",
        "",
    ]
    path = out_dir / "results.md"
    path.write_text("\n".join(lines))
    return path


def _setting(run: Run, key: str) -> object:
    return (run.config.get("sampler") or {}).get(key)


def _figure(rows: dict[tuple[int, float], dict], key: str, path: Path) -> Path:
    fig = Figure(figsize=(5.0, 3.4))
    ax = fig.subplots()
    for value in sorted({v for _, v in rows}):
        cells = sorted((t, row["test"]) for (t, v), row in rows.items() if v == value)
        ax.plot([t for t, _ in cells], [score for _, score in cells], marker="o", label=f"{key}={value:g}")
    ax.set_xlabel("T_s (sample_every)")
    ax.set_ylabel("test exact match (%)")
    ax.legend()
    return save_figure(fig, path)
