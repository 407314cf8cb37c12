"""Aggregate a sweep's runs per task and method, and check that the methods shared their hyperparameters."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reporting.runs import METHOD_LABELS, Run

#: Config entries that may differ between the runs of one task: the method's own settings and the seed.
METHOD_KEYS = ("sampler", "model.lora")
PER_RUN_KEYS = ("seed", "data.seed", "paths", "task_name")
#: GRASSCallback settings that have no effect in a sampling mode, left out of that mode's listing.
_IMPORTANCE_SETTINGS = ("probe_steps", "update_every", "temperature", "ema", "normalize", "skip_non_finite")
INERT_SETTINGS = {
    "lisa": (*_IMPORTANCE_SETTINGS, "fixed_layers"),
    "fixed": (*_IMPORTANCE_SETTINGS, "sample_every", "n_active"),
    "grass_static": ("update_every", "ema", "fixed_layers"),
    "grass": ("fixed_layers",),
}


@dataclass(frozen=True)
class MethodSummary:
    """One row of a task's table: a method's results over its seeds.

    Attributes:
        method: The method's name in configs (``full``, ``lora``, ``lisa``, ``grass_static``, ``grass``).
        seeds: The seeds it ran with.
        exact_match_mean: Mean exact match after fine-tuning, in [0, 1].
        exact_match_std: Sample standard deviation of it over seeds (``nan`` with one seed).
        exact_match_before: Mean exact match of the base model, before fine-tuning.
        peak_memory_bytes: Mean peak memory (process RSS on CPU, CUDA max allocated on GPU).
        optimizer_state_bytes: Mean largest optimizer state held on the device.
        trainable_parameters_per_step: Mean parameters that can change at one optimizer step.
        median_step_seconds: Median over seeds of each run's median step time.
        step_time_vs_lisa: ``median_step_seconds`` over LISA's in the same sweep and task; ``None`` without
            LISA runs.
    """

    method: str
    seeds: list[int]
    exact_match_mean: float
    exact_match_std: float
    exact_match_before: float
    peak_memory_bytes: float
    optimizer_state_bytes: float
    trainable_parameters_per_step: float
    median_step_seconds: float
    step_time_vs_lisa: float | None

    @property
    def label(self) -> str:
        """The method's name in tables and plots."""
        return METHOD_LABELS.get(self.method, self.method)


def summarize(runs: Sequence[Run]) -> dict[str, list[MethodSummary]]:
    """Per task, one :class:`MethodSummary` per method, in the order of ``METHOD_LABELS``.

    Args:
        runs: From :func:`~reporting.runs.load_runs`.

    Returns:
        ``{task: [row, ...]}``.
    """
    table: dict[str, list[MethodSummary]] = {}
    for task in sorted({run.task for run in runs}):
        task_runs = [run for run in runs if run.task == task]
        methods = list(dict.fromkeys(run.method for run in task_runs))
        steps = {m: statistics.median(_values(task_runs, m, "median_step_seconds")) for m in methods}
        rows = []
        for method in methods:
            scores = _values(task_runs, method, "exact_match_after")
            rows.append(
                MethodSummary(
                    method=method,
                    seeds=[run.seed for run in task_runs if run.method == method],
                    exact_match_mean=statistics.fmean(scores),
                    exact_match_std=statistics.stdev(scores) if len(scores) > 1 else float("nan"),
                    exact_match_before=statistics.fmean(_values(task_runs, method, "exact_match_before")),
                    peak_memory_bytes=statistics.fmean(_values(task_runs, method, "peak_memory_bytes")),
                    optimizer_state_bytes=statistics.fmean(_values(task_runs, method, "optimizer_state_bytes_peak")),
                    trainable_parameters_per_step=statistics.fmean(
                        _values(task_runs, method, "trainable_parameters_per_step")
                    ),
                    median_step_seconds=steps[method],
                    step_time_vs_lisa=steps[method] / steps["lisa"] if "lisa" in steps else None,
                )
            )
        table[task] = rows
    return table


def shared_hyperparameters(runs: Sequence[Run], also_varying: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The config every method of a task ran with, after checking that it really was the same.

    Everything but the method's own settings (``sampler``, ``model.lora``), the per-run entries (seed,
    paths) and ``also_varying`` must be equal across the runs of a task.

    Args:
        runs: From :func:`~reporting.runs.load_runs`.
        also_varying: Dotted keys a sweep varies for every method alike, such as ``model.lr`` over a grid.

    Returns:
        ``{task: config}`` with the method and per-run entries removed.

    Raises:
        ValueError: Naming the first entry that differs, and the two runs it differs between.
    """
    shared: dict[str, dict[str, Any]] = {}
    for run in runs:
        config = _without(run.config, (*METHOD_KEYS, *PER_RUN_KEYS, *also_varying))
        reference = shared.setdefault(run.task, config)
        difference = _first_difference(reference, config)
        if difference is not None:
            first = next(r for r in runs if r.task == run.task)
            raise ValueError(
                f"{difference} differs between {first.directory} and {run.directory}: the methods of task "
                f"{run.task!r} must share every hyperparameter except {', '.join((*METHOD_KEYS, *also_varying))}"
            )
    return shared


def method_hyperparameters(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Each method's own settings: its sampler's, less those inert in its mode (:data:`INERT_SETTINGS`), or LoRA's.

    Args:
        runs: From :func:`~reporting.runs.load_runs`.

    Returns:
        ``{method: settings}``, empty settings for full fine-tuning.
    """
    settings: dict[str, dict[str, Any]] = {}
    for run in runs:
        sampler = run.config.get("sampler") or {}
        lora = (run.config.get("model") or {}).get("lora") or {}
        left_out = ("_target_", "seed", "mode", *INERT_SETTINGS.get(sampler.get("mode"), ()))
        own = {k: v for k, v in sampler.items() if k not in left_out} | dict(lora)
        settings.setdefault(run.method, own)
    return settings


def _values(runs: Sequence[Run], method: str, key: str) -> list[float]:
    return [float(run.metrics[key]) for run in runs if run.method == method]


def _without(config: dict[str, Any], dotted_keys: Sequence[str]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for dotted in dotted_keys:
        *parents, leaf = dotted.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return config


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The dotted key of the first entry where ``a`` and ``b`` differ, ``None`` when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                return name
            found = _first_difference(a[key], b[key], name)
            if found is not None:
                return found
        return None
    return None if a == b else f"{prefix}={a!r} vs {b!r}"
