"""lightning_grass: GRASS layer-wise importance sampling for full-parameter fine-tuning with PyTorch Lightning."""

from lightning_grass.callback import GRASSCallback
from lightning_grass.config import GRASSConfig
from lightning_grass.layer_discovery import LayerMap, discover_layers

__all__ = ["GRASSCallback", "GRASSConfig", "LayerMap", "discover_layers"]
__version__ = "0.1.0"
