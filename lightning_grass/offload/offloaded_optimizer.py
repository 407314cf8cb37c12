"""``OffloadedOptimizer``: steps a user's optimizer on fp32 masters, with offloaded states fetched just in time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_grass.offload.master_weights import enter_master, leave_master
from lightning_grass.offload.tensor_state_store import TensorStateStore

_SCALER_ATTRIBUTES = ("grad_scale", "found_inf")


class OffloadedOptimizer(Optimizer):
    """Wraps an optimizer: half-precision parameters step on fp32 masters, offloaded states come just in time.

    ``step()`` first updates the parameters the store does not hold (their states stay resident), then the
    store's parameters that have a gradient, in the store's active order. When their states fit in the budget
    together they are acquired and updated in one call; otherwise one tensor at a time, the next one being
    fetched while the current one is updated (:class:`~lightning_grass.offload.TensorStateStore`).

    Every update is the wrapped optimizer's own ``step()``, with its ``param_groups`` narrowed to the
    parameters of the call, and each half-precision parameter replaced by its fp32 master
    (:mod:`~lightning_grass.offload.master_weights`). Adam, AdamW (for-loop, foreach and fused) and SGD update
    each parameter from its own gradient and state alone, so the result is bit-identical to one plain step
    over all parameters (over their fp32 masters, for half-precision ones).

    ``param_groups``, ``defaults`` and ``state`` are the wrapped optimizer's, so LR schedulers built on it keep
    working. ``state_dict()`` returns the full state, offloaded states included (as CPU tensors);
    ``load_state_dict()`` writes offloaded states straight into the backing tier.

    Args:
        optimizer: The optimizer from ``configure_optimizers``, built over all parameters.
        store: The offloaded parameters' state store; ``None`` when nothing is offloaded.
        master_params: Half-precision parameters to step on fp32 masters.
    """

    def __init__(
        self, optimizer: Optimizer, store: TensorStateStore | None = None, master_params: Iterable[nn.Parameter] = ()
    ) -> None:
        self.optimizer = optimizer
        self.store = store
        self._mastered = {id(p) for p in master_params}
        self._unit_of = {id(p): unit for unit, p in enumerate(store.params)} if store is not None else {}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._unmanaged = [p for p in params if id(p) not in self._unit_of]

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

    def set_order(self, units: Sequence[int]) -> None:
        """The store's units the next steps update, in update order; the others' states leave the device."""
        if self.store is not None:
            self.store.set_active(units)

    def prefetch(self) -> None:
        """Start fetching what the next step updates first, so the copies overlap forward and backward."""
        if self.store is not None:
            self.store.prefetch_active()

    def unmanaged_state_bytes(self) -> int:
        """Bytes of the resident state of the parameters the store does not hold (masters included)."""
        state = self.optimizer.state
        return sum(
            value.numel() * value.element_size()
            for p in self._unmanaged
            for value in state.get(p, {}).values()
            if isinstance(value, Tensor)
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients through the wrapped optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the closure (if any), then update the resident parameters and each offloaded one with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for name in _SCALER_ATTRIBUTES:
            if hasattr(self, name):
                setattr(self.optimizer, name, getattr(self, name))
        try:
            self._step_params([p for p in self._unmanaged if p.grad is not None])
            if self.store is not None:
                self._step_offloaded(self.store)
        finally:
            for name in _SCALER_ATTRIBUTES:
                if hasattr(self.optimizer, name):
                    delattr(self.optimizer, name)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` with every offloaded state added, on the CPU."""
        state_dict = self.optimizer.state_dict()
        if self.store is not None:
            index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            for param, state in self.store.backed_state().items():
                state_dict["state"][index[id(param)]] = state
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load resident states into the wrapped optimizer and offloaded ones into the backing tier.

        torch casts floating state to its parameter's dtype when it loads; the state of a parameter with an
        fp32 master is put back in float32 afterwards, as it was saved.
        """
        params = [p for g in self.param_groups for p in g["params"]]
        states = dict(state_dict["state"])
        offloaded = {index: states.pop(index) for index in list(states) if id(params[index]) in self._unit_of}
        self.optimizer.load_state_dict({**state_dict, "state": states})
        for index, saved in states.items():
            param = params[index]
            if id(param) in self._mastered:
                state = self.optimizer.state[param]
                for key, value in saved.items():
                    if isinstance(value, Tensor) and value.is_floating_point() and key != "step":
                        state[key] = value.to(device=param.device, dtype=torch.float32, copy=True)
        if self.store is not None:
            for index, state in offloaded.items():
                self.store.load_backed_state(self._unit_of[id(params[index])], state)

    def _step_offloaded(self, store: TensorStateStore) -> None:
        with_grad = {u for u, p in enumerate(store.params) if p.grad is not None}
        plan = [u for u in store.active if u in with_grad]
        plan += sorted(with_grad - set(plan))
        store.begin_step(plan)
        if store.keeps_resident() and len(plan) == len(set(plan) & set(store.active)):
            for unit in plan:
                store.acquire(unit)
            self._step_params([store.params[u] for u in plan])
            for unit in plan:
                store.release(unit, written=True)
        else:
            for position, unit in enumerate(plan):
                store.acquire(unit)
                if position + 1 < len(plan):
                    store.prefetch(plan[position + 1])
                self._step_params([store.params[unit]])
                store.release(unit, written=True)
        store.end_step()

    def _step_params(self, params: list[nn.Parameter]) -> None:
        """One step of the wrapped optimizer over ``params`` only, half-precision ones on their fp32 masters."""
        if not params:
            return
        masters = {id(p): enter_master(self.optimizer, p) for p in params if id(p) in self._mastered}
        wanted = {id(p) for p in params}
        groups = self.optimizer.param_groups
        full = [group["params"] for group in groups]
        try:
            for group, group_params in zip(groups, full, strict=True):
                group["params"] = [masters.get(id(p), p) for p in group_params if id(p) in wanted]
            self.optimizer.step()
        finally:
            for group, group_params in zip(groups, full, strict=True):
                group["params"] = group_params
            for p in params:
                if id(p) in masters:
                    leave_master(self.optimizer, p, masters[id(p)])

    def __repr__(self) -> str:
        stored = 0 if self.store is None else len(self.store.params)
        return f"OffloadedOptimizer({self.optimizer!r}, offloaded={stored}, masters={len(self._mastered)})"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("OffloadedOptimizer holds live transfers and cannot be pickled; save its state_dict()")
