"""``TensorStateStore``: which parameters' optimizer states sit on the device, and moving them to and from a tier."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_grass.offload.row_chunks import chunk_numel, joined_rows, state_rows
from lightning_grass.offload.sharded_tensors import ShardPlacement, local_part
from lightning_grass.offload.state_bytes import expected_state_bytes, step_workspace_bytes
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
    """A parameter whose state occupies device memory: being fetched, resident, or being written back.

    A write-back's entry holds no tensors (the tier keeps what its copy still reads), only its bytes until the
    tier releases them and its transfer, to be waited for before the unit is fetched again. ``workspace`` is
    what the optimizer's step over the unit allocates, reserved from :meth:`TensorStateStore.acquire` to
    :meth:`TensorStateStore.release`.
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
    """Keeps offloaded parameters' optimizer states (fp32 masters included) in a backing tier.

    The unit of residency is one parameter tensor; of a sharded (FSDP2 ``DTensor``) parameter, this rank's shard,
    whose states are stored, sized and budgeted by their local parts; or a chunk of a tensor's rows
    (:mod:`~lightning_grass.offload.row_chunks`), for a tensor too large for the budget: the chunk's state is in
    ``optimizer.state`` under a view of those rows while it is updated, and written back right after. A state
    is *resident* while it sits in ``optimizer.state`` on the device; otherwise it lives in the backing tier. An
    entry takes its bytes from the moment its fetch starts until the tier has released the memory its
    write-back reads (the copy has read it, or the disk tier has staged it on the host), and
    ``max_resident_bytes`` bounds the sum at every instant, transfers in flight included. A parameter that has
    no state yet reserves the bytes its state will take
    (:func:`~lightning_grass.offload.state_bytes.expected_state_bytes`). While the optimizer steps a unit, the
    step's own allocations are reserved too: the fp32 gradient of a master and the update's temporaries
    (:func:`~lightning_grass.offload.state_bytes.step_workspace_bytes`). The store drops its references to a
    write-back's tensors as soon as the copy is queued.

    Two regimes, chosen at every step from the *active* parameters (those the next steps update):

    - **Keep**: their states fit in the budget together (always, without a budget). They stay resident
      between steps, and move only when the active set changes (:meth:`set_active` writes back the ones
      that leave). All of them are fetched when the step is entered, overlapping forward and backward.
    - **Stream**: they do not fit. Each is fetched just before its update and written back just after,
      while the next one is fetched: the next fetch overlaps the current update, and with room for three
      entries the write-back overlaps it too.

    A transfer that fails (a full or vanished disk tier's folder: :class:`~lightning_grass.errors.StorageError`)
    raises at the first wait for it, on the caller's thread, before anything reads the state it concerns: an
    entry leaves the store only after its transfer was waited for. :meth:`close` does not raise it again.

    Args:
        optimizer: The optimizer whose ``state`` holds resident states.
        params: The offloaded parameters, one per unit (a chunked parameter once per chunk); a unit is an index
            into this list.
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
        self._views: dict[int, Tensor] = {}
        self._units_of: dict[int, list[int]] = {}
        for unit, param in enumerate(self.params):
            self._units_of.setdefault(id(param), []).append(unit)
        self.tier = tier
        self.max_resident_bytes = max_resident_bytes
        self.overlap = overlap
        self.active: list[int] = list(range(len(self.params)))
        self._mastered = {id(p) for p in master_params}
        self._layouts: dict[int, _Layout] = {}
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._writes: deque[int] = deque()
        self._protected: set[int] = set()
        self._always_resident_bytes = 0
        self._expected: dict[int, int] = {}
        self._workspace: dict[int, int] = {}
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

    @property
    def resident_units(self) -> list[int]:
        """Units holding device memory now (fetching, resident or being written back), oldest use first."""
        return list(self._entries)

    def unit_bytes(self, unit: int) -> int:
        """Bytes ``unit``'s state takes on the device: as last seen, or as expected when it has none yet."""
        layout = self._layouts.get(unit)
        if layout is not None:
            return layout.nbytes
        if unit not in self._expected:
            param = self.params[unit]
            mastered = id(param) in self._mastered
            numel = chunk_numel(param, self.rows[unit])
            self._expected[unit] = expected_state_bytes(self.optimizer, param, mastered, numel)
        return self._expected[unit]

    def workspace_bytes(self, unit: int) -> int:
        """Bytes the optimizer's step over ``unit`` allocates on the device beside its state."""
        if unit not in self._workspace:
            param = self.params[unit]
            mastered = id(param) in self._mastered
            numel = chunk_numel(param, self.rows[unit])
            self._workspace[unit] = step_workspace_bytes(self.optimizer, param, mastered, numel)
        return self._workspace[unit]

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

    def keeps_resident(self) -> bool:
        """Whether the active units' states and step workspaces fit in the budget together (the keep regime)."""
        if self.max_resident_bytes is None:
            return True
        return sum(self.unit_bytes(u) + self.workspace_bytes(u) for u in self.active) <= self.max_resident_bytes

    def set_active(self, units: Sequence[int]) -> None:
        """The units the next steps update, in update order; resident units outside it are written back."""
        self.active = list(units)
        keep = set(units)
        for unit in [u for u, entry in self._entries.items() if u not in keep and entry.status != "writing"]:
            self._evict(unit)

    def prefetch_active(self) -> None:
        """Start fetching what the next step needs: every active unit when they stay resident, else the first ones.

        Streaming, as many of the first active units as :meth:`prefetch_ahead` can hold.
        """
        self._reap()
        if self.keeps_resident():
            for unit in self.active:
                self.prefetch(unit)
        else:
            self.prefetch_ahead(self.active)

    def prefetch_ahead(self, units: Sequence[int]) -> int:
        """Start fetching ``units``, the next ones to be updated in order, as deep as the budget allows.

        A unit is fetched only if the states of it and of every unit before it in ``units``, with the largest of
        their step workspaces, fit in the budget together: each of them can then be acquired in turn while the
        ones after it wait, resident. The first unit is always tried (:meth:`prefetch`).

        Args:
            units: Units in update order.

        Returns:
            How many of ``units`` the budget covered.
        """
        held = workspace = 0
        for count, unit in enumerate(units):
            held += self.unit_bytes(unit)
            workspace = max(workspace, self.workspace_bytes(unit))
            if count and self.max_resident_bytes is not None and held + workspace > self.max_resident_bytes:
                return count
            if not self._prefetch(unit, keep=set(units[: count + 1])):
                return count
        return len(units)

    def begin_step(self, plan: Sequence[int]) -> None:
        """The units this step updates, in order: none of them is evicted to make room before its update."""
        self._protected = set(plan)

    def end_step(self) -> None:
        """Free what the step fetched but did not use (stream regime), and entries whose write-back is done."""
        self._protected.clear()
        if not self.keeps_resident():
            for unit in [u for u, entry in self._entries.items() if entry.status != "writing"]:
                self._evict(unit)
        self._reap()

    def prefetch(self, unit: int) -> bool:
        """Start fetching ``unit``'s state if it has one in the tier and the budget has room.

        Waits for write-backs to finish, and writes back resident states that this step does not need, to
        make room; does nothing when only states the step still needs fill the budget.

        Returns:
            Whether ``unit`` needs no fetch any more: it is fetching or resident, has no state in the tier yet,
            or its fetch started now. ``False`` when the budget has no room, or transfers do not overlap.
        """
        return self._prefetch(unit, keep={unit})

    def _prefetch(self, unit: int, keep: set[int]) -> bool:
        """:meth:`prefetch`, making room without evicting the units in ``keep``."""
        if not self.overlap:
            return False
        entry = self._entries.get(unit)
        if entry is not None:
            return entry.status != "writing"
        layout = self._layouts.get(unit)
        if layout is None or not layout.tensors:
            return True
        if not self._make_room(layout.nbytes, exclude=keep):
            return False
        self._start_fetch(unit, layout)
        return True

    def acquire(self, unit: int) -> None:
        """Make ``unit``'s state resident in ``optimizer.state``, fetching it now if no prefetch did.

        Its step workspace is reserved until :meth:`release`.

        Raises:
            RuntimeError: If the budget cannot hold it next to the states this step still needs.
        """
        entry = self._entries.get(unit)
        if entry is not None and entry.status == "writing":
            self._wait(entry.transfer)
            self._drop(unit)
            entry = None
        needed = self.workspace_bytes(unit) + (self.unit_bytes(unit) if entry is None else 0)
        if not self._make_room(needed, exclude={unit}):
            raise RuntimeError(
                f"max_resident_bytes={self.max_resident_bytes} cannot hold the state and step workspace of "
                f"offloaded tensor {unit} ({self.unit_bytes(unit) + self.workspace_bytes(unit)} bytes) next to the "
                f"{len(self._entries)} this step still needs"
            )
        if entry is None:
            layout = self._layouts.get(unit)
            if layout is not None and layout.tensors:
                self._start_fetch(unit, layout)
            else:
                self._entries[unit] = _Entry([], Transfer(), self.unit_bytes(unit), "fetching")
            entry = self._entries[unit]
        entry.workspace = self.workspace_bytes(unit)
        if entry.status == "fetching":
            self._wait(entry.transfer)
            layout = self._layouts.get(unit)
            if layout is not None:
                self._install(unit, layout, entry.tensors)
            entry.status = "resident"
        self._entries.move_to_end(unit)
        self._note_residency()

    def release(self, unit: int, written: bool) -> None:
        """``unit``'s update is done: keep its state resident (keep regime, within budget) or write it back.

        Args:
            unit: A unit that was acquired.
            written: Whether the optimizer updated the state since :meth:`acquire`; an unchanged state whose
                backing copy is current is dropped without a write-back.
        """
        entry = self._entries[unit]
        entry.dirty = entry.dirty or written
        entry.workspace = 0
        entry.nbytes = sum(t.numel() * t.element_size() for t in self._state_tensors(unit))
        self._protected.discard(unit)
        within_budget = self.max_resident_bytes is None or self._entry_bytes() <= self.max_resident_bytes
        if self.keeps_resident() and within_budget and self.rows[unit] is None:
            self._note_residency()
        else:
            self._evict(unit)

    def flush(self) -> None:
        """Wait for every write-back in flight."""
        while self._finish_oldest_write(holding_only=False):
            pass

    def set_always_resident_bytes(self, nbytes: int) -> None:
        """Bytes of optimizer state outside any unit (always resident), counted in the residency stats."""
        self._always_resident_bytes = nbytes
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
            for unit in list(self._writes):
                entry = self._entries.get(unit)
                if entry is not None and entry.status == "writing":
                    try:
                        entry.transfer.wait()
                    except Exception as error:
                        if not self._failed:
                            log.warning("an optimizer-state write-back failed after training ended: %s", error)
                        self._failed = True
                self._drop(unit)
        finally:
            self.tier.close()

    def _start_fetch(self, unit: int, layout: _Layout) -> None:
        tensors, transfer = self.tier.read(unit, layout.specs())
        self._entries[unit] = _Entry(tensors, transfer, layout.nbytes, "fetching")
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
            self._wait(entry.transfer)
            self._drop(unit)
            return
        tensors, layout = self._collect(unit)
        if layout is None or (not entry.dirty and self._layouts.get(unit) == layout):
            self._drop(unit)
            return
        self._layouts[unit] = layout
        self._entries.pop(unit)
        transfer = self.tier.write(unit, tensors)
        del tensors  # the tier keeps what its copy still reads; the device memory goes back when it is done
        self._entries[unit] = _Entry([], transfer, layout.nbytes, "writing")
        self._writes.append(unit)
        self.stats["bytes_to_backing"] += layout.nbytes
        self.stats["backing_bytes"] = self.tier.backing_bytes()
        if not self.overlap:
            self._wait(transfer)
            self._drop(unit)
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

    def _make_room(self, nbytes: int, exclude: set[int]) -> bool:
        """Finish write-backs, then write back idle resident states, until ``nbytes`` more fit in the budget."""
        if self.max_resident_bytes is None:
            return True
        self._reap()  # write-backs that are done, failed ones included, are waited for in the order they began
        while self._entry_bytes() + nbytes > self.max_resident_bytes:
            if self._finish_oldest_write(holding_only=True):
                continue
            idle = [
                u
                for u, entry in self._entries.items()
                if entry.status in ("resident", "fetching") and u not in exclude and u not in self._protected
            ]
            if not idle:
                return False
            self._evict(idle[0])
        return True

    def _finish_oldest_write(self, holding_only: bool) -> bool:
        """Wait for the oldest write-back (the oldest still holding device memory, if ``holding_only``)."""
        for unit in list(self._writes):
            entry = self._entries.get(unit)
            if entry is None or entry.status != "writing":
                self._writes.remove(unit)
                continue
            if holding_only and not entry.held_bytes():
                continue
            self._wait(entry.transfer)
            self._drop(unit)
            return True
        return False

    def _reap(self) -> None:
        """Free the entries whose write-back has finished, without waiting."""
        for unit in [u for u, e in self._entries.items() if e.status == "writing" and e.transfer.done()]:
            self._wait(self._entries[unit].transfer)
            self._drop(unit)

    def _drop(self, unit: int) -> None:
        self._entries.pop(unit, None)
        if unit in self._writes:
            self._writes.remove(unit)
        self._note_residency()

    def _wait(self, transfer: Transfer) -> None:
        """Wait for ``transfer``, timing the wait; note that a transfer failed before its error propagates."""
        start = None if transfer.done() else time.perf_counter()
        try:
            transfer.wait()
        except Exception:
            self._failed = True
            raise
        if start is not None:
            self.stats["host_wait_seconds"] += time.perf_counter() - start

    def _entry_bytes(self) -> int:
        return sum(entry.held_bytes() for entry in self._entries.values())

    def _note_residency(self) -> None:
        nbytes = self._always_resident_bytes + self._entry_bytes()
        tensors = sum(1 for entry in self._entries.values() if entry.held_bytes())
        stats = self.stats
        stats["resident_bytes"] = nbytes
        stats["resident_tensors"] = tensors
        stats["peak_resident_bytes"] = max(stats["peak_resident_bytes"], nbytes)
        stats["peak_resident_tensors"] = max(stats["peak_resident_tensors"], tensors)
