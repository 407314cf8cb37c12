"""The cost of an offloaded step grows linearly with the tensors stepped: counted calls, not timings."""

import inspect
from collections import Counter

import pytest
import torch

from lightning_grass.offload import HostTier, OffloadedOptimizer, TensorStateStore, device_bytes_while_stepped
from lightning_grass.offload import plan as plan_module
from lightning_grass.offload import tensor_state_store as store_module


def count_calls(monkeypatch, counts):
    """Count every call of the store's, its entries' and the lookahead's methods, by name."""
    for cls in (TensorStateStore, store_module._Entry, plan_module.Lookahead):
        for name, function in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("__"):
                continue

            def counted(*args, _function=function, _name=f"{cls.__name__}.{name}", **kwargs):
                counts[_name] += 1
                return _function(*args, **kwargs)

            monkeypatch.setattr(cls, name, counted)


def steady_step_cost(monkeypatch, tensors, budget_tensors):
    """Calls the store makes, and parameter slots the optimizer sees, in the second step over ``tensors`` tensors.

    ``budget_tensors`` is the budget in tensors stepped (``None``: no budget, every state stays resident).
    """
    params = [torch.nn.Parameter(torch.full((4,), float(i))) for i in range(tensors)]
    inner = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    stepped = device_bytes_while_stepped(inner, params[0], False)
    budget = None if budget_tensors is None else budget_tensors * stepped
    store = TensorStateStore(inner, params, HostTier(torch.device("cpu"), [36] * tensors), budget)
    offloaded = OffloadedOptimizer(inner, store)
    for p in params:
        p.grad = torch.ones(4)
    offloaded.prefetch()
    offloaded.step()  # creates every state: the steady step is the next one
    slots = []
    original = inner.step

    def watched_step(*args, **kwargs):
        slots.append(sum(len(group["params"]) for group in inner.param_groups))
        return original(*args, **kwargs)

    inner.step = watched_step
    counts = Counter()
    with monkeypatch.context() as patch:
        count_calls(patch, counts)
        offloaded.prefetch()
        offloaded.step()
    store.close()
    return counts, slots


@pytest.mark.parametrize("budget_tensors", [8, None], ids=["streamed", "kept"])
def test_the_store_bookkeeping_of_a_step_grows_linearly_with_its_tensors(monkeypatch, budget_tensors):
    small, small_slots = steady_step_cost(monkeypatch, 500, budget_tensors)
    large, large_slots = steady_step_cost(monkeypatch, 2000, budget_tensors)
    # Each tensor is given to the optimizer once per step: the groups are narrowed to the tensors of each update
    # and never rebuilt from every parameter.
    assert sum(small_slots) == 500 and sum(large_slots) == 2000
    assert len(large_slots) == (2000 if budget_tensors else 1), "streamed one by one, or kept and stepped together"
    # Four times the tensors, four times the calls, up to a constant per step (a quadratic path would be 16x).
    assert set(large) == set(small)
    for name in small:
        assert large[name] <= 4 * small[name] + 8, (name, small[name], large[name])
    assert sum(large.values()) > 3.9 * sum(small.values()), "the counts measure the per-tensor work"
