"""Which layer groups' optimizer states are resident, and moving them between the device and a backing tier."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_grass.offload.transfer import TensorSpec, Transfer


class BackingTier(Protocol):
    """Where offloaded states live: :class:`~lightning_grass.offload.HostTier` or ``DiskTier``."""

    def write(self, group: int, tensors: list[Tensor]) -> Transfer:
        """Start copying ``tensors`` to the backing copy of ``group``."""

    def read(self, group: int, specs: list[TensorSpec]) -> tuple[list[Tensor], Transfer]:
        """Allocate resident tensors for ``specs`` and start filling them from ``group``'s backing copy."""

    def read_to_cpu(self, group: int) -> list[Tensor]:
        """``group``'s backing tensors on the CPU."""

    def backing_bytes(self) -> int:
        """Bytes held in the tier."""

    def close(self) -> None:
        """Finish transfers and free the tier."""


@dataclass
class _Layout:
    """How a group's state is laid out: ``(param position, key, spec)`` per tensor, and the non-tensor values."""

    tensors: list[tuple[int, str, TensorSpec]] = field(default_factory=list)
    values: dict[tuple[int, str], Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for _, _, spec in self.tensors)


@dataclass
class _Resident:
    """A group occupying a residency slot: being fetched, in the optimizer, or being written back."""

    tensors: list[Tensor]
    transfer: Transfer
    nbytes: int
    writing: bool = False


class LayerStateStore:
    """Keeps at most ``max_resident`` layer groups' optimizer states on the compute device.

    A group is the list of parameters of one transformer block (or of the always-on modules). Its states
    are *resident* while they sit in ``optimizer.state`` on the device; otherwise they live in the backing
    tier and the parameters have no entry in ``optimizer.state``. Each resident group holds one slot from
    the moment its fetch starts until its write-back has finished, so ``max_resident`` bounds device memory
    for layer states at every instant, transfers in flight included.

    The optimizer step drives it: :meth:`prefetch` the next group while the current one is updated,
    :meth:`acquire` (wait for the fetch and put the states into ``optimizer.state``), then :meth:`release`
    (take them out and start the write-back). With two slots, the fetch of group ``i + 1`` waits for the
    write-back of group ``i - 1`` to finish; with three, both overlap the update of group ``i``.

    Args:
        optimizer: The optimizer whose ``state`` holds resident states.
        groups: Parameters of each group; a parameter belongs to at most one group.
        tier: The backing tier.
        max_resident: Slots, at least 1.
    """

    def __init__(self, optimizer: Optimizer, groups: list[list[nn.Parameter]], tier: BackingTier, max_resident: int):
        if max_resident < 1:
            raise ValueError(f"max_resident_layers={max_resident} must be an integer >= 1")
        self.optimizer = optimizer
        self.groups = groups
        self.tier = tier
        self.max_resident = max_resident
        self._layouts: dict[int, _Layout] = {}
        self._resident: dict[int, _Resident] = {}
        self._writes: deque[int] = deque()
        self.stats = {
            "resident_bytes": 0,
            "peak_resident_bytes": 0,
            "resident_layers": 0,
            "peak_resident_layers": 0,
            "backing_bytes": 0,
            "bytes_to_device": 0,
            "bytes_to_backing": 0,
            "wait_seconds": 0.0,
        }
        self._always_resident_bytes = 0
        self._closed = False

    @property
    def resident_groups(self) -> list[int]:
        """Groups holding a slot now, in the order they took it."""
        return list(self._resident)

    def prefetch(self, group: int) -> None:
        """Start fetching ``group``'s states if it has any in the backing tier and a slot is free.

        Waits for the oldest write-back when every slot is taken by one; does nothing when every slot holds
        a group the step still needs.
        """
        if group in self._resident:
            return
        if len(self._resident) >= self.max_resident and not self._finish_oldest_write():
            return
        self._start_fetch(group)

    def acquire(self, group: int) -> None:
        """Make ``group``'s states resident in ``optimizer.state``, fetching them now if no prefetch ran."""
        entry = self._resident.get(group)
        if entry is not None and entry.writing:
            self._wait(entry.transfer)
            self._drop(group)
            entry = None
        if entry is None:
            while len(self._resident) >= self.max_resident:
                if not self._finish_oldest_write():
                    raise RuntimeError(
                        f"no residency slot is free for layer group {group}: all {self.max_resident} hold groups "
                        "that were acquired and not released"
                    )
            self._start_fetch(group)
            entry = self._resident[group]
        self._wait(entry.transfer)
        layout = self._layouts.get(group)
        if layout is not None:
            self._install(group, layout, entry.tensors)

    def release(self, group: int, written: bool) -> None:
        """Take ``group``'s states out of ``optimizer.state``.

        Args:
            group: A group that was acquired.
            written: Whether the optimizer updated the states since :meth:`acquire`. If so, a write-back
                starts and the slot stays taken until it is done; if not, the backing copy is still current
                and the slot is freed at once.
        """
        tensors, layout = self._collect(group)
        if layout is None:
            self._drop(group)
            return
        if not written and self._layouts.get(group) == layout:
            self._drop(group)
            return
        self._layouts[group] = layout
        transfer = self.tier.write(group, tensors)
        self._resident[group] = _Resident(tensors, transfer, layout.nbytes, writing=True)
        self._writes.append(group)
        self.stats["bytes_to_backing"] += layout.nbytes
        self.stats["backing_bytes"] = self.tier.backing_bytes()
        self._note_residency()

    def discard_unused(self) -> None:
        """At the end of a step, free the slots of groups that were prefetched but never acquired.

        Every acquired group has been released by then, so any slot not held by a write-back is one.
        """
        for group in [g for g, entry in self._resident.items() if not entry.writing]:
            self._wait(self._resident[group].transfer)
            self._drop(group)

    def flush(self) -> None:
        """Wait for every write-back in flight."""
        while self._finish_oldest_write():
            pass

    def set_always_resident_bytes(self, nbytes: int) -> None:
        """Bytes of optimizer state outside any group (always resident), counted in the residency stats."""
        self._always_resident_bytes = nbytes
        self._note_residency()

    def backed_state(self) -> dict[nn.Parameter, dict[str, Any]]:
        """Every backed (non-resident) group's states as CPU tensors, after pending writes, for checkpoints.

        Raises:
            RuntimeError: If the store was closed (the backing tier is gone) while it held states.
        """
        if self._closed and self._layouts:
            raise RuntimeError(
                "the offloaded optimizer states were freed when training ended (strategy teardown), so a full "
                "optimizer state can no longer be saved; save checkpoints during fit, e.g. with ModelCheckpoint"
            )
        self.flush()
        states: dict[nn.Parameter, dict[str, Any]] = {}
        for group, layout in self._layouts.items():
            if group in self._resident:
                continue
            for (position, key, _), tensor in zip(layout.tensors, self.tier.read_to_cpu(group), strict=True):
                states.setdefault(self.groups[group][position], {})[key] = tensor
            for (position, key), value in layout.values.items():
                states.setdefault(self.groups[group][position], {})[key] = value
        return states

    def load_backed_state(self, group: int, states: list[dict[str, Any] | None]) -> None:
        """Write checkpointed states of ``group`` (one dict per parameter, or ``None``) into the backing tier.

        The tensors go to the backing tier as given (on the CPU); they are only moved to the device, with
        the dtype and device recorded here, when the group is next acquired.
        """
        layout = _Layout()
        tensors: list[Tensor] = []
        for position, state in enumerate(states):
            for key, value in sorted((state or {}).items()):
                if isinstance(value, Tensor):
                    spec = _resident_spec(self.optimizer, self.groups[group][position], key, value)
                    layout.tensors.append((position, key, spec))
                    tensors.append(value.detach().to(dtype=spec.dtype))
                else:
                    layout.values[(position, key)] = value
        if not layout.tensors and not layout.values:
            return
        self._layouts[group] = layout
        self._wait(self.tier.write(group, tensors))
        self.stats["backing_bytes"] = self.tier.backing_bytes()

    def close(self) -> None:
        """Finish transfers and free the backing tier."""
        self.flush()
        self.tier.close()
        self._closed = True

    def _start_fetch(self, group: int) -> None:
        layout = self._layouts.get(group)
        if layout is None or not layout.tensors:
            self._resident[group] = _Resident([], Transfer(), 0)
        else:
            tensors, transfer = self.tier.read(group, [spec for _, _, spec in layout.tensors])
            self._resident[group] = _Resident(tensors, transfer, layout.nbytes)
            self.stats["bytes_to_device"] += layout.nbytes
        self._note_residency()

    def _install(self, group: int, layout: _Layout, tensors: list[Tensor]) -> None:
        params = self.groups[group]
        for (position, key, _), tensor in zip(layout.tensors, tensors, strict=True):
            self.optimizer.state[params[position]][key] = tensor
        for (position, key), value in layout.values.items():
            self.optimizer.state[params[position]][key] = value

    def _collect(self, group: int) -> tuple[list[Tensor], _Layout | None]:
        """Pop the group's states out of ``optimizer.state``."""
        layout = _Layout()
        tensors: list[Tensor] = []
        for position, param in enumerate(self.groups[group]):
            state = self.optimizer.state.pop(param, None)
            for key, value in sorted((state or {}).items()):
                if isinstance(value, Tensor):
                    layout.tensors.append((position, key, TensorSpec.of(value)))
                    tensors.append(value)
                else:
                    layout.values[(position, key)] = value
        if not layout.tensors and not layout.values:
            return [], None
        return tensors, layout

    def _finish_oldest_write(self) -> bool:
        if not self._writes:
            return False
        group = self._writes.popleft()
        entry = self._resident.get(group)
        if entry is not None and entry.writing:
            self._wait(entry.transfer)
            self._drop(group)
        return True

    def _drop(self, group: int) -> None:
        self._resident.pop(group, None)
        if group in self._writes:
            self._writes.remove(group)
        self._note_residency()

    def _wait(self, transfer: Transfer) -> None:
        if transfer.done():
            transfer.wait()
            return
        start = time.perf_counter()
        transfer.wait()
        self.stats["wait_seconds"] += time.perf_counter() - start

    def _note_residency(self) -> None:
        nbytes = self._always_resident_bytes + sum(entry.nbytes for entry in self._resident.values())
        stats = self.stats
        stats["resident_bytes"] = nbytes
        stats["resident_layers"] = len(self._resident)
        stats["peak_resident_bytes"] = max(stats["peak_resident_bytes"], nbytes)
        stats["peak_resident_layers"] = max(stats["peak_resident_layers"], len(self._resident))


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state``: the states resident now."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor)
    )


def _resident_spec(optimizer: Optimizer, param: nn.Parameter, key: str, value: Tensor) -> TensorSpec:
    """Dtype and device a checkpointed state tensor takes when resident, following torch's loading policy.

    ``step`` counters stay float32 on the CPU unless the optimizer is fused or capturable; other floating
    point states take the parameter's dtype and device.
    """
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    if key == "step":
        on_device = group.get("fused") or group.get("capturable")
        return TensorSpec(tuple(value.shape), torch.float32, param.device if on_device else torch.device("cpu"))
    dtype = param.dtype if value.is_floating_point() else value.dtype
    return TensorSpec(tuple(value.shape), dtype, param.device)
