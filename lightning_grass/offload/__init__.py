"""Layer-wise optimizer-state offload: backing tiers, the per-layer state store, and the layer-wise step."""

from lightning_grass.offload.disk_tier import DiskTier
from lightning_grass.offload.host_tier import HostTier
from lightning_grass.offload.layer_state_store import LayerStateStore, optimizer_state_bytes
from lightning_grass.offload.layerwise_optimizer import LayerwiseOptimizer

__all__ = ["DiskTier", "HostTier", "LayerStateStore", "LayerwiseOptimizer", "optimizer_state_bytes"]
