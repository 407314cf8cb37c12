"""Turning layer importance into a sampling distribution, and drawing the active layers from it.

The paper's distribution is ``p = softmax(m / temperature)``. On real models one layer's importance often
dwarfs the others' (layer 0's MGN was 3 to 6 times every other layer's on small pretrained Llamas), and the
softmax then gives it most of the probability, so that sampling degenerates to "that layer plus uniform".
Three calibrations keep ``p`` following importance without collapsing:

- ``normalize``: how ``m`` is scaled before the softmax (``"rank"`` and ``"log"`` are insensitive to one
  outlier);
- ``target_effective_layers``: a temperature chosen at each resample so that ``exp(entropy(p))``, the
  effective number of layers, equals the target;
- ``max_probability``: a cap on any layer's probability, the excess shared among the others in proportion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_grass.errors import SettingValueError

#: Accepted values of ``normalize``.
NORMALIZATIONS = ("mean", "max", "none", "rank", "log")

_TEMPERATURE_RANGE = (1e-4, 1e4)


def normalize_importance(importance: Tensor, normalize: str) -> Tensor:
    """Scale importance before the softmax, on the CPU in float32.

    Args:
        importance: Per-layer importance ``m``, shape ``(L,)``, non-negative.
        normalize: ``"mean"`` divides by the mean, so ``temperature=1`` makes a layer twice as important as
            the average ``e`` times as likely as an average one. ``"max"`` divides by the largest value.
            ``"none"`` keeps raw values: the paper's formula, whose meaning depends on the model's gradient
            scale. ``"rank"`` replaces each value by its rank in ``(0, 1]`` (ties share the mean rank): only
            the order counts, so one outlier cannot take the distribution. ``"log"`` takes ``log m`` minus its
            mean, so that ``p`` is proportional to ``m ** (1 / temperature)``: with ``temperature=1`` layers
            are drawn in proportion to their importance.

    Returns:
        The values the softmax divides by the temperature, shape ``(L,)``.

    Raises:
        SettingValueError: For an unknown ``normalize``.
    """
    if normalize not in NORMALIZATIONS:
        raise SettingValueError(f"normalize={normalize!r} is not supported; use one of {NORMALIZATIONS}")
    values = importance.detach().to(device="cpu", dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    if normalize == "mean":
        return values / values.mean().clamp_min(tiny)
    if normalize == "max":
        return values / values.max().clamp_min(tiny)
    if normalize == "rank":
        below = (values[:, None] > values[None, :]).sum(dim=1).to(torch.float32)
        ties = (values[:, None] == values[None, :]).sum(dim=1).to(torch.float32)
        return (below + (ties + 1) / 2) / values.numel()
    if normalize == "log":
        logs = values.clamp_min(tiny).log()
        return logs - logs.mean()
    return values


def effective_layers(probabilities: Tensor) -> float:
    """``exp(entropy(p))``: 1 when one layer takes all the probability, ``L`` when ``p`` is uniform."""
    p = probabilities.detach().to(dtype=torch.float64)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def temperature_for_effective_layers(values: Tensor, target: float) -> float:
    """The temperature at which ``softmax(values / temperature)`` has ``target`` effective layers.

    The effective number of layers grows with the temperature, from the number of layers tied at the
    largest value (as the temperature goes to 0) to ``L``; the temperature is found by bisection on its
    logarithm within ``[1e-4, 1e4]``, and the nearest end of that range is returned for a target outside
    what it reaches.

    Args:
        values: Normalized importance, shape ``(L,)``.
        target: The wanted effective number of layers, in ``[1, L]``.

    Returns:
        The temperature.
    """
    values = values.to(torch.float64)
    low, high = (math.log(t) for t in _TEMPERATURE_RANGE)
    for _ in range(60):
        middle = (low + high) / 2
        if effective_layers(torch.softmax(values / math.exp(middle), dim=0)) < target:
            low = middle
        else:
            high = middle
    return math.exp((low + high) / 2)


def cap_probabilities(probabilities: Tensor, max_probability: float) -> Tensor:
    """Cap every probability at ``max_probability`` and share the excess among the others, in proportion.

    Args:
        probabilities: A distribution over ``L`` layers.
        max_probability: The cap, in ``[1 / L, 1]``.

    Returns:
        The capped distribution: no entry above the cap, the order of the entries kept, summing to 1.
    """
    p = probabilities.detach().to(torch.float64).clone()
    capped = torch.zeros_like(p, dtype=torch.bool)
    while True:
        over = (p > max_probability) & ~capped
        if not bool(over.any()):
            break
        excess = float((p[over] - max_probability).sum())
        p[over] = max_probability
        capped |= over
        free = ~capped
        share = p[free] / p[free].sum() if float(p[free].sum()) > 0 else torch.full_like(p[free], 1 / int(free.sum()))
        p[free] += excess * share
    return p.to(probabilities.dtype)


def sampling_probabilities(
    importance: Tensor,
    temperature: float,
    normalize: str = "mean",
    target_effective_layers: float | None = None,
    max_probability: float | None = None,
    eligible: Sequence[int] | None = None,
) -> Tensor:
    """``p = softmax(normalize(m) / temperature)``, then capped at ``max_probability``.

    With ``eligible``, the distribution is computed over those layers alone (their importance normalized among
    themselves, the target and cap counted in them) and every other layer gets probability exactly 0.

    Args:
        importance: Per-layer importance ``m``, shape ``(L,)``, non-negative.
        temperature: ``tau > 0``. Small values exploit the most important layers, large values explore.
            Unused when ``target_effective_layers`` is given.
        normalize: How ``m`` is scaled first; see :func:`normalize_importance`.
        target_effective_layers: Choose the temperature so that ``exp(entropy(p))`` equals this, in
            ``[1, L]`` (see :func:`temperature_for_effective_layers`); ``None`` uses ``temperature``.
        max_probability: Cap on any layer's probability, in ``[1 / L, 1]``; ``None`` caps nothing.
        eligible: Indices of the layers that can be drawn (``L`` then counts only them); ``None`` means all.

    Returns:
        Float32 probabilities on the CPU, shape ``(L,)`` (all layers, eligible or not), summing to 1.

    Raises:
        SettingValueError: For an unknown ``normalize``, a non-positive ``temperature``, or a target or cap outside
            its range.
    """
    if not temperature > 0:
        raise SettingValueError(f"temperature={temperature!r} must be > 0")
    if eligible is not None:
        index = torch.tensor(list(eligible), dtype=torch.long)
        full = torch.zeros(importance.numel(), dtype=torch.float32)
        full[index] = sampling_probabilities(
            importance.detach().cpu()[index], temperature, normalize, target_effective_layers, max_probability
        )
        return full
    values = normalize_importance(importance, normalize)
    num_layers = values.numel()
    if target_effective_layers is not None:
        if not 1 <= target_effective_layers <= num_layers:
            raise SettingValueError(
                f"target_effective_layers={target_effective_layers!r} must be between 1 and the number of layers "
                f"({num_layers})"
            )
        temperature = temperature_for_effective_layers(values, target_effective_layers)
    probabilities = torch.softmax(values / temperature, dim=0)
    if max_probability is not None:
        if not 1 / num_layers <= max_probability <= 1:
            raise SettingValueError(
                f"max_probability={max_probability!r} must be between 1/{num_layers} (uniform) and 1 for "
                f"{num_layers} layers"
            )
        probabilities = cap_probabilities(probabilities, max_probability)
    return probabilities


def uniform_probabilities(num_layers: int, eligible: Sequence[int] | None = None) -> Tensor:
    """The LISA distribution: every layer (every ``eligible`` one, if given) equally likely, the others at 0."""
    if eligible is None:
        return torch.full((num_layers,), 1.0 / num_layers)
    probabilities = torch.zeros(num_layers)
    probabilities[list(eligible)] = 1.0 / len(eligible)
    return probabilities


def sample_layers(
    probabilities: Tensor, n_active: int, generator: torch.Generator, eligible: Sequence[int] | None = None
) -> list[int]:
    """Draw ``n_active`` distinct layers, without replacement, with probability proportional to ``probabilities``.

    Args:
        probabilities: Shape ``(L,)`` on the CPU.
        n_active: How many layers to draw, ``1 <= n_active <= L`` (``L``: the number of ``eligible`` layers).
        generator: CPU generator; the same state gives the same draw.
        eligible: Indices of the layers that can be drawn; ``None`` means all. Only these are drawn, even
            when fewer than ``n_active`` of them have a non-zero probability (``torch.multinomial`` then fills
            the draw with zero-probability entries, which must not be layers outside ``eligible``).

    Returns:
        The drawn layer indices, sorted ascending.
    """
    layers = list(range(probabilities.numel())) if eligible is None else list(eligible)
    if not 1 <= n_active <= len(layers):
        raise SettingValueError(f"n_active={n_active} must be between 1 and the number of layers ({len(layers)})")
    candidates = probabilities if eligible is None else probabilities[torch.tensor(layers, dtype=torch.long)]
    drawn = torch.multinomial(candidates, n_active, replacement=False, generator=generator)
    return sorted(layers[i] for i in drawn.tolist())


def sample_within_budget(
    probabilities: Tensor,
    sizes: Sequence[int],
    budget: int,
    generator: torch.Generator,
    eligible: Sequence[int] | None = None,
) -> list[int]:
    """Draw units without replacement, with probability proportional to ``probabilities``, until ``budget`` is full.

    Units are drawn one at a time among those not drawn yet whose size still fits in what is left of the budget,
    so the drawn sizes never sum above ``budget``; the draw stops when no undrawn unit fits. Drawing from a set of
    equal sizes with ``budget = n * size`` is drawing ``n`` distinct units, as :func:`sample_layers` does. When every
    unit that still fits has probability 0 (possible only where ``eligible`` holds such units), the draw goes on
    uniformly among them, so that the budget is filled as it would be with any positive probabilities.

    Args:
        probabilities: Shape ``(U,)`` on the CPU.
        sizes: Each unit's parameter count, length ``U``.
        budget: The most parameters the drawn units may hold together; at least the smallest eligible unit's size.
        generator: CPU generator; the same state gives the same draw.
        eligible: Indices of the units that can be drawn; ``None`` means all.

    Returns:
        The drawn unit indices, sorted ascending.

    Raises:
        SettingValueError: If no eligible unit fits in ``budget``.
    """
    candidates = list(range(probabilities.numel())) if eligible is None else list(eligible)
    weights = probabilities.detach().to(torch.float64)[torch.tensor(candidates, dtype=torch.long)]
    size = torch.tensor([sizes[unit] for unit in candidates], dtype=torch.int64)
    if not bool((size <= budget).any()):
        raise SettingValueError(
            f"a parameter budget of {budget:,} holds none of the units, the smallest of which has {int(size.min()):,}"
        )
    left = budget
    open_ = torch.ones(len(candidates), dtype=torch.bool)
    drawn: list[int] = []
    while True:
        fits = open_ & (size <= left)
        if not bool(fits.any()):
            break
        masked = torch.where(fits, weights, 0.0)
        if not float(masked.sum()) > 0:
            masked = fits.to(torch.float64)
        choice = int(torch.multinomial(masked, 1, generator=generator))
        drawn.append(candidates[choice])
        open_[choice] = False
        left -= int(size[choice])
    return sorted(drawn)


def selection_counts(history: Sequence[dict[str, Any]], num_units: int, key: str = "active_units") -> list[int]:
    """How many sampling windows each unit (or layer) trained in, from the records where a resample happened.

    A draw after which no optimizer step ran (one made at the run's last step) trained nothing: its record has
    ``trained=False`` and is not counted. A record without ``trained`` (a history from before the key was kept)
    counts, and so does one without ``active_units`` (from before modules could be drawn), by its
    ``active_layers``.

    Args:
        history: ``GRASSCallback.history``.
        num_units: Number of units (layers with ``key="active_layers"``).
        key: ``"active_units"`` counts the drawn units, ``"active_layers"`` the layers that held one.

    Returns:
        ``counts[u]``: the number of resamples that made unit (or layer) ``u`` active for at least one step.
    """
    counts = [0] * num_units
    for record in history:
        if record["resampled"] and record.get("trained", True):
            for unit in record.get(key, record["active_layers"]):
                counts[unit] += 1
    return counts
