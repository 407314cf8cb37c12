"""The layer-wise, offloaded optimizer step against the plain optimizer, without a Trainer."""

import copy

import pytest
import torch
from conftest import VOCAB, tiny_llama_config
from transformers import LlamaForCausalLM

from lightning_grass.offload import DiskTier, HostTier, LayerStateStore, LayerwiseOptimizer

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


def wrap(model, optimizer, kind, tmp_path, max_resident=2):
    groups = [list(layer.parameters()) for layer in model.model.layers]
    return LayerwiseOptimizer(optimizer, LayerStateStore(optimizer, groups, make_tier(kind, tmp_path), max_resident))


def train(model, optimizer, schedule, scheduler=None, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for active in schedule:
        for index, layer in enumerate(model.model.layers):
            layer.requires_grad_(index in active)
        if isinstance(optimizer, LayerwiseOptimizer):
            optimizer.set_order(active)
            optimizer.prefetch_first()
        tokens = torch.randint(0, VOCAB, (2, 12), generator=generator)
        optimizer.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


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


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_layerwise_offloaded_step_is_bit_identical(base_model, tmp_path, name, tier):
    reference, model = copy.deepcopy(base_model), copy.deepcopy(base_model)
    plain = OPTIMIZERS[name](reference.parameters())
    layerwise = wrap(model, OPTIMIZERS[name](model.parameters()), tier, tmp_path)
    train(reference, plain, SCHEDULE)
    train(model, layerwise, SCHEDULE)

    assert_same_weights(reference, model)
    assert_same_state(plain.state_dict(), layerwise.state_dict())
    stats = layerwise.store.stats
    assert stats["bytes_to_device"] > 0 and stats["bytes_to_backing"] > 0
    # After a step, no layer state is resident: only the always-on modules' states are.
    layer_params = {p for layer in model.model.layers for p in layer.parameters()}
    assert not layer_params & set(layerwise.state)


@pytest.mark.parametrize("max_resident", [1, 2, 3])
def test_at_most_max_resident_layers_are_resident_at_any_moment(base_model, tmp_path, max_resident):
    model = copy.deepcopy(base_model)
    layerwise = wrap(model, torch.optim.AdamW(model.parameters()), "disk", tmp_path, max_resident)
    store = layerwise.store
    seen = []
    for method in ("prefetch", "acquire", "release"):
        original = getattr(store, method)

        def watched(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            seen.append(len(store.resident_groups))
            return result

        setattr(store, method, watched)
    train(model, layerwise, [[0, 1, 2, 3]] * 3)

    assert max(seen) == store.stats["peak_resident_layers"] == max_resident
    # Four layers each step, all four with state after the first step: everything crossed the tier.
    assert store.stats["bytes_to_device"] == 2 * store.stats["backing_bytes"]


def test_state_dict_round_trip_through_a_new_store(base_model, tmp_path):
    reference, model = copy.deepcopy(base_model), copy.deepcopy(base_model)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    layerwise = wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2), "disk", tmp_path / "a")
    train(reference, plain, SCHEDULE[:4])
    train(model, layerwise, SCHEDULE[:4])
    saved = layerwise.state_dict()
    layerwise.store.close()

    restored = wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2), "disk", tmp_path / "b")
    restored.load_state_dict(saved)
    layer_params = {p for layer in model.model.layers for p in layer.parameters()}
    assert not layer_params & set(restored.state), "loading put no layer state on the device"
    train(reference, plain, SCHEDULE[4:], seed=2)
    train(model, restored, SCHEDULE[4:], seed=2)
    assert_same_weights(reference, model)
    assert_same_state(plain.state_dict(), restored.state_dict())


def test_lr_scheduler_on_the_wrapped_optimizer_keeps_working(base_model, tmp_path):
    reference, model = copy.deepcopy(base_model), copy.deepcopy(base_model)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    layerwise = wrap(model, inner, "cpu", tmp_path)
    halve = lambda step: 0.5**step  # noqa: E731
    train(reference, plain, SCHEDULE, scheduler=torch.optim.lr_scheduler.LambdaLR(plain, halve))
    train(model, layerwise, SCHEDULE, scheduler=torch.optim.lr_scheduler.LambdaLR(inner, halve))
    assert layerwise.param_groups[0]["lr"] == 1e-2 * 0.5 ** len(SCHEDULE)
    assert_same_weights(reference, model)


def test_state_dict_after_close_says_why_it_cannot_be_complete(base_model, tmp_path):
    model = copy.deepcopy(base_model)
    layerwise = wrap(model, torch.optim.AdamW(model.parameters()), "disk", tmp_path)
    train(model, layerwise, SCHEDULE[:2])
    layerwise.store.close()
    with pytest.raises(RuntimeError, match=r"freed when training ended .* save checkpoints during fit"):
        layerwise.state_dict()


def test_max_resident_below_one_is_refused(base_model, tmp_path):
    optimizer = torch.optim.AdamW(base_model.parameters())
    with pytest.raises(ValueError, match="max_resident_layers=0 must be an integer >= 1"):
        LayerStateStore(optimizer, [], HostTier(torch.device("cpu")), 0)
