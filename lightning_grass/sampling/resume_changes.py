"""A resume whose settings differ from the checkpoint's: which settings changed, and when each new value applies.

Plain functions of the checkpoint's saved config, the current :class:`~lightning_grass.sampling.config.GRASSConfig`
and where the run resumes (its optimizer step, and the step training started at, ``None`` while probing);
:class:`~lightning_grass.GRASSCallback` warns with :func:`resume_warnings` at fit start.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lightning_grass.sampling.config import GRASSConfig

#: The settings that only decide how the distribution is computed from importance.
_DISTRIBUTION_SETTINGS = ("temperature", "normalize", "target_effective_layers", "max_probability")

#: The settings that only matter when layers are sampled.
_SAMPLING_SETTINGS = ("n_active", "sample_every", "update_every", "ema", "importance", *_DISTRIBUTION_SETTINGS)

#: The settings read at fit start, which apply from the resumed run's first step.
_FIT_START_SETTINGS = (
    "layers",
    "fixed_layers",
    "train_embeddings",
    "train_head",
    "train_final_norm",
    "train_towers",
    "skip_non_finite",
)

#: GRASSConfig's fields in declaration order, the order in which changed settings are reported.
_SETTING_ORDER = [field.name for field in dataclasses.fields(GRASSConfig)]


def changed_settings(saved: dict[str, Any], config: GRASSConfig) -> list[str]:
    """The settings (``mode`` and ``unit`` aside: a resume refuses them) whose checkpoint value differs from ``config``.

    ``n_active`` is left out in ``fixed`` mode, where it is the length of ``fixed_layers``; a setting the
    checkpoint does not hold (one added since it was written) counts as unchanged. Lists and tuples of the same
    items are equal.

    Args:
        saved: The config stored in the checkpoint, as a dict (``dataclasses.asdict`` of a ``GRASSConfig``).
        config: The current settings.

    Returns:
        The names of the changed settings, in ``GRASSConfig``'s declaration order.
    """

    def comparable(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    current = dataclasses.asdict(config)
    skipped = {"mode", "unit", "n_active"} if config.mode == "fixed" else {"mode", "unit"}
    return [
        name
        for name in _SETTING_ORDER
        if name not in skipped and name in saved and comparable(saved[name]) != comparable(current[name])
    ]


def resume_warnings(saved: dict[str, Any], config: GRASSConfig, step: int, train_start: int | None) -> list[str]:
    """One line per changed setting: its new and its saved value, and when the new value applies.

    Args:
        saved: The config stored in the checkpoint, as a dict.
        config: The current settings.
        step: The optimizer step the checkpoint was written at, where the run resumes.
        train_start: The step training started at, ``None`` while probing.

    Returns:
        The lines, in :func:`changed_settings`' order; none where no setting changed.
    """
    return [
        f"GRASS: resuming with {name}={getattr(config, name)!r}, the checkpoint was written with "
        f"{name}={saved[name]!r}; {when_setting_applies(name, config, step, train_start)}"
        for name in changed_settings(saved, config)
    ]


def when_setting_applies(name: str, config: GRASSConfig, step: int, train_start: int | None) -> str:
    """When a setting that differs from the checkpoint's takes effect in the resumed run, as a clause.

    Args:
        name: The changed setting, a field of ``GRASSConfig`` other than ``mode``.
        config: The current settings.
        step: The optimizer step the run resumes at.
        train_start: The step training started at, ``None`` while probing.

    Returns:
        The clause, for example ``"the new value applies from the next refresh, at step 5"`` or ``"it has no
        effect: mode='lisa' samples uniformly"``.
    """
    probing = train_start is None
    probe_end = max(config.probe_steps, step + 1)

    def next_boundary(every: int) -> int:
        if probing:
            return probe_end + every
        return train_start + ((step - train_start) // every + 1) * every

    unused = _why_setting_is_unused(name, config, train_start)
    if unused is not None:
        return f"it has no effect: {unused}"
    if name in _FIT_START_SETTINGS:
        return f"the new value applies from step {step + 1}, the first of this run"
    if name == "probe_steps":
        return f"the new value applies now: probing ends at step {probe_end}"
    if name in ("update_every", "ema"):
        return f"the new value applies from the next refresh, at step {next_boundary(config.refresh_every)}"
    if name == "importance":
        before = "the probing steps so far" if probing else "the importance carried over"
        return f"the new signal is measured from step {step + 1} on; {before} used the old one"
    if probing:
        next_draw = f"the draw at the end of probing, at step {probe_end}"
    else:
        next_draw = f"the next resample, at step {next_boundary(config.sample_every)}"
    if name == "sample_every":
        refreshes = (
            " (refreshes too, as update_every=None)" if config.mode == "grass" and config.update_every is None else ""
        )
        return f"the new value applies from {next_draw}, then every {config.sample_every} steps{refreshes}"
    if name in _DISTRIBUTION_SETTINGS and not probing:
        recomputed = "the probabilities were recomputed from the checkpoint's importance"
        return f"{recomputed}; the new value applies from {next_draw}"
    return f"the new value applies from {next_draw}"


def _why_setting_is_unused(name: str, config: GRASSConfig, train_start: int | None) -> str | None:
    """Why a changed setting does nothing in the resumed run, or ``None`` if it does something."""
    mode = config.mode
    if name == "seed":
        return "the sampling generator continues from its state in the checkpoint"
    if name == "probe_steps":
        if not config.probes:
            return f"mode={mode!r} does not probe"
        return None if train_start is None else f"probing ended at step {train_start}"
    if name not in _SAMPLING_SETTINGS:
        return None
    if mode == "fixed":
        return "mode='fixed' trains fixed_layers and never samples"
    if name in ("n_active", "sample_every"):
        return None
    if name in ("update_every", "ema") and mode != "grass":
        return f"mode={mode!r} does not refresh importance"
    if mode == "lisa":
        return "mode='lisa' samples uniformly"
    if name == "importance" and mode == "grass_static" and train_start is not None:
        return f"mode='grass_static' measured importance only while probing, which ended at step {train_start}"
    if name == "temperature" and config.target_effective_layers is not None:
        return f"target_effective_layers={config.target_effective_layers!r} chooses the temperature"
    return None
