"""``OffloadedOptimizer``: steps a user's optimizer on fp32 masters, with offloaded states fetched just in time."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim import optimizer as torch_optimizer

from lightning_grass.errors import SettingValueError
from lightning_grass.offload.master_weights import enter_master, leave_master, needs_master
from lightning_grass.offload.sharded_tensors import local_numel
from lightning_grass.offload.tensor_state_store import TensorStateStore

_SCALER_ATTRIBUTES = ("grad_scale", "found_inf")


class OffloadedOptimizer(Optimizer):
    """Wraps an optimizer: half-precision parameters step on fp32 masters, offloaded states come just in time.

    ``step()`` first updates the parameters the store does not hold (their states stay resident), then hands the
    store's units that have a gradient, the active ones first, to :meth:`TensorStateStore.step`, which decides once
    whether they are updated together (their states fit in the budget) or streamed one at a time, the next ones
    fetched while the current one is updated.

    Every update is a call of the wrapped optimizer's own ``step()``, with its ``param_groups`` narrowed to the
    parameters of the call, and each half-precision parameter replaced by its fp32 master
    (:mod:`~lightning_grass.offload.master_weights`). Adam, AdamW (for-loop, foreach and fused) and SGD update
    each parameter from its own gradient and state alone, so the result is bit-identical to one plain step
    over all parameters (over their fp32 masters, for half-precision ones).

    It stands in for the wrapped optimizer wherever Lightning and its callbacks use one:

    - ``param_groups`` (read and assigned), ``defaults``, ``state``, ``add_param_group()`` and ``zero_grad()``
      are the wrapped optimizer's, so LR schedulers built on it and ``BaseFinetuning`` keep working. A
      parameter added later (``add_param_group()``, or ``param_groups`` assigned) is stepped like the others,
      on an fp32 master when it is half precision and masters are in use. The store's units are fixed when it
      is built, so such a parameter's state stays resident (it counts in :meth:`unmanaged_state_bytes`).
    - Step hooks fire once per ``step()``: the global ones and this wrapper's (torch's own ``Optimizer``
      machinery) around it, and the wrapped optimizer's inside it, before and after all of its updates. The
      updates are calls of the wrapped optimizer's ``step()`` (so an LR scheduler sees it stepped), during
      which its step hooks and the global ones are muted (a closure that the wrapped optimizer evaluates runs
      then too): a thread that steps another optimizer meanwhile runs without the global hooks.
    - An optimizer whose ``step()`` requires a closure (``torch.optim.LBFGS``) re-evaluates the model and
      updates every parameter in one call: it gets the closure and one call over all parameters, on their
      masters. Before each evaluation the masters are rounded into the weights, and after it the weights'
      gradients are given to the masters in fp32. Its states cannot be offloaded per tensor, so such an
      optimizer is refused with a store (:func:`check_offloadable`).

    ``state_dict()`` returns the full state, offloaded states included (as CPU tensors); ``load_state_dict()``
    writes offloaded states straight into the backing tier.

    Args:
        optimizer: The optimizer from ``configure_optimizers``, built over all parameters.
        store: The offloaded parameters' state store; ``None`` when nothing is offloaded.
        master_params: Half-precision parameters to step on fp32 masters.

    Raises:
        SettingValueError: If ``store`` is given and ``optimizer.step()`` requires a closure.
    """

    def __init__(
        self, optimizer: Optimizer, store: TensorStateStore | None = None, master_params: Iterable[nn.Parameter] = ()
    ) -> None:
        if store is not None:
            check_offloadable(optimizer)
        self._inner = optimizer
        self.store = store
        self._mastered = {id(p) for p in master_params}
        self._initial = {id(p) for p in self._params()}
        self._stored = {id(p) for p in store.params} if store is not None else set()
        self._requires_closure = _requires_closure(optimizer)
        # What torch's Optimizer.__init__ sets up for step hooks: this class's step() runs the global hooks and
        # these ones around it (Optimizer.profile_hook_step).
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._patch_step_function()

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's parameter groups; assigning them assigns the wrapped optimizer's."""
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self._inner.param_groups = groups

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's defaults."""
        return self._inner.defaults

    @property
    def state(self) -> dict[nn.Parameter, dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's state: resident states only."""
        return self._inner.state

    @property
    def _step_supports_amp_scaling(self) -> bool:
        return getattr(self._inner, "_step_supports_amp_scaling", False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer; its parameters are stepped from the next step on.

        Args:
            param_group: The group, as for :meth:`torch.optim.Optimizer.add_param_group`.
        """
        self._inner.add_param_group(param_group)

    def set_active(self, units: Sequence[int]) -> None:
        """The store's units the next steps update, in update order; the others' states leave the device."""
        if self.store is not None:
            self.store.set_active(units)

    def prefetch(self) -> None:
        """Start fetching what the next step updates first, so the copies overlap forward and backward."""
        if self.store is not None:
            self.store.prefetch_active()

    @property
    def offload_stats(self) -> dict[str, float]:
        """The store's residency and transfer counters (live), or an empty dict without a store."""
        return self.store.stats if self.store is not None else {}

    def close(self) -> None:
        """Free the store's backing tier after its write-backs (nothing without a store); a second call does nothing."""
        if self.store is not None:
            self.store.close()

    def count_unmanaged_states(self) -> None:
        """Count the resident states of the parameters the store does not hold in :attr:`offload_stats`.

        Their bytes (masters included; local shards) join ``resident_bytes`` and its peak from now on, as they
        stand after the last step.
        """
        if self.store is not None:
            self.store.set_unmanaged_state_bytes(self.unmanaged_state_bytes())

    def offloaded_params(self) -> list[nn.Parameter]:
        """The parameters whose states the store holds (once each, chunked ones included); none without a store."""
        return [] if self.store is None else list({id(p): p for p in self.store.params}.values())

    def unmanaged_state_bytes(self) -> int:
        """Bytes of the resident state of the parameters the store does not hold (masters included; local shards)."""
        state = self._inner.state
        return sum(
            local_numel(value) * value.element_size()
            for p in self._unmanaged()
            for value in state.get(p, {}).values()
            if isinstance(value, Tensor)
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients through the wrapped optimizer."""
        self._inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter with a gradient, firing the wrapped optimizer's step hooks once around it all.

        The closure is passed to an optimizer whose ``step()`` requires one; for the others it is run first.

        Args:
            closure: Re-evaluates the model and returns the loss, as for :meth:`torch.optim.Optimizer.step`.

        Returns:
            The closure's loss, or ``None`` without a closure.
        """
        inner = self._inner
        pre_hooks = list(getattr(inner, "_optimizer_step_pre_hooks", {}).values())
        post_hooks = list(getattr(inner, "_optimizer_step_post_hooks", {}).values())
        args, kwargs = (inner,), ({} if closure is None else {"closure": closure})
        for hook in pre_hooks:
            result = hook(inner, args, kwargs)
            if result is not None:
                args, kwargs = result
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        for name in _SCALER_ATTRIBUTES:
            if hasattr(self, name):
                setattr(inner, name, getattr(self, name))
        try:
            loss = self._update(closure)
        finally:
            for name in _SCALER_ATTRIBUTES:
                if hasattr(inner, name):
                    delattr(inner, name)
        for hook in post_hooks:
            hook(inner, args, kwargs)
        return loss

    def _update(self, closure: Callable[[], Any] | None) -> Any:
        """One call that evaluates the closure, or the closure then the resident and the offloaded updates."""
        if self._requires_closure:
            with _hooks_muted(self._inner):
                return self._step_with_closure(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with _hooks_muted(self._inner):
            narrowing = _Narrowing(self._inner.param_groups)
            self._step_params(narrowing, [p for p in self._unmanaged() if p.grad is not None])
            if self.store is not None:
                self._step_offloaded(self.store, narrowing)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` with every offloaded state added, on the CPU."""
        state_dict = self._inner.state_dict()
        if self.store is not None:
            index = {id(p): i for i, p in enumerate(self._params())}
            for param, state in self.store.backed_state().items():
                state_dict["state"][index[id(param)]] = state
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load resident states into the wrapped optimizer and offloaded ones into the backing tier.

        torch casts floating state to its parameter's dtype when it loads; the state of a parameter with an
        fp32 master is put back in float32 afterwards, as it was saved (lists of tensors, such as LBFGS's
        history, included).

        Args:
            state_dict: A state from :meth:`state_dict` (or the wrapped optimizer's), for the same parameters.
        """
        params = self._params()
        states = dict(state_dict["state"])
        offloaded = {index: states.pop(index) for index in list(states) if id(params[index]) in self._stored}
        self._inner.load_state_dict({**state_dict, "state": states})
        for index, saved in states.items():
            param = params[index]
            if self.is_mastered(param):
                state = self._inner.state[param]
                for key, value in saved.items():
                    if key != "step":
                        state[key] = _fp32_on(value, param.device)
        if self.store is not None:
            for index, state in offloaded.items():
                self.store.load_backed_state(params[index], state)

    def _params(self) -> list[nn.Parameter]:
        return [p for group in self._inner.param_groups for p in group["params"]]

    def _unmanaged(self) -> list[nn.Parameter]:
        """The parameters the store does not hold, those added since it was built included."""
        return [p for p in self._params() if id(p) not in self._stored]

    def is_mastered(self, param: nn.Parameter) -> bool:
        """Whether ``param`` steps on an fp32 master: as given, or, added later, if half and masters are in use.

        Args:
            param: A parameter of the wrapped optimizer.
        """
        if id(param) in self._initial:
            return id(param) in self._mastered
        return bool(self._mastered) and needs_master(param)

    def _step_offloaded(self, store: TensorStateStore, narrowing: _Narrowing) -> None:
        """Update the store's units that have a gradient: the active ones in order, then any other."""
        params = store.params
        active = [unit for unit in store.active if params[unit].grad is not None]
        listed = set(active)
        others = [unit for unit, p in enumerate(params) if p.grad is not None and unit not in listed]

        def update(units: list[int]) -> None:
            rows = store.rows[units[0]]
            if rows is None:
                self._step_params(narrowing, [params[unit] for unit in units])
                return
            param = params[units[0]]
            view = store.key(units[0])
            view.grad = param.grad.detach()[rows[0] : rows[1]]
            try:
                self._step_params(narrowing, [param], {id(param): view})
            finally:
                view.grad = None

        store.step(active + others, update)

    def _step_params(
        self, narrowing: _Narrowing, params: list[nn.Parameter], stepped: Mapping[int, Tensor] | None = None
    ) -> None:
        """One step of the wrapped optimizer over ``params`` only, half-precision ones on their fp32 masters.

        ``stepped`` gives, by ``id``, a tensor stepped in a parameter's place (a view of a chunk of its rows).
        """
        if not params:
            return
        stepped = dict(stepped or {})
        masters = {id(p): enter_master(self._inner, stepped.get(id(p), p)) for p in params if self.is_mastered(p)}
        try:
            narrowing.narrow(params, [masters.get(id(p), stepped.get(id(p), p)) for p in params])
            try:
                self._inner.step()
            finally:
                narrowing.restore()
        finally:
            for p in params:
                if id(p) in masters:
                    leave_master(self._inner, stepped.get(id(p), p), masters[id(p)])

    def _step_with_closure(self, closure: Callable[[], Any] | None) -> Any:
        """One step of an optimizer that re-evaluates the model through ``closure``, over every parameter.

        The groups hold the masters while the optimizer works, and the parameters while the closure runs, so
        that what the closure does to the optimizer's parameters (Lightning clips their gradients) reaches them.
        """
        params = self._params()
        masters = {id(p): self._enter_before_closure(p) for p in params if self.is_mastered(p)}
        pairs = [(p, masters[id(p)]) for p in params if id(p) in masters]
        groups = self._inner.param_groups
        plain = [list(group["params"]) for group in groups]
        mastered = [[masters.get(id(p), p) for p in group_params] for group_params in plain]

        def evaluate() -> Any:
            _fill(groups, plain)
            with torch.no_grad():
                for param, master in pairs:
                    param.copy_(master)
            try:
                loss = closure()
            finally:
                _fill(groups, mastered)
            for param, master in pairs:
                master.grad = None if param.grad is None else param.grad.to(torch.float32)
            return loss

        try:
            _fill(groups, mastered)
            return self._inner.step(evaluate if pairs and closure is not None else closure)
        finally:
            _fill(groups, plain)
            for param, master in pairs:
                leave_master(self._inner, param, master)

    def _enter_before_closure(self, param: nn.Parameter) -> Tensor:
        """:func:`enter_master` before the closure has run, when ``param`` may have no gradient yet."""
        if param.grad is not None:
            return enter_master(self._inner, param)
        param.grad = torch.zeros_like(param)
        master = enter_master(self._inner, param)
        param.grad = master.grad = None
        return master

    def __repr__(self) -> str:
        # Named after the class: inside Lightning's LightningOptimizer, which subclasses this class, it reads
        # LightningOffloadedOptimizer(AdamW (...), ...), as a plain optimizer reads LightningAdamW (...).
        stored = 0 if self.store is None else len(self.store.params)
        masters = sum(self.is_mastered(p) for p in self._params())
        return f"{type(self).__name__}({self._inner!r}, offloaded={stored}, masters={masters})"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("OffloadedOptimizer holds live transfers and cannot be pickled; save its state_dict()")


class _Narrowing:
    """The wrapped optimizer's groups narrowed to the parameters of one update, and whole again after it.

    Each group's list is replaced, not refilled, so narrowing costs time in the parameters of the update and the
    number of groups, not in every parameter the optimizer holds.
    """

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self._groups = groups
        self._full = [group["params"] for group in groups]
        self._group_of = {id(p): index for index, params in enumerate(self._full) for p in params}

    def narrow(self, params: list[nn.Parameter], tensors: list[Tensor]) -> None:
        """Each group holds only the ``tensors`` standing in for its ``params``, in their order."""
        narrowed: list[list[Tensor]] = [[] for _ in self._groups]
        for param, tensor in zip(params, tensors, strict=True):
            narrowed[self._group_of[id(param)]].append(tensor)
        for group, group_params in zip(self._groups, narrowed, strict=True):
            group["params"] = group_params

    def restore(self) -> None:
        """Every group holds its own list of parameters again."""
        for group, full in zip(self._groups, self._full, strict=True):
            group["params"] = full


def check_offloadable(optimizer: Optimizer) -> None:
    """Refuse to offload the states of an optimizer whose ``step()`` requires a closure.

    Such an optimizer (``torch.optim.LBFGS``) re-evaluates the model and updates every parameter in one call,
    so its parameters cannot be stepped one tensor at a time with their states brought in turn.

    Args:
        optimizer: The optimizer whose states would be offloaded.

    Raises:
        SettingValueError: If ``optimizer.step()`` requires a closure.
    """
    if _requires_closure(optimizer):
        name = type(optimizer).__name__
        raise SettingValueError(
            f"the optimizer states of {name} cannot be offloaded: {name}.step() requires a closure, re-evaluates "
            "the model and updates every parameter in one call, so its parameters cannot be stepped one tensor at "
            "a time. Pass offload='none' to the strategy (offload='auto' offloads on CUDA), or use an optimizer "
            "that updates each parameter from its own gradient and state, such as AdamW or SGD"
        )


def _requires_closure(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step()`` has a ``closure`` argument without a default, as ``LBFGS.step()`` has."""
    closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


@contextmanager
def _hooks_muted(optimizer: Optimizer) -> Iterator[None]:
    """Empty ``optimizer``'s step hooks and torch's global ones for a while; the same dicts are refilled after.

    torch's ``Optimizer.profile_hook_step`` runs them at every call of ``optimizer.step()``; the wrapper calls it
    once per update and fires them once around all of them instead.
    """
    hooks = [
        getattr(optimizer, "_optimizer_step_pre_hooks", {}),
        getattr(optimizer, "_optimizer_step_post_hooks", {}),
        torch_optimizer._global_optimizer_pre_hooks,
        torch_optimizer._global_optimizer_post_hooks,
    ]
    saved = [list(registered.items()) for registered in hooks]
    for registered in hooks:
        registered.clear()
    try:
        yield
    finally:
        for registered, items in zip(hooks, saved, strict=True):
            registered.update(items)


def _fill(groups: list[dict[str, Any]], params: list[list[Tensor]]) -> None:
    """Set each group's parameters, in its own list: LBFGS keeps a reference to its group's list."""
    for group, group_params in zip(groups, params, strict=True):
        group["params"][:] = group_params


def _fp32_on(value: Any, device: torch.device) -> Any:
    """A saved state value on ``device``, floating tensors in float32 (inside lists and tuples too)."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=torch.float32 if value.is_floating_point() else value.dtype, copy=True)
    if isinstance(value, list | tuple):
        return type(value)(_fp32_on(item, device) for item in value)
    return value
