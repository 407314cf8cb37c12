"""Every strategy name this package registers with Lightning, in one table.

``Trainer(strategy="grass_offload_disk")`` is ``GRASSStrategy(offload="disk")``: a name is a strategy class and
the settings it starts from. ``import lightning_grass`` registers them all, here and nowhere else: Lightning calls
``Strategy.register_strategies`` only for its own classes, so the GRASS classes do not override it, and this
module is the only one that imports all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.strategies import Strategy

from lightning_grass.strategies.ddp import GRASSDDPStrategy
from lightning_grass.strategies.fsdp import GRASSFSDPStrategy
from lightning_grass.strategies.single_device import GRASSStrategy


@dataclass(frozen=True)
class StrategyName:
    """A name for ``Trainer(strategy=...)``: the class, what the name means, and the settings it passes."""

    name: str
    strategy: type[Strategy]
    description: str
    settings: dict[str, Any] = field(default_factory=dict)


STRATEGY_NAMES: tuple[StrategyName, ...] = (
    StrategyName("grass", GRASSStrategy, "GRASS layer-wise optimizer-state offload, one device"),
    StrategyName(
        "grass_offload_cpu", GRASSStrategy, "GRASS with optimizer states in (pinned) host memory", {"offload": "cpu"}
    ),
    StrategyName(
        "grass_offload_disk",
        GRASSStrategy,
        "GRASS with optimizer states in files, read and written by background threads",
        {"offload": "disk"},
    ),
    StrategyName("grass_ddp", GRASSDDPStrategy, "GRASS on DDP, optimizer-state offload per rank"),
    StrategyName(
        "grass_ddp_offload_disk", GRASSDDPStrategy, "GRASS on DDP with optimizer states in files", {"offload": "disk"}
    ),
    StrategyName("grass_fsdp", GRASSFSDPStrategy, "GRASS on FSDP2, one shard group per block"),
    StrategyName(
        "grass_fsdp_offload_disk",
        GRASSFSDPStrategy,
        "GRASS on FSDP2 with deactivated blocks' state shards in files",
        {"offload": "disk"},
    ),
)


def register_strategy_names(registry: Any) -> None:
    """Register every name of :data:`STRATEGY_NAMES` in ``registry``; registering them again replaces them."""
    for entry in STRATEGY_NAMES:
        registry.register(entry.name, entry.strategy, description=entry.description, override=True, **entry.settings)
