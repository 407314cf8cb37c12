"""lightning_grass: GRASS layer-wise importance sampling for full-parameter fine-tuning with PyTorch Lightning."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_grass.memory_estimate import MemoryEstimate, estimate_memory
from lightning_grass.persistence.atomic_checkpoint_io import AtomicCheckpointIO
from lightning_grass.sampling.callback import GRASSCallback
from lightning_grass.sampling.config import GRASSConfig
from lightning_grass.sampling.layer_discovery import LayerMap, discover_layers
from lightning_grass.sampling.layer_listener import ActiveLayerListener
from lightning_grass.strategies import GRASSDDPStrategy, GRASSFSDPStrategy, GRASSStrategy
from lightning_grass.strategies.registry import register_strategy_names

# Lightning finds strategy names by registration at import time, not through entry points.
register_strategy_names(StrategyRegistry)

__all__ = [
    "ActiveLayerListener",
    "AtomicCheckpointIO",
    "GRASSCallback",
    "GRASSConfig",
    "GRASSDDPStrategy",
    "GRASSFSDPStrategy",
    "GRASSStrategy",
    "LayerMap",
    "MemoryEstimate",
    "discover_layers",
    "estimate_memory",
]
__version__ = "0.1.0"
