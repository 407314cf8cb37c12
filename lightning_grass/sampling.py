"""Turning layer importance into a sampling distribution, and drawing the active layers from it."""

from __future__ import annotations

import torch
from torch import Tensor

#: Accepted values of ``normalize``.
NORMALIZATIONS = ("mean", "max", "none")


def sampling_probabilities(importance: Tensor, temperature: float, normalize: str = "mean") -> Tensor:
    """``p = softmax(normalize(m) / temperature)``.

    Raw MGN values depend on the model and the loss scale, so a fixed temperature would mean different
    things on different models. Normalizing first makes ``temperature`` comparable across models.

    Args:
        importance: Per-layer MGN ``m``, shape ``(L,)``, non-negative.
        temperature: ``tau > 0``. Small values exploit the most important layers, large values explore.
        normalize: ``"mean"`` divides ``m`` by its mean (so ``tau = 1`` means ``p_l`` is proportional to
            ``exp(m_l / mean(m))``), ``"max"`` divides by the largest value, ``"none"`` uses raw MGN.

    Returns:
        Float32 probabilities on the CPU, shape ``(L,)``, summing to 1.

    Raises:
        ValueError: For an unknown ``normalize`` or a non-positive ``temperature``.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not supported; use one of {NORMALIZATIONS}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    values = importance.detach().to(device="cpu", dtype=torch.float32)
    if normalize == "mean":
        values = values / values.mean().clamp_min(torch.finfo(torch.float32).tiny)
    elif normalize == "max":
        values = values / values.max().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.softmax(values / temperature, dim=0)


def uniform_probabilities(num_layers: int) -> Tensor:
    """The LISA distribution: every layer equally likely."""
    return torch.full((num_layers,), 1.0 / num_layers)


def sample_layers(probabilities: Tensor, n_active: int, generator: torch.Generator) -> list[int]:
    """Draw ``n_active`` distinct layers, without replacement, with probability proportional to ``probabilities``.

    Args:
        probabilities: Shape ``(L,)`` on the CPU.
        n_active: How many layers to draw, ``1 <= n_active <= L``.
        generator: CPU generator; the same state gives the same draw.

    Returns:
        The drawn layer indices, sorted ascending.
    """
    num_layers = probabilities.numel()
    if not 1 <= n_active <= num_layers:
        raise ValueError(f"n_active={n_active} must be between 1 and the number of layers ({num_layers})")
    drawn = torch.multinomial(probabilities, n_active, replacement=False, generator=generator)
    return sorted(drawn.tolist())
