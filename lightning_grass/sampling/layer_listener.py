"""The interface between ``GRASSCallback`` and a strategy that manages per-layer optimizer state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from lightning_grass.sampling.layer_discovery import LayerMap


@runtime_checkable
class ActiveLayerListener(Protocol):
    """A strategy that wants to know the layers and which of them train.

    ``GRASSCallback`` calls :meth:`on_layer_map` once at fit start, after the optimizer exists, then
    :meth:`on_active_layers` whenever the active set changes (all layers while probing). When the Trainer's
    strategy is a listener, the callback leaves the optimizer states of deactivated layers to it instead of
    dropping them.
    """

    def on_layer_map(self, layer_map: LayerMap) -> None:
        """The callback's :class:`~lightning_grass.LayerMap`, shared so both agree on what a layer is."""

    def on_active_layers(self, active_layers: Sequence[int]) -> None:
        """The layers that train from the next optimizer step on, ascending."""
