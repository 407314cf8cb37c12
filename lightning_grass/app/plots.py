"""Pictures of what the sampler did, drawn from ``GRASSCallback.history``.

Figures are built with matplotlib's object API, so importing this module leaves pyplot's global state and
backend alone.

Example::

    from lightning_grass.app import plots

    plots.importance_heatmap(callback.history, "importance.png")
    plots.selection_frequency(callback.history, "selection.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_grass._extras import require_app_extra
from lightning_grass.errors import SettingValueError
from lightning_grass.sampling.distribution import selection_counts

try:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
except ModuleNotFoundError:
    require_app_extra("lightning_grass.app.plots", ["matplotlib"])
    raise

_VALUES = ("importance", "probabilities")
_MAX_INCHES = 12.0
_MAX_TICKS = 40


def importance_heatmap(history: Sequence[dict[str, Any]], path: str | Path, value: str = "importance") -> Path:
    """Draw a heatmap of per-unit importance (or probability) over optimizer steps and save it as PNG.

    One row per unit: per layer, or with ``unit="module"`` per module in ``GRASSCallback.units`` order.

    Args:
        history: ``GRASSCallback.history``.
        path: Where to write the PNG; parent directories are created.
        value: ``"importance"`` (MGN) or ``"probabilities"``.

    Returns:
        The path written.

    Raises:
        ValueError: If ``value`` is unknown or no record of ``history`` carries it (for example ``lisa`` mode
            has no importance).
    """
    steps, grid = _value_grid(history, value)
    fig = Figure(figsize=(max(4.0, 0.35 * len(steps) + 2), min(_MAX_INCHES, max(3.0, 0.3 * grid.shape[0] + 1.5))))
    draw_heatmap(fig, fig.subplots(), history, value)
    return save_figure(fig, path)


def draw_heatmap(fig: Figure, ax: Axes, history: Sequence[dict[str, Any]], value: str = "importance") -> None:
    """Draw the heatmap of :func:`importance_heatmap` on ``ax``, with its colour bar, for composite figures.

    Args:
        fig: The figure that holds ``ax``.
        ax: Where to draw.
        history: ``GRASSCallback.history``.
        value: ``"importance"`` (MGN) or ``"probabilities"``.

    Raises:
        ValueError: As :func:`importance_heatmap`.
    """
    steps, grid = _value_grid(history, value)
    image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90 if len(steps) > 12 else 0)
    rows = grid.shape[0]
    ax.set_yticks(range(0, rows, max(1, rows // _MAX_TICKS)))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("unit (layer, or module)" if rows > _MAX_TICKS else "layer")
    ax.set_title("mean gradient norm per unit" if value == "importance" else "sampling probability per unit")
    fig.colorbar(image, ax=ax, label=value)


def _value_grid(history: Sequence[dict[str, Any]], value: str) -> tuple[list[int], np.ndarray]:
    """The steps that carry ``value`` and the (layer, step) array of it."""
    if value not in _VALUES:
        raise SettingValueError(f"value={value!r} is not supported; use one of {_VALUES}")
    records = [record for record in history if record.get(value) is not None]
    if not records:
        raise SettingValueError(
            f"no history record has {value!r}: nothing to plot (lisa and fixed modes have no importance)"
        )
    grid = np.array([record[value] for record in records], dtype=float).T
    return [record["step"] for record in records], grid


def selection_frequency(
    history: Sequence[dict[str, Any]],
    path: str | Path,
    num_layers: int | None = None,
    module_names: Sequence[str] | None = None,
) -> Path:
    """Draw how many windows each layer (or module) trained in and save it as PNG.

    A bar per layer; with ``module_names`` a grid, one row per kind of module (``self_attn.q_proj``) and one
    column per layer. A draw made at the run's last step, after which nothing trained, is not counted
    (:func:`~lightning_grass.sampling.distribution.selection_counts`).

    Args:
        history: ``GRASSCallback.history``.
        path: Where to write the PNG; parent directories are created.
        num_layers: Number of units (layers, or modules); inferred from the records when omitted.
        module_names: With ``unit="module"``, ``GRASSCallback.units.names`` (``"3.self_attn.q_proj"``).

    Returns:
        The path written.
    """
    num_layers, counts = _layer_counts(history, num_layers)
    if module_names is not None:
        fig = Figure(figsize=(min(_MAX_INCHES, max(5.0, 0.3 * _layer_count(module_names) + 3)), 3.5))
        _module_grid(fig, fig.subplots(), counts, module_names, "windows active")
        return save_figure(fig, path)
    fig = Figure(figsize=(max(4.0, 0.35 * num_layers + 2), 3.0))
    _layer_bars(fig.subplots(), counts, "windows active", "layer selection frequency")
    return save_figure(fig, path)


def sampling_diagnostics(
    history: Sequence[dict[str, Any]],
    path: str | Path,
    num_layers: int | None = None,
    module_names: Sequence[str] | None = None,
) -> Path:
    """Draw how spread out sampling was: the effective number of layers at each record, and each layer's share.

    The effective number of layers is ``exp(entropy(p))``: 1 when one layer takes all the probability, ``L``
    when sampling is uniform. The share is each layer's part of the draws whose window trained, over the run (a
    draw at the run's last step is left out); under uniform sampling every layer's share tends to ``1 / L`` (the
    dashed line).

    Args:
        history: ``GRASSCallback.history``.
        path: Where to write the PNG; parent directories are created.
        num_layers: ``L``, the number of units (layers, or modules); inferred from the records when omitted.
        module_names: With ``unit="module"``, ``GRASSCallback.units.names``: the shares are drawn as the grid of
            :func:`selection_frequency`.

    Returns:
        The path written.
    """
    num_layers, counts = _layer_counts(history, num_layers)
    total = max(1, sum(counts))
    width = 0.35 * (num_layers if module_names is None else _layer_count(module_names)) + 4
    fig = Figure(figsize=(min(2 * _MAX_INCHES, max(7.0, width)), 3.0))
    spread, share = fig.subplots(1, 2)
    records = [record for record in history if record.get("effective_layers") is not None]
    spread.plot([r["step"] for r in records], [r["effective_layers"] for r in records], marker="o")
    spread.axhline(num_layers, color="grey", linestyle="--", linewidth=0.8)
    spread.set_ylim(0, num_layers + 0.5)
    spread.set_xlabel("optimizer step")
    spread.set_ylabel("effective layers" if module_names is None else "effective modules")
    spread.set_title("exp(entropy(p))")
    shares = [count / total for count in counts]
    if module_names is not None:
        _module_grid(fig, share, shares, module_names, "share of draws")
        return save_figure(fig, path)
    _layer_bars(share, shares, "share of draws", "layer draws over the run")
    share.axhline(1 / num_layers, color="grey", linestyle="--", linewidth=0.8)
    return save_figure(fig, path)


def _module_grid(fig: Figure, ax: Axes, values: Sequence[float], names: Sequence[str], label: str) -> None:
    """``values`` per module as a (kind of module, layer) grid; a kind missing from a layer is left blank."""
    layers = [int(name.split(".", 1)[0]) for name in names]
    kinds = [name.split(".", 1)[1] if "." in name else "block" for name in names]
    rows = list(dict.fromkeys(kinds))
    grid = np.full((len(rows), max(layers) + 1), np.nan)
    for value, layer, kind in zip(values, layers, kinds, strict=True):
        grid[rows.index(kind), layer] = value
    image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(0, grid.shape[1], max(1, grid.shape[1] // _MAX_TICKS)))
    ax.set_xlabel("layer")
    ax.set_title(f"{label} per module")
    fig.colorbar(image, ax=ax, label=label)


def _layer_count(module_names: Sequence[str]) -> int:
    return 1 + max(int(name.split(".", 1)[0]) for name in module_names)


def _layer_bars(ax: Axes, heights: Sequence[float], ylabel: str, title: str) -> None:
    ax.bar(range(len(heights)), heights, color="tab:blue")
    ax.set_xticks(range(len(heights)))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def _layer_counts(history: Sequence[dict[str, Any]], num_layers: int | None) -> tuple[int, list[int]]:
    """``num_layers`` (inferred from ``history`` when ``None``) and how many windows each layer trained in."""
    if num_layers is None:
        num_layers = _infer_num_layers(history)
    return num_layers, selection_counts(history, num_layers)


def _infer_num_layers(history: Sequence[dict[str, Any]]) -> int:
    for record in history:
        for value in _VALUES:
            if record.get(value) is not None:
                return len(record[value])
    return 1 + max((max(record["active_layers"]) for record in history if record["active_layers"]), default=-1)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Lay out ``fig`` and write it as PNG, creating parent directories.

    Args:
        fig: The figure.
        path: Where to write.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
