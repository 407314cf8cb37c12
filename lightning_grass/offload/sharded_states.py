"""``ShardedStateOffload``: moves whole optimizer states of DTensor (FSDP2) parameters to a backing tier and back."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lightning_grass.offload.tensor_state_store import BackingTier
from lightning_grass.offload.transfer import TensorSpec


@dataclass(frozen=True)
class _Slot:
    """One state tensor in the tier: its key, its local (shard) spec, and how to rebuild the DTensor."""

    key: str
    local: TensorSpec
    dtensor: tuple[Any, tuple[Any, ...], torch.Size, tuple[int, ...]] | None  # mesh, placements, shape, stride


class ShardedStateOffload:
    """Keeps the optimizer states of deactivated FSDP2 parameters in a backing tier, one rank's shards each.

    Under FSDP2 every parameter is a ``DTensor`` sharded across the data-parallel ranks, and so are its AdamW
    moments (and fp32 master). A tier stores plain tensors, so each state tensor goes in as its local shard
    (``to_local()``) and comes back with ``DTensor.from_local(shard, mesh, placements, shape=..., stride=...)``,
    which is bit-identical. The ``step`` counter is a plain tensor and travels as it is.

    States move whole-parameter at a time, when the active layers change (every ``sample_every`` steps), not
    inside the optimizer step: :meth:`offload` takes states out of ``optimizer.state`` and writes them to the
    tier, :meth:`restore` puts them back. Both wait for their copies, so nothing is in flight between calls.

    Args:
        optimizer: The optimizer whose ``state`` holds resident states.
        params: The parameters whose states may be offloaded.
        tier: A :class:`~lightning_grass.offload.HostTier` or :class:`~lightning_grass.offload.DiskTier`.
    """

    def __init__(self, optimizer: Optimizer, params: Iterable[nn.Parameter], tier: BackingTier) -> None:
        self.optimizer = optimizer
        self.params = list(params)
        self.tier = tier
        self._unit = {id(p): unit for unit, p in enumerate(self.params)}
        self._slots: dict[int, list[_Slot]] = {}
        self._values: dict[int, dict[str, Any]] = {}
        self.stats: dict[str, float] = {"backing_bytes": 0, "bytes_to_device": 0, "bytes_to_backing": 0}

    def holds(self, param: nn.Parameter) -> bool:
        """Whether ``param``'s state is in the tier now (and not in ``optimizer.state``)."""
        return self._unit.get(id(param)) in self._slots

    def offload(self, params: Iterable[nn.Parameter]) -> None:
        """Move the resident states of ``params`` (those that have one) to the tier."""
        for param in params:
            unit = self._unit[id(param)]
            state = self.optimizer.state.pop(param, None)
            if not state:
                continue
            slots, tensors, values = [], [], {}
            for key, value in sorted(state.items()):
                if not isinstance(value, Tensor):
                    values[key] = value
                    continue
                if isinstance(value, DTensor):
                    local = value.to_local()
                    meta = (value.device_mesh, tuple(value.placements), value.shape, value.stride())
                else:
                    local, meta = value, None
                slots.append(_Slot(key, TensorSpec.of(local), meta))
                tensors.append(local)
            self.tier.write(unit, tensors).wait()
            self._slots[unit], self._values[unit] = slots, values
            self.stats["bytes_to_backing"] += sum(slot.local.nbytes for slot in slots)
        self.stats["backing_bytes"] = self.tier.backing_bytes()

    def restore(self, params: Iterable[nn.Parameter]) -> None:
        """Put the states of ``params`` that are in the tier back into ``optimizer.state``, bit-identical."""
        for param in params:
            unit = self._unit[id(param)]
            slots = self._slots.pop(unit, None)
            if slots is None:
                continue
            tensors, transfer = self.tier.read(unit, [slot.local for slot in slots])
            transfer.wait()
            state = dict(self._values.pop(unit))
            for slot, tensor in zip(slots, tensors, strict=True):
                state[slot.key] = _rebuild(slot, tensor)
            self.optimizer.state[param] = state
            self.stats["bytes_to_device"] += sum(slot.local.nbytes for slot in slots)

    def backed_states(self) -> dict[nn.Parameter, dict[str, Any]]:
        """The states in the tier, as ``DTensor`` shards on the CPU (plain tensors stay plain), for checkpoints."""
        states = {}
        for unit, slots in self._slots.items():
            state = dict(self._values[unit])
            for slot, tensor in zip(slots, self.tier.read_to_cpu(unit), strict=True):
                state[slot.key] = _rebuild(slot, tensor)
            states[self.params[unit]] = state
        return states

    def resident_state_bytes(self) -> int:
        """Bytes of this rank's resident optimizer state (local shards), for every parameter of the optimizer."""
        return sum(
            _local(value).numel() * _local(value).element_size()
            for state in self.optimizer.state.values()
            for value in state.values()
            if isinstance(value, Tensor)
        )

    def close(self) -> None:
        """Free the tier; states still in it are lost."""
        self.tier.close()
        self._slots.clear()
        self._values.clear()


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _rebuild(slot: _Slot, tensor: Tensor) -> Tensor:
    if slot.dtensor is None:
        return tensor
    mesh, placements, shape, stride = slot.dtensor
    return DTensor.from_local(tensor, mesh, placements, run_check=False, shape=shape, stride=stride)
