"""``OffloadPlan``: the units the offload streams, their bytes, and how far ahead of an update it fetches.

One plan serves the strategies and :func:`~lightning_grass.estimate_memory`. :func:`plan_offload` turns the
layers' parameters, the always-on ones that are offloaded too, and the byte budget into *units*: a whole
tensor, or a chunk of its rows when the tensor does not fit in the budget while it is stepped
(:mod:`~lightning_grass.offload.row_chunks`). It refuses, before any step, a budget the offload cannot work in.
Each unit's bytes (:class:`UnitBytes`) come from the optimizer's arithmetic
(:mod:`~lightning_grass.offload.state_bytes`), so a plan built over parameters on the ``meta`` device sizes a
model without allocating it.

:class:`Lookahead` is the one rule for how deep the store fetches ahead of the unit it updates, and
:func:`held_at_peak` walks the same rule to find what the store holds at its peak.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lightning_grass.byte_size import format_bytes
from lightning_grass.errors import SettingValueError
from lightning_grass.offload.row_chunks import (
    ELEMENTWISE_OPTIMIZERS,
    chunk_numel,
    is_elementwise,
    row_ranges,
    rows_per_chunk,
)
from lightning_grass.offload.sharded_tensors import local_numel
from lightning_grass.offload.state_bytes import expected_state_bytes, step_workspace_bytes

Rows = tuple[int, int] | None


@dataclass(frozen=True)
class UnitBytes:
    """What one unit takes on the device: its optimizer state, its fp32 master, and its step's workspace.

    Attributes:
        state: Moments and step counter.
        master: The fp32 master weight, 0 without one.
        workspace: What the optimizer's step over the unit allocates beside its state (an fp32 master gradient,
            the update's temporaries), held only while it is stepped.
    """

    state: int
    master: int
    workspace: int

    @property
    def resident(self) -> int:
        """Bytes while the unit waits on the device, fetched or kept: state and master."""
        return self.state + self.master

    @property
    def stepped(self) -> int:
        """Bytes while the unit is stepped: state, master and workspace."""
        return self.state + self.master + self.workspace

    def at_rest(self) -> UnitBytes:
        """The same unit while it is not stepped: no workspace."""
        return UnitBytes(self.state, self.master, 0)


def unit_bytes(optimizer: Optimizer, param: nn.Parameter, mastered: bool, rows: Rows = None) -> UnitBytes:
    """The bytes of ``param`` (or of its ``rows``) under ``optimizer``, once its state exists.

    Args:
        optimizer: The optimizer that holds ``param``.
        param: The parameter (this rank's shard, if sharded).
        mastered: Whether it is stepped on an fp32 master.
        rows: The ``(start, stop)`` rows of a chunk, or ``None`` for the whole tensor.

    Returns:
        Its state, master and step workspace, in bytes.
    """
    numel = chunk_numel(param, rows)
    master = 4 * (local_numel(param) if numel is None else numel) if mastered else 0
    state = expected_state_bytes(optimizer, param, mastered, numel) - master
    return UnitBytes(state, master, step_workspace_bytes(optimizer, param, mastered, numel))


@dataclass(frozen=True)
class OffloadPlan:
    """The offloaded tensors as units, in the order layers and always-on groups give them.

    Attributes:
        params: Per unit, its parameter (a chunked parameter once per chunk).
        rows: Per unit, the ``(start, stop)`` rows of its parameter, or ``None`` for the whole tensor.
        sizes: Per unit, its bytes once its state exists.
        layer_units: Per layer, its units in registration order (a parameter several layers share is one
            tensor: its units appear in each of them).
        always_on_units: The units of the always-on modules' offloaded tensors.
        max_resident_bytes: The budget; ``None`` bounds nothing.
        tensors: How many tensors the units cover.
    """

    params: tuple[nn.Parameter, ...]
    rows: tuple[Rows, ...]
    sizes: tuple[UnitBytes, ...]
    layer_units: tuple[tuple[int, ...], ...]
    always_on_units: tuple[int, ...]
    max_resident_bytes: int | None
    tensors: int

    def active_units(self, active_layers: Iterable[int]) -> list[int]:
        """The units the given layers' updates step, in update order: each layer's, then the always-on ones."""
        return [unit for layer in active_layers for unit in self.layer_units[layer]] + list(self.always_on_units)

    def chunked_tensors(self) -> int:
        """How many tensors are stepped in chunks of rows."""
        return len({id(p) for p, rows in zip(self.params, self.rows, strict=True) if rows is not None})

    def held_at_peak(self, units: Sequence[int]) -> list[UnitBytes]:
        """What the store holds at its peak while it steps ``units`` in order (:func:`held_at_peak`)."""
        return held_at_peak(self.sizes, self.max_resident_bytes, units)


def held_at_peak(sizes: Sequence[UnitBytes], budget: int | None, units: Sequence[int]) -> list[UnitBytes]:
    """What the store holds at its peak while it steps ``units`` in order, as each unit's bytes.

    Every unit, stepped, when they fit in the budget together (or there is none). Otherwise each unit in turn is
    stepped while the :class:`Lookahead` holds the states of the next ones; the peak is the largest such set.

    Args:
        sizes: Every unit's bytes, indexed by unit.
        budget: The byte budget, or ``None``.
        units: The units of a step, in update order.
    """
    if budget is None or sum(sizes[unit].stepped for unit in units) <= budget:
        return [sizes[unit] for unit in units]
    lookahead = Lookahead(sizes, budget, units)
    peak: list[UnitBytes] = []
    for position in range(len(units)):
        end = lookahead.extend(position)
        held = [sizes[units[position]]] + [sizes[unit].at_rest() for unit in units[position + 1 : end]]
        if sum(part.stepped for part in held) > sum(part.stepped for part in peak):
            peak = held
    return peak


class Lookahead:
    """How deep the store fetches ahead of the unit it steps, as the units of a step advance.

    Ahead of the unit at ``position`` (``-1``: before the step, none stepped yet) the units up to ``end`` are
    fetched while the states of all of them and the largest of their workspaces fit in the budget, and, with
    the stepped unit's own state and workspace, they fit beside it. Each of them can then be stepped in turn
    while the ones after it wait on the device. The first unit after the stepped one needs only the second
    condition. The window only moves forward, so a step costs time linear in its units.

    Args:
        sizes: Every unit's bytes, indexed by unit.
        budget: The byte budget, or ``None``.
        units: The units of the step, in update order.
    """

    def __init__(self, sizes: Sequence[UnitBytes], budget: int | None, units: Sequence[int]) -> None:
        self._sizes = sizes
        self._budget = budget
        self._units = units
        self._end = 0
        self._ahead = 0
        self._workspaces: deque[tuple[int, int]] = deque()  # (index, workspace), workspaces decreasing

    def extend(self, position: int) -> int:
        """Move to ``position`` and return the end (exclusive) of the units to hold fetched ahead of it."""
        units, sizes, budget = self._units, self._sizes, self._budget
        if self._end <= position:
            self._end, self._ahead = position + 1, 0
            self._workspaces.clear()
        elif position >= 0:
            self._ahead -= sizes[units[position]].resident
            while self._workspaces and self._workspaces[0][0] <= position:
                self._workspaces.popleft()
        stepped = sizes[units[position]].stepped if position >= 0 else 0
        while self._end < len(units):
            size = sizes[units[self._end]]
            if budget is not None:
                workspace = max(size.workspace, self._workspaces[0][1] if self._workspaces else 0)
                first = self._end == position + 1
                if stepped + self._ahead + size.resident > budget:
                    break
                if not first and self._ahead + size.resident + workspace > budget:
                    break
            self._ahead += size.resident
            while self._workspaces and self._workspaces[-1][1] <= size.workspace:
                self._workspaces.pop()
            self._workspaces.append((self._end, size.workspace))
            self._end += 1
        return self._end


def plan_offload(
    optimizer: Optimizer,
    layers: Sequence[Sequence[nn.Parameter]],
    always_on: Sequence[nn.Parameter],
    mastered: Iterable[nn.Parameter],
    max_resident_bytes: int | None,
    names: Mapping[int, str],
    sharded: bool = False,
) -> OffloadPlan:
    """The offload's units over the layers' parameters and the offloaded always-on ones, or a refusal.

    A tensor that does not fit in the budget while stepped is cut into chunks of rows, each at most half the
    budget if one row allows it (so the next one's fetch overlaps its update). Refused before any step: such a
    tensor when it is sharded (``grass_fsdp``'s shards are not chunked) or when the optimizer's update is not
    elementwise, naming the largest; and a budget below one row of a tensor, naming the tensor whose row needs
    the most.

    Args:
        optimizer: The optimizer that holds every parameter given.
        layers: Per layer, its parameters in registration order.
        always_on: The always-on modules' parameters whose states are offloaded too.
        mastered: The parameters stepped on fp32 masters.
        max_resident_bytes: The budget; ``None`` bounds nothing.
        names: Parameter names by ``id``, for the messages.
        sharded: Whether every parameter is one rank's shard (as ``DTensor`` parameters are).

    Returns:
        The plan.

    Raises:
        SettingValueError: For a budget the offload cannot work in, with the bytes it needs.
    """
    tensors: list[nn.Parameter] = []
    index_of: dict[int, int] = {}
    layer_tensors = []
    for layer in layers:
        for p in layer:
            if id(p) not in index_of:
                index_of[id(p)] = len(tensors)
                tensors.append(p)
        layer_tensors.append([index_of[id(p)] for p in layer])
    always_on_tensors = []
    for p in always_on:
        if id(p) not in index_of:
            index_of[id(p)] = len(tensors)
            always_on_tensors.append(len(tensors))
            tensors.append(p)
    with_master = {id(p) for p in mastered}
    whole = [unit_bytes(optimizer, p, id(p) in with_master) for p in tensors]
    chunking = _chunking(optimizer, tensors, whole, with_master, max_resident_bytes, names, sharded)
    params: list[nn.Parameter] = []
    rows: list[Rows] = []
    sizes: list[UnitBytes] = []
    units_of: list[list[int]] = []
    for p, size, ranges in zip(tensors, whole, chunking, strict=True):
        units_of.append(list(range(len(params), len(params) + len(ranges or [None]))))
        for chunk in ranges or [None]:
            params.append(p)
            rows.append(chunk)
            sizes.append(size if chunk is None else unit_bytes(optimizer, p, id(p) in with_master, chunk))
    return OffloadPlan(
        params=tuple(params),
        rows=tuple(rows),
        sizes=tuple(sizes),
        layer_units=tuple(tuple(u for t in layer for u in units_of[t]) for layer in layer_tensors),
        always_on_units=tuple(u for t in always_on_tensors for u in units_of[t]),
        max_resident_bytes=max_resident_bytes,
        tensors=len(tensors),
    )


def _chunking(
    optimizer: Optimizer,
    tensors: list[nn.Parameter],
    whole: list[UnitBytes],
    mastered: set[int],
    budget: int | None,
    names: Mapping[int, str],
    sharded: bool,
) -> list[list[tuple[int, int]] | None]:
    """Per tensor, its chunks of rows if it does not fit in the budget while stepped, else ``None``; or a refusal."""
    if budget is None:
        return [None] * len(tensors)
    too_large = [index for index, size in enumerate(whole) if size.stepped > budget]
    if not too_large:
        return [None] * len(tensors)
    optimizer_name = type(optimizer).__name__

    def cannot_hold(index: int) -> str:
        return (
            f"max_resident_bytes={budget} bytes ({format_bytes(budget)}) cannot hold "
            f"{names.get(id(tensors[index]), 'an offloaded tensor')} while it is stepped ({whole[index].stepped} "
            "bytes: its optimizer state and step counter, its fp32 master and master gradient if it has one, and "
            f"{optimizer_name}'s temporaries)"
        )

    shards = [index for index in too_large if sharded or isinstance(tensors[index], DTensor)]
    if shards:
        largest = max(shards, key=lambda index: whole[index].stepped)
        need = whole[largest].stepped
        raise SettingValueError(
            f"{cannot_hold(largest)}, and the shards of grass_fsdp are not split into chunks of rows; raise it "
            f"to at least {need} bytes, or to {2 * need} bytes so that the next tensor's fetch overlaps the update"
        )
    if not is_elementwise(optimizer):
        largest = max(too_large, key=lambda index: whole[index].stepped)
        known = ", ".join(cls.__name__ for cls in ELEMENTWISE_OPTIMIZERS)
        raise SettingValueError(
            f"{cannot_hold(largest)}, and {optimizer_name} cannot step it in chunks of rows: only an "
            f"elementwise update ({known}) gives the same result on a chunk as on the whole tensor. Raise it to "
            f"at least {whole[largest].stepped} bytes, or use one of those optimizers"
        )
    row_needs = {
        index: unit_bytes(optimizer, tensors[index], id(tensors[index]) in mastered, (0, 1)).stepped
        for index in too_large
    }
    worst = max(too_large, key=row_needs.__getitem__)
    if row_needs[worst] > budget:
        raise SettingValueError(
            f"{cannot_hold(worst)}, nor one row of it ({row_needs[worst]} bytes), the smallest chunk it is "
            f"stepped in; raise it to at least {row_needs[worst]} bytes"
        )
    chunking: list[list[tuple[int, int]] | None] = [None] * len(tensors)
    for index in too_large:
        param = tensors[index]
        chunking[index] = row_ranges(param.shape[0], rows_per_chunk(optimizer, param, id(param) in mastered, budget))
    return chunking
