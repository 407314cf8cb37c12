"""``LayerwiseOptimizer``: steps a user's optimizer one layer group at a time, with states offloaded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_grass.offload.layer_state_store import LayerStateStore

_SCALER_ATTRIBUTES = ("grad_scale", "found_inf")


class LayerwiseOptimizer(Optimizer):
    """Wraps an optimizer so that its step runs group by group, each group's states fetched just in time.

    ``step()`` first updates the parameters outside every group (their states stay resident), then every
    group that has a gradient, in ``order``: while group ``i`` is updated, group ``i + 1`` is being fetched
    and group ``i - 1`` written back (within the store's residency slots). Each group is updated by the
    wrapped optimizer itself, with its ``param_groups`` narrowed to that group's parameters for the call.
    Adam, AdamW (for-loop, foreach and fused) and SGD update each parameter from its own gradient and state
    alone, so the result is bit-identical to one step over all parameters.

    ``param_groups``, ``defaults`` and ``state`` are the wrapped optimizer's, so LR schedulers built on the
    wrapped optimizer keep working. ``state_dict()`` returns the full state, offloaded groups included (as
    CPU tensors); ``load_state_dict()`` writes offloaded groups straight into the backing tier.

    Args:
        optimizer: The optimizer from ``configure_optimizers``, built over all parameters.
        store: The per-group state store.
    """

    def __init__(self, optimizer: Optimizer, store: LayerStateStore) -> None:
        self.optimizer = optimizer
        self.store = store
        self.order: list[int] = list(range(len(store.groups)))
        self._group_of = {id(p): g for g, params in enumerate(store.groups) for p in params}
        self._narrowed = [self._narrow([id(p) for p in params]) for params in store.groups]
        managed = set(self._group_of)
        self._unmanaged = self._narrow(
            [id(p) for g in optimizer.param_groups for p in g["params"] if id(p) not in managed]
        )
        self._has_unmanaged = any(self._unmanaged)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's parameter groups."""
        return self.optimizer.param_groups

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's defaults."""
        return self.optimizer.defaults

    @property
    def state(self) -> dict[nn.Parameter, dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's state: resident states only."""
        return self.optimizer.state

    @property
    def _step_supports_amp_scaling(self) -> bool:
        return getattr(self.optimizer, "_step_supports_amp_scaling", False)

    def set_order(self, groups: Sequence[int]) -> None:
        """The groups expected to be updated next, in update order; :meth:`prefetch_first` fetches the first."""
        self.order = list(groups)

    def prefetch_first(self) -> None:
        """Start fetching the first group of :meth:`set_order`, so the copy overlaps forward and backward."""
        if self.order:
            self.store.prefetch(self.order[0])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients through the wrapped optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the closure (if any), then update the unmanaged parameters and each group with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for name in _SCALER_ATTRIBUTES:
            if hasattr(self, name):
                setattr(self.optimizer, name, getattr(self, name))
        try:
            if self._has_unmanaged:
                self._step_narrowed(self._unmanaged)
            plan = self._plan()
            for position, group in enumerate(plan):
                self.store.acquire(group)
                if position + 1 < len(plan):
                    self.store.prefetch(plan[position + 1])
                self._step_narrowed(self._narrowed[group])
                self.store.release(group, written=True)
            self.store.discard_unused()
        finally:
            for name in _SCALER_ATTRIBUTES:
                if hasattr(self.optimizer, name):
                    delattr(self.optimizer, name)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` with every offloaded group's states added, on the CPU."""
        state_dict = self.optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for param, state in self.store.backed_state().items():
            state_dict["state"][index[id(param)]] = state
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load resident states into the wrapped optimizer and offloaded groups' states into the backing tier."""
        params = [p for g in self.param_groups for p in g["params"]]
        states = dict(state_dict["state"])
        per_group: list[list[dict[str, Any] | None]] = [[None] * len(group) for group in self.store.groups]
        for index in list(states):
            group = self._group_of.get(id(params[index]))
            if group is not None:
                position = next(i for i, p in enumerate(self.store.groups[group]) if p is params[index])
                per_group[group][position] = states.pop(index)
        self.optimizer.load_state_dict({**state_dict, "state": states})
        for group, group_states in enumerate(per_group):
            self.store.load_backed_state(group, group_states)

    def _plan(self) -> list[int]:
        with_grad = {g for g, params in enumerate(self.store.groups) if any(p.grad is not None for p in params)}
        planned = [g for g in self.order if g in with_grad]
        return planned + sorted(with_grad - set(planned))

    def _narrow(self, keep: list[int]) -> list[list[nn.Parameter]]:
        wanted = set(keep)
        return [[p for p in group["params"] if id(p) in wanted] for group in self.optimizer.param_groups]

    def _step_narrowed(self, narrowed: list[list[nn.Parameter]]) -> None:
        groups = self.optimizer.param_groups
        full = [group["params"] for group in groups]
        try:
            for group, params in zip(groups, narrowed, strict=True):
                group["params"] = params
            self.optimizer.step()
        finally:
            for group, params in zip(groups, full, strict=True):
                group["params"] = params

    def __repr__(self) -> str:
        return f"LayerwiseOptimizer({self.optimizer!r}, groups={len(self.store.groups)})"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("LayerwiseOptimizer holds live transfers and cannot be pickled; save its state_dict()")
