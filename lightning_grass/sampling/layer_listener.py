"""The interface between ``GRASSCallback`` and a strategy that manages per-unit optimizer state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from lightning_grass.sampling.layer_discovery import LayerMap
from lightning_grass.sampling.sampling_units import SamplingUnits


@runtime_checkable
class ActiveLayerListener(Protocol):
    """A strategy that wants to know the layers, the units sampled in them, and which units train.

    ``GRASSCallback`` calls :meth:`on_layer_map` once at fit start, after the optimizer exists, then
    :meth:`on_active_units` whenever the active set changes (every unit while probing). A unit is a layer, or a
    module inside one with ``GRASSCallback(unit="module")``. When the Trainer's strategy is a listener, the
    callback leaves the optimizer states of deactivated units to it instead of dropping them.
    """

    def on_layer_map(self, layer_map: LayerMap, units: SamplingUnits) -> None:
        """The callback's :class:`~lightning_grass.LayerMap` and the units it samples, so both agree on them."""

    def on_active_units(self, active_units: Sequence[int]) -> None:
        """The indices into ``units`` of those that train from the next optimizer step on, ascending."""
