"""The offloaded, per-tensor optimizer step against the plain optimizer, without a Trainer."""

import copy

import pytest
import torch
from conftest import VOCAB, tiny_llama_config
from layer_windows import layer_params, train, units_of
from transformers import LlamaForCausalLM

from lightning_grass.offload import (
    MASTER_KEY,
    DiskTier,
    HostTier,
    OffloadedOptimizer,
    TensorStateStore,
    device_bytes_while_stepped,
)

# Active layers per step: several resamples, layers leaving and coming back.
SCHEDULE = [[0, 1], [1, 3], [2], [0, 3], [3, 2], [1, 0], [0, 1], [2, 3]]
OPTIMIZERS = {
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw_for_loop": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.01),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1),
}


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(4))


def make_tier(kind, tmp_path):
    return DiskTier(tmp_path) if kind == "disk" else HostTier(torch.device("cpu"))


def wrap(model, optimizer, kind, tmp_path, max_resident_bytes=None, masters=(), overlap=True):
    store = TensorStateStore(
        optimizer, layer_params(model), make_tier(kind, tmp_path), max_resident_bytes, masters, overlap
    )
    return OffloadedOptimizer(optimizer, store, masters)


def largest_stepped_bytes(model, optimizer, masters=()):
    """What the budget must hold for the largest layer tensor while it is stepped (state and step workspace)."""
    mastered = {id(p) for p in masters}
    return max(device_bytes_while_stepped(optimizer, p, id(p) in mastered) for p in layer_params(model))


def assert_same_state(expected, actual):
    assert expected["param_groups"] == actual["param_groups"]
    assert expected["state"].keys() == actual["state"].keys()
    for index, state in expected["state"].items():
        assert state.keys() == actual["state"][index].keys()
        for key, value in state.items():
            assert torch.equal(value, actual["state"][index][key]), (index, key)


def assert_same_weights(expected, actual):
    for (name, p), q in zip(expected.named_parameters(), actual.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("budget", ["none", "two-tensors"], ids=["keep", "stream"])
@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_offloaded_step_is_bit_identical(base_model, tmp_path, name, tier, budget):
    reference, model = copy.deepcopy(base_model), copy.deepcopy(base_model)
    plain = OPTIMIZERS[name](reference.parameters())
    inner = OPTIMIZERS[name](model.parameters())
    max_resident = None if budget == "none" else 2 * largest_stepped_bytes(model, inner)
    offloaded = wrap(model, inner, tier, tmp_path, max_resident)
    train(reference, plain, SCHEDULE)
    train(model, offloaded, SCHEDULE)

    assert_same_weights(reference, model)
    assert_same_state(plain.state_dict(), offloaded.state_dict())
    stats = offloaded.store.stats
    assert stats["bytes_to_device"] > 0 and stats["bytes_to_backing"] > 0
    resident = {p for p in layer_params(model) if p in offloaded.state}
    if budget == "none":
        active = {p for unit in units_of(model, SCHEDULE[-1]) for p in [layer_params(model)[unit]]}
        assert resident == active, "the last window's layers stay resident, every other layer is offloaded"
    else:
        assert not resident, "streaming writes every tensor back after its update"


def watch_entry_bytes(store):
    """The store's resident bytes after each of its calls, and during each update (its peak: a unit stepped while
    the next ones are fetched)."""
    seen = []
    watched = [(store, "set_active"), (store, "prefetch_active"), (store, "step"), (store.optimizer, "step")]
    for owner, method in watched:
        original = getattr(owner, method)

        def watched(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            seen.append(store.stats["resident_bytes"])
            return result

        setattr(owner, method, watched)
    return seen


@pytest.mark.parametrize("tensors", [1, 2, 3])
def test_the_budget_holds_at_every_moment_transfers_included(base_model, tmp_path, tensors):
    model = copy.deepcopy(base_model)
    inner = torch.optim.AdamW(model.parameters())
    budget = tensors * largest_stepped_bytes(model, inner)
    offloaded = wrap(model, inner, "disk", tmp_path, budget)
    seen = watch_entry_bytes(offloaded.store)
    train(model, offloaded, [[0, 1, 2, 3]] * 3)

    stats = offloaded.store.stats
    assert max(seen) == stats["peak_resident_bytes"] <= budget
    # Four layers' states do not fit: every step streams all of them through the budget.
    assert stats["bytes_to_device"] == 2 * stats["backing_bytes"]


def test_a_budget_that_holds_the_active_set_moves_states_only_when_it_changes(base_model, tmp_path):
    model = copy.deepcopy(base_model)
    inner = torch.optim.AdamW(model.parameters())
    per_layer = sum(8 * p.numel() + 4 for p in model.model.layers[0].parameters())
    # The budget holds two layers while they are stepped: states, and the for-loop AdamW's two temporaries.
    stepped = sum(device_bytes_while_stepped(inner, p, False) for p in model.model.layers[0].parameters())
    offloaded = wrap(model, inner, "cpu", tmp_path, 2 * stepped)
    train(model, offloaded, [[0, 1]] * 3 + [[2, 3]] * 3 + [[0, 1]] * 3 + [[1, 2]] * 2)
    stats = offloaded.store.stats
    # Fetched: layers 0 and 1 when they come back in the third window, layer 2 in the fourth; layer 1 stays
    # resident from the third window into the fourth. Written back: 0 and 1, then 2 and 3, then 0.
    assert stats["bytes_to_device"] == 3 * per_layer
    assert stats["bytes_to_backing"] == 5 * per_layer
    assert stats["peak_resident_bytes"] <= 2 * stepped


def test_without_overlap_nothing_is_prefetched_and_every_write_finishes_at_once(base_model, tmp_path):
    reference, model = copy.deepcopy(base_model), copy.deepcopy(base_model)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    offloaded = wrap(model, inner, "disk", tmp_path, 3 * largest_stepped_bytes(model, inner), overlap=False)
    train(reference, plain, SCHEDULE)
    seen = []
    store = offloaded.store
    original = inner.step

    def step(*args, **kwargs):
        seen.append(store.stats["resident_tensors"])
        return original(*args, **kwargs)

    inner.step = step
    train(model, offloaded, SCHEDULE)
    assert_same_weights(reference, model)
    # The update of the parameters outside the store (embeddings, head) sees none; each offloaded one sees itself.
    assert set(seen) == {0, 1}, "nothing prefetched, and every write-back waited for at once"
    assert store.stats["peak_resident_tensors"] == 1


def test_state_dict_round_trip_through_a_new_store(base_model, tmp_path):
    reference, model = copy.deepcopy(base_model), copy.deepcopy(base_model)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    offloaded = wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2), "disk", tmp_path / "a")
    train(reference, plain, SCHEDULE[:4])
    train(model, offloaded, SCHEDULE[:4])
    saved = offloaded.state_dict()
    offloaded.store.close()

    restored = wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2), "disk", tmp_path / "b")
    restored.load_state_dict(saved)
    assert not set(layer_params(model)) & set(restored.state), "loading put no layer state on the device"
    train(reference, plain, SCHEDULE[4:], seed=2)
    train(model, restored, SCHEDULE[4:], seed=2)
    assert_same_weights(reference, model)
    assert_same_state(plain.state_dict(), restored.state_dict())


def test_lr_scheduler_on_the_wrapped_optimizer_keeps_working(base_model, tmp_path):
    reference, model = copy.deepcopy(base_model), copy.deepcopy(base_model)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    offloaded = wrap(model, inner, "cpu", tmp_path)
    halve = lambda step: 0.5**step  # noqa: E731
    train(reference, plain, SCHEDULE, scheduler=torch.optim.lr_scheduler.LambdaLR(plain, halve))
    train(model, offloaded, SCHEDULE, scheduler=torch.optim.lr_scheduler.LambdaLR(inner, halve))
    assert offloaded.param_groups[0]["lr"] == 1e-2 * 0.5 ** len(SCHEDULE)
    assert_same_weights(reference, model)


def test_state_dict_after_close_says_why_it_cannot_be_complete(base_model, tmp_path):
    model = copy.deepcopy(base_model)
    offloaded = wrap(model, torch.optim.AdamW(model.parameters()), "disk", tmp_path)
    train(model, offloaded, SCHEDULE[:2])
    offloaded.set_active([])  # every layer's state leaves the device
    offloaded.store.close()
    with pytest.raises(RuntimeError, match=r"freed when training ended .* save checkpoints during fit"):
        offloaded.state_dict()


def bf16_model(base_model):
    return copy.deepcopy(base_model).to(torch.bfloat16)


def train_with_fp32_reference(model, offloaded, schedule):
    """Train ``model`` (bf16) and an fp32 copy of its weights, fed the same fp32-cast gradients, in lockstep."""
    reference = [p.detach().float().requires_grad_() for p in model.parameters()]
    plain = torch.optim.AdamW(reference, lr=1e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    for active in schedule:
        for index, layer in enumerate(model.model.layers):
            layer.requires_grad_(index in active)
        if offloaded.store is not None:
            offloaded.set_active(units_of(model, active))
            offloaded.prefetch()
        tokens = torch.randint(0, VOCAB, (2, 12), generator=generator)
        offloaded.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        for ref, p in zip(reference, model.parameters(), strict=True):
            ref.grad = None if p.grad is None else p.grad.float()
        offloaded.step()
        plain.step()
    return reference


@pytest.mark.parametrize("tier", ["resident", "disk"])
def test_masters_equal_fp32_adamw_fed_the_same_gradients(base_model, tmp_path, tier):
    model = bf16_model(base_model)
    params = list(model.parameters())
    if tier == "resident":
        offloaded = OffloadedOptimizer(torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1), None, params)
    else:
        offloaded = wrap(model, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1), "disk", tmp_path, masters=params)
    reference = train_with_fp32_reference(model, offloaded, SCHEDULE)

    state = offloaded.state_dict()["state"]
    for index, (ref, p) in enumerate(zip(reference, params, strict=True)):
        master = state[index][MASTER_KEY]
        assert master.dtype == torch.float32 and torch.equal(master, ref.detach()), index
        assert torch.equal(p.detach(), master.to(torch.bfloat16)), "the weight is its master rounded to bf16"
        assert state[index]["exp_avg"].dtype == torch.float32


def test_masters_travel_with_the_state_and_resume_exactly(base_model, tmp_path):
    def bf16_run(folder, tier="cpu"):
        model = bf16_model(base_model)
        params = list(model.parameters())
        return model, wrap(model, torch.optim.AdamW(params, lr=1e-3), tier, tmp_path / folder, masters=params)

    reference, uninterrupted = bf16_run("a")
    train(reference, uninterrupted, SCHEDULE[:4])
    train(reference, uninterrupted, SCHEDULE[4:], seed=2)

    model, first = bf16_run("b")
    train(model, first, SCHEDULE[:4])
    saved = first.state_dict()
    first.store.close()
    params = list(model.parameters())
    resumed = wrap(model, torch.optim.AdamW(params, lr=1e-3), "disk", tmp_path / "c", masters=params)
    resumed.load_state_dict(saved)
    train(model, resumed, SCHEDULE[4:], seed=2)

    assert_same_weights(reference, model)
    assert_same_state(uninterrupted.state_dict(), resumed.state_dict())
    assert all(state[MASTER_KEY].dtype == torch.float32 for state in resumed.state_dict()["state"].values())
