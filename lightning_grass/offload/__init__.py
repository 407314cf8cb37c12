"""Optimizer-state offload: backing tiers, fp32 master weights, the per-tensor state store, the offloaded step."""

from lightning_grass.offload.disk_tier import DiskTier
from lightning_grass.offload.host_tier import HostTier
from lightning_grass.offload.master_weights import MASTER_KEY, needs_master
from lightning_grass.offload.offloaded_optimizer import OffloadedOptimizer
from lightning_grass.offload.state_bytes import (
    device_bytes_while_stepped,
    expected_state_bytes,
    expected_state_tensors,
    optimizer_state_bytes,
    step_workspace_bytes,
)
from lightning_grass.offload.tensor_state_store import TensorStateStore

__all__ = [
    "MASTER_KEY",
    "DiskTier",
    "HostTier",
    "OffloadedOptimizer",
    "TensorStateStore",
    "device_bytes_while_stepped",
    "expected_state_bytes",
    "expected_state_tensors",
    "needs_master",
    "optimizer_state_bytes",
    "step_workspace_bytes",
]
