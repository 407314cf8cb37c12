"""``TensorStateStore``: which parameters' optimizer states sit on the device, and moving them to and from a tier."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_grass.offload.plan import Lookahead, unit_bytes
from lightning_grass.offload.row_chunks import joined_rows, state_rows
from lightning_grass.offload.sharded_tensors import ShardPlacement, local_part
from lightning_grass.offload.state_placement import resident_spec
from lightning_grass.offload.transfer import TensorSpec, Transfer

log = logging.getLogger(__name__)


class BackingTier(Protocol):
    """Where offloaded states live: :class:`~lightning_grass.offload.HostTier` or ``DiskTier``."""

    def write(self, unit: int, tensors: list[Tensor]) -> Transfer:
        """Start copying ``tensors`` to the backing copy of ``unit``."""

    def read(self, unit: int, specs: list[TensorSpec]) -> tuple[list[Tensor], Transfer]:
        """Allocate resident tensors for ``specs`` and start filling them from ``unit``'s backing copy."""

    def read_to_cpu(self, unit: int) -> list[Tensor]:
        """``unit``'s backing tensors on the CPU."""

    def backing_bytes(self) -> int:
        """Bytes held in the tier."""

    def close(self) -> None:
        """Finish transfers and free the tier; never raises for a failed transfer (it raises at its wait)."""


@dataclass
class _Layout:
    """How one parameter's state is laid out: its non-tensor values, and its tensors.

    Per tensor: its key, the spec of its (local) part, and, for a sharded state, where that part sits in the
    ``DTensor``.
    """

    tensors: list[tuple[str, TensorSpec, ShardPlacement | None]] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for _, spec, _ in self.tensors)

    def add(self, key: str, value: Tensor, spec: TensorSpec | None = None) -> Tensor:
        """Record state tensor ``value`` (spec: its local part's, unless given); return the local part."""
        local = local_part(value)
        self.tensors.append((key, spec or TensorSpec.of(local), ShardPlacement.of(value)))
        return local

    def specs(self) -> list[TensorSpec]:
        return [spec for _, spec, _ in self.tensors]

    def rebuild(self, tensors: list[Tensor]) -> dict[str, Any]:
        """The state from stored local parts, sharded ones wrapped back into ``DTensor`` where they are."""
        state = dict(self.values)
        for (key, _, placement), tensor in zip(self.tensors, tensors, strict=True):
            state[key] = tensor if placement is None else placement.around(tensor)
        return state


@dataclass
class _Entry:
    """A unit whose state occupies device memory: being fetched, resident, or being written back.

    A write-back's entry holds no tensors (the tier keeps what its copy still reads), only its bytes until the
    tier releases them and its transfer, to be waited for before the unit is fetched again. ``workspace`` is
    what the optimizer's step over the unit allocates, reserved from its acquisition to its release.
    """

    tensors: list[Tensor]
    transfer: Transfer
    nbytes: int
    status: str  # "fetching", "resident" or "writing"
    dirty: bool = False
    workspace: int = 0

    def held_bytes(self) -> int:
        """Device bytes the entry holds now."""
        if self.status == "writing" and self.transfer.released():
            return 0
        return self.nbytes + self.workspace


class TensorStateStore:
    """Keeps offloaded parameters' optimizer states (fp32 masters included) in a backing tier, and owns the step.

    The unit of residency is one parameter tensor; of a sharded (FSDP2 ``DTensor``) parameter, this rank's shard,
    whose states are stored, sized and budgeted by their local parts; or a chunk of a tensor's rows
    (:mod:`~lightning_grass.offload.row_chunks`), for a tensor too large for the budget: the chunk's state is in
    ``optimizer.state`` under a view of those rows while it is updated, and written back right after. A state
    is *resident* while it sits in ``optimizer.state`` on the device; otherwise it lives in the backing tier. An
    entry takes its bytes from the moment its fetch starts until the tier has released the memory its
    write-back reads (the copy has read it, or the disk tier has staged it on the host), and
    ``max_resident_bytes`` bounds the sum at every instant, transfers in flight included. A unit that has no
    state yet reserves the bytes its state will take, and while the optimizer steps a unit, the step's own
    allocations are reserved too (:func:`~lightning_grass.offload.plan.unit_bytes`). The store drops its
    references to a write-back's tensors as soon as the copy is queued.

    :meth:`step` walks a step's units in one of two regimes, decided once per step from the *active* units
    (those the next steps update, :meth:`set_active`):

    - **Keep**: their states and step workspaces fit in the budget together (always, without a budget). They
      stay resident between steps, move only when the active set changes (:meth:`set_active` writes back the
      ones that leave), and are all fetched before the step (:meth:`prefetch_active`), overlapping forward and
      backward. They are updated in one call.
    - **Stream**: they do not fit. Each is fetched before its update and written back just after, while the
      next ones are fetched as deep as the :class:`~lightning_grass.offload.plan.Lookahead` allows, the rule
      :func:`~lightning_grass.estimate_memory` sums.

    Every per-step path costs time linear in the units stepped: byte totals are kept as entries change, and the
    lookahead only moves forward.

    A transfer that fails (a full or vanished disk tier's folder: :class:`~lightning_grass.errors.StorageError`)
    raises at the first wait for it, on the caller's thread, before anything reads the state it concerns: an
    entry leaves the store only after its transfer was waited for. :meth:`close` does not raise it again.

    Args:
        optimizer: The optimizer whose ``state`` holds resident states.
        params: The offloaded parameters, one per unit (a chunked parameter once per chunk); a unit is an index
            into this list. :class:`~lightning_grass.offload.plan.OffloadPlan` gives them.
        tier: The backing tier.
        max_resident_bytes: The budget; ``None`` bounds nothing (every active state stays resident).
        master_params: Parameters whose optimizer steps an fp32 master (their floating state is fp32).
        overlap: Overlap transfers with compute. ``False`` copies synchronously: no prefetch, and every
            write-back is waited for at once. It exists to measure what overlap buys.
        rows: Per unit, the ``(start, stop)`` rows of its parameter it holds, or ``None`` for the whole tensor;
            ``None`` (the default) makes every unit a whole tensor.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        params: Sequence[nn.Parameter],
        tier: BackingTier,
        max_resident_bytes: int | None = None,
        master_params: Iterable[nn.Parameter] = (),
        overlap: bool = True,
        rows: Sequence[tuple[int, int] | None] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.params = list(params)
        self.rows: list[tuple[int, int] | None] = list(rows) if rows is not None else [None] * len(self.params)
        self._mastered = {id(p) for p in master_params}
        self.sizes = [
            unit_bytes(optimizer, p, id(p) in self._mastered, chunk)
            for p, chunk in zip(self.params, self.rows, strict=True)
        ]
        self._views: dict[int, Tensor] = {}
        self._units_of: dict[int, list[int]] = {}
        for unit, param in enumerate(self.params):
            self._units_of.setdefault(id(param), []).append(unit)
        self.tier = tier
        self.max_resident_bytes = max_resident_bytes
        self.overlap = overlap
        self._layouts: dict[int, _Layout] = {}
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # fetching or resident, oldest use first
        self._writing: OrderedDict[int, _Entry] = OrderedDict()  # write-backs in flight, in the order they began
        self._entry_bytes = 0  # held bytes of the fetching and resident entries
        self._entry_tensors = 0  # how many of them hold bytes
        self.active: list[int] = []
        self._active_set: set[int] = set()
        self._keep = True
        self.set_active(range(len(self.params)))
        self._protected: set[int] = set()
        self._unmanaged_bytes = 0
        self._closed = False
        self._failed = False
        self.stats = {
            "resident_bytes": 0,
            "peak_resident_bytes": 0,
            "resident_tensors": 0,
            "peak_resident_tensors": 0,
            "backing_bytes": 0,
            "bytes_to_device": 0,
            "bytes_to_backing": 0,
            "host_wait_seconds": 0.0,
        }

    def unit_bytes(self, unit: int) -> int:
        """Bytes ``unit``'s state takes on the device: as last seen, or as expected when it has none yet."""
        layout = self._layouts.get(unit)
        return layout.nbytes if layout is not None else self.sizes[unit].resident

    def workspace_bytes(self, unit: int) -> int:
        """Bytes the optimizer's step over ``unit`` allocates on the device beside its state."""
        return self.sizes[unit].workspace

    def key(self, unit: int) -> Tensor:
        """The tensor ``unit``'s state is kept under in ``optimizer.state``, and that its update steps.

        The parameter itself, or for a chunk a view of its rows (made when first asked for, until the chunk is
        written back), which updates the parameter in place.
        """
        rows = self.rows[unit]
        if rows is None:
            return self.params[unit]
        if unit not in self._views:
            self._views[unit] = self.params[unit].detach()[rows[0] : rows[1]]
        return self._views[unit]

    def set_active(self, units: Iterable[int]) -> None:
        """The units the next steps update, in update order; resident units outside them are written back.

        Whether they stay resident between steps (keep) or stream is decided here, from their bytes.
        """
        self.active = list(units)
        self._active_set = set(self.active)
        budget = self.max_resident_bytes
        stepped = sum(self.sizes[unit].stepped for unit in self.active)
        self._keep = (budget is None or stepped <= budget) and all(self.rows[unit] is None for unit in self.active)
        for unit in [u for u in self._entries if u not in self._active_set]:
            self._evict(unit)

    def prefetch_active(self) -> None:
        """Start fetching what the next step updates first: every active unit (keep), or the first ones (stream)."""
        self._reap()
        if self._keep:
            for unit in self.active:
                self._prefetch(unit)
            return
        end = Lookahead(self.sizes, self.max_resident_bytes, self.active).extend(-1)
        self._protected = set(self.active[:end])
        try:
            for unit in self.active[:end]:
                if not self._prefetch(unit):
                    break
        finally:
            self._protected = set()

    def step(self, units: Sequence[int], update: Callable[[list[int]], None]) -> None:
        """Update ``units`` in order through ``update``, their states resident while it runs.

        Keep (every unit active, and the active units fit together): all of them are acquired, updated in one
        call and stay resident. Stream: each unit is acquired, the next ones are fetched as deep as the
        lookahead allows, it is updated alone, and its state is written back; what was fetched and not updated
        leaves the device at the end.

        Args:
            units: The units to update, in order; none is evicted to make room before its update.
            update: Steps the optimizer over the given units, whose states are resident.
        """
        self._reap()
        self._protected = set(units)
        keep = self._keep and self._protected.issubset(self._active_set)
        try:
            if keep:
                for unit in units:
                    self._acquire(unit)
                if units:
                    update(list(units))
                for unit in units:
                    self._release(unit, keep=True)
            else:
                self._stream(units, update)
        finally:
            self._protected = set()
            if not keep:
                for unit in list(self._entries):
                    self._evict(unit)
            self._reap()

    def _stream(self, units: Sequence[int], update: Callable[[list[int]], None]) -> None:
        lookahead = Lookahead(self.sizes, self.max_resident_bytes, units)
        fetched = 0  # units[:fetched] were fetched, or need no fetch
        for position, unit in enumerate(units):
            self._acquire(unit)
            fetched = max(fetched, position + 1)
            end = lookahead.extend(position)
            while fetched < end and self._prefetch(units[fetched]):
                fetched += 1
            update([unit])
            self._release(unit, keep=False)

    def flush(self) -> None:
        """Wait for every write-back in flight."""
        while self._finish_oldest_write(holding_only=False):
            pass

    def set_unmanaged_state_bytes(self, nbytes: int) -> None:
        """Bytes of the optimizer states the store does not hold (they stay resident), counted in the stats."""
        self._unmanaged_bytes = nbytes
        self._note_residency()

    def backed_state(self) -> dict[nn.Parameter, dict[str, Any]]:
        """Every non-resident unit's state as CPU tensors, after pending writes, for checkpoints.

        A sharded state is a ``DTensor`` around the CPU tensor, which never passes through the device.

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
        chunks: dict[int, list[dict[str, Any]]] = {}
        for unit, layout in sorted(self._layouts.items()):
            entry = self._entries.get(unit)
            if entry is not None and entry.status == "resident":
                continue  # its state is in optimizer.state, and the backing copy may be older
            state = layout.rebuild(self.tier.read_to_cpu(unit))
            if self.rows[unit] is None:
                states[self.params[unit]] = state
            else:
                chunks.setdefault(id(self.params[unit]), []).append(state)
        for key, parts in chunks.items():
            units = self._units_of[key]
            if len(parts) == len(units):  # every chunk has its state (they are all stepped, or none)
                states[self.params[units[0]]] = joined_rows(parts)
        return states

    def load_backed_state(self, param: nn.Parameter, state: dict[str, Any] | None) -> None:
        """Write a checkpointed state of ``param`` into the backing tier, on the CPU as given.

        Each tensor takes the dtype and device recorded here (torch's loading policy, with fp32 for the
        floating state of a parameter that has a master) when its unit is next acquired. A sharded state (a
        ``DTensor``) goes in as its local shard, as it is; a chunked parameter's state is cut into its chunks.
        """
        for unit in self._units_of.get(id(param), []):
            rows = self.rows[unit]
            self._load_unit_state(unit, state if rows is None or state is None else state_rows(state, *rows))

    def _load_unit_state(self, unit: int, state: dict[str, Any] | None) -> None:
        param = self.params[unit]
        layout = _Layout()
        tensors: list[Tensor] = []
        for key, value in sorted((state or {}).items()):
            if isinstance(value, Tensor):
                spec = resident_spec(self.optimizer, param, key, value, id(param) in self._mastered)
                tensors.append(layout.add(key, value.detach(), spec).to(dtype=spec.dtype))
            else:
                layout.values[key] = value
        if not layout.tensors and not layout.values:
            return
        self._layouts[unit] = layout
        self._wait(self.tier.write(unit, tensors))
        self.stats["backing_bytes"] = self.tier.backing_bytes()

    def close(self) -> None:
        """Wait for the write-backs in flight, then free the backing tier. A second call does nothing.

        It never raises for a failed transfer. One that failed has raised at a wait during training, and the
        run is stopping because of it: raising it again from teardown would replace that error, or mask another
        exception that stopped the run. A failure that no wait has raised (a write-back still in flight when
        training ended, whose state the tier would free now anyway) is logged as a warning instead.
        """
        if self._closed:
            return
        self._closed = True
        try:
            for unit, entry in list(self._writing.items()):
                try:
                    entry.transfer.wait()
                except Exception as error:
                    if not self._failed:
                        log.warning("an optimizer-state write-back failed after training ended: %s", error)
                    self._failed = True
                self._writing.pop(unit)
            self._note_residency()
        finally:
            self.tier.close()

    def _prefetch(self, unit: int) -> bool:
        """Start fetching ``unit``'s state if it has one in the tier and the budget has room.

        Waits for write-backs to finish, and writes back resident states that are neither ``unit`` nor
        protected, to make room.

        Returns:
            Whether ``unit`` needs no fetch any more: it is fetching or resident, has no state in the tier yet,
            or its fetch started now. ``False`` when its write-back is in flight, the budget has no room, or
            transfers do not overlap.
        """
        if not self.overlap or unit in self._writing:
            return False
        if unit in self._entries:
            return True
        layout = self._layouts.get(unit)
        if layout is None or not layout.tensors:
            return True
        if not self._make_room(layout.nbytes, exclude=unit):
            return False
        self._start_fetch(unit, layout)
        return True

    def _acquire(self, unit: int) -> None:
        """Make ``unit``'s state resident in ``optimizer.state``, fetching it now if no prefetch did.

        Its step workspace is reserved until :meth:`_release`.

        Raises:
            RuntimeError: If the budget cannot hold it next to the states this step still needs.
        """
        writing = self._writing.pop(unit, None)
        if writing is not None:
            self._wait(writing.transfer)
        entry = self._entries.get(unit)
        workspace = self.sizes[unit].workspace
        if not self._make_room(workspace + (self.unit_bytes(unit) if entry is None else 0), exclude=unit):
            raise RuntimeError(
                f"max_resident_bytes={self.max_resident_bytes} cannot hold the state and step workspace of "
                f"offloaded tensor {unit} ({self.unit_bytes(unit) + workspace} bytes) next to the "
                f"{len(self._entries)} this step still needs"
            )
        if entry is None:
            layout = self._layouts.get(unit)
            if layout is not None and layout.tensors:
                self._start_fetch(unit, layout)
            else:
                self._put(unit, _Entry([], Transfer(), self.unit_bytes(unit), "fetching"))
            entry = self._entries[unit]
        self._change(entry, workspace=workspace)
        if entry.status == "fetching":
            self._wait(entry.transfer)
            layout = self._layouts.get(unit)
            if layout is not None:
                self._install(unit, layout, entry.tensors)
            entry.status = "resident"
        self._entries.move_to_end(unit)
        self._note_residency()

    def _release(self, unit: int, keep: bool) -> None:
        """``unit`` was updated: keep its state resident (``keep``, within the budget) or write it back."""
        entry = self._entries[unit]
        entry.dirty = True
        nbytes = sum(t.numel() * t.element_size() for t in self._state_tensors(unit))
        self._change(entry, workspace=0, nbytes=nbytes)
        budget = self.max_resident_bytes
        if keep and self.rows[unit] is None and (budget is None or self._held_bytes() <= budget):
            self._note_residency()
        else:
            self._evict(unit)

    def _start_fetch(self, unit: int, layout: _Layout) -> None:
        tensors, transfer = self.tier.read(unit, layout.specs())
        self._put(unit, _Entry(tensors, transfer, layout.nbytes, "fetching"))
        self.stats["bytes_to_device"] += layout.nbytes
        self._note_residency()

    def _install(self, unit: int, layout: _Layout, tensors: list[Tensor]) -> None:
        self.optimizer.state[self.key(unit)].update(layout.rebuild(tensors))

    def _state_tensors(self, unit: int) -> list[Tensor]:
        """The local parts of ``unit``'s resident state tensors."""
        state = self.optimizer.state.get(self.key(unit), {})
        return [local_part(value) for value in state.values() if isinstance(value, Tensor)]

    def _evict(self, unit: int) -> None:
        """Take ``unit``'s state out of ``optimizer.state`` and start its write-back (or drop an unchanged one)."""
        entry = self._entries[unit]
        if entry.status == "fetching":
            self._wait(entry.transfer, discard=True)  # unused: the tier need not finish copying it to the device
            self._drop(unit)
            return
        tensors, layout = self._collect(unit)
        if layout is None or (not entry.dirty and self._layouts.get(unit) == layout):
            self._drop(unit)
            return
        self._layouts[unit] = layout
        self._take(unit)
        transfer = self.tier.write(unit, tensors)
        del tensors  # the tier keeps what its copy still reads; the device memory goes back when it is done
        self._writing[unit] = _Entry([], transfer, layout.nbytes, "writing")
        self.stats["bytes_to_backing"] += layout.nbytes
        self.stats["backing_bytes"] = self.tier.backing_bytes()
        if not self.overlap:
            self._wait(transfer)
            self._writing.pop(unit)
        self._note_residency()

    def _collect(self, unit: int) -> tuple[list[Tensor], _Layout | None]:
        """Pop ``unit``'s state out of ``optimizer.state`` (and forget a chunk's view of its rows)."""
        state = self.optimizer.state.pop(self.key(unit), None)
        self._views.pop(unit, None)
        layout = _Layout()
        tensors: list[Tensor] = []
        for key, value in sorted((state or {}).items()):
            if isinstance(value, Tensor):
                tensors.append(layout.add(key, value))
            else:
                layout.values[key] = value
        if not layout.tensors and not layout.values:
            return [], None
        return tensors, layout

    def _make_room(self, nbytes: int, exclude: int) -> bool:
        """Finish write-backs, then write back idle resident states, until ``nbytes`` more fit in the budget.

        Idle: neither ``exclude`` nor a protected unit (one the step or the prefetch still needs).
        """
        budget = self.max_resident_bytes
        if budget is None:
            return True
        self._reap()  # write-backs that are done, failed ones included, are waited for in the order they began
        while self._held_bytes() + nbytes > budget:
            if self._finish_oldest_write(holding_only=True):
                continue
            idle = next((u for u in self._entries if u != exclude and u not in self._protected), None)
            if idle is None:
                # A tier's thread may have released a write-back's memory since the loop's test read it (a disk
                # write staged on the host): no write-back holds any now, so this reading is the last word.
                return self._held_bytes() + nbytes <= budget
            self._evict(idle)
        return True

    def _finish_oldest_write(self, holding_only: bool) -> bool:
        """Wait for the oldest write-back (the oldest still holding device memory, if ``holding_only``)."""
        for unit, entry in self._writing.items():
            if holding_only and not entry.held_bytes():
                continue
            self._wait(entry.transfer)
            self._writing.pop(unit)
            self._note_residency()
            return True
        return False

    def _reap(self) -> None:
        """Free the write-backs that have finished, without waiting."""
        for unit in [u for u, entry in self._writing.items() if entry.transfer.done()]:
            self._wait(self._writing.pop(unit).transfer)
        self._note_residency()

    def _put(self, unit: int, entry: _Entry) -> None:
        self._entries[unit] = entry
        self._count(entry, 1)

    def _take(self, unit: int) -> _Entry:
        entry = self._entries.pop(unit)
        self._count(entry, -1)
        return entry

    def _change(self, entry: _Entry, workspace: int, nbytes: int | None = None) -> None:
        """Set a fetching or resident entry's workspace (and bytes), keeping the totals."""
        self._count(entry, -1)
        entry.workspace = workspace
        if nbytes is not None:
            entry.nbytes = nbytes
        self._count(entry, 1)

    def _count(self, entry: _Entry, sign: int) -> None:
        held = entry.nbytes + entry.workspace
        self._entry_bytes += sign * held
        self._entry_tensors += sign * (held > 0)

    def _drop(self, unit: int) -> None:
        if unit in self._entries:
            self._take(unit)
        self._note_residency()

    def _wait(self, transfer: Transfer, discard: bool = False) -> None:
        """Wait for ``transfer``, timing the wait; note that a transfer failed before its error propagates.

        ``discard``: it is a fetch whose tensors are dropped unused (:meth:`Transfer.discard`).
        """
        start = None if transfer.done() else time.perf_counter()
        try:
            if discard:
                transfer.discard()
            else:
                transfer.wait()
        except Exception:
            self._failed = True
            raise
        if start is not None:
            self.stats["host_wait_seconds"] += time.perf_counter() - start

    def _held_bytes(self) -> int:
        """Device bytes the entries hold now: fetching, resident, and write-backs the tier has not released."""
        return self._entry_bytes + sum(entry.held_bytes() for entry in self._writing.values())

    def _note_residency(self) -> None:
        writing = [entry.held_bytes() for entry in self._writing.values()]
        nbytes = self._unmanaged_bytes + self._entry_bytes + sum(writing)
        tensors = self._entry_tensors + sum(1 for held in writing if held)
        stats = self.stats
        stats["resident_bytes"] = nbytes
        stats["resident_tensors"] = tensors
        stats["peak_resident_bytes"] = max(stats["peak_resident_bytes"], nbytes)
        stats["peak_resident_tensors"] = max(stats["peak_resident_tensors"], tensors)
