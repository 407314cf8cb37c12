"""GRASS's Lightning strategies: one device, DDP and FSDP2, sharing the layer-wise optimizer-state offload."""

from lightning_grass.strategies.ddp import GRASSDDPStrategy
from lightning_grass.strategies.fsdp import GRASSFSDPStrategy
from lightning_grass.strategies.single_device import GRASSStrategy

__all__ = ["GRASSDDPStrategy", "GRASSFSDPStrategy", "GRASSStrategy"]
