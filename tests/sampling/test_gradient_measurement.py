"""LayerGradientMeter without a Trainer: what it reads, when, and what it frees.

Gradients here are small integers, so every squared norm is exact in float32 and compared with ``==``.
"""

import math

import pytest
import torch
from torch import nn

from lightning_grass.sampling.gradient_measurement import LayerGradientMeter


def three_layers():
    torch.manual_seed(0)
    return [nn.Linear(2, 2, bias=False) for _ in range(3)]


def meter_for(layers, use_probe_hooks=True, free_probe_grads=True):
    params = [list(layer.parameters()) for layer in layers]
    return LayerGradientMeter(params, [], torch.device("cpu"), use_probe_hooks, free_probe_grads)


def set_grads(layers, values):
    for layer, value in zip(layers, values, strict=True):
        layer.weight.grad = torch.full_like(layer.weight, value)


def test_reads_the_active_layers_only():
    layers = three_layers()
    meter = meter_for(layers)
    meter.set_active([0, 2], probing=False)
    set_grads(layers, [2.0, 3.0, 1.0])
    optimizer = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=0.1)

    layer_sq = meter.read_step(optimizer, scaler=None, probing=False)

    assert layer_sq.tolist() == [16.0, 0.0, 4.0], "4 elements of 2.0 and of 1.0; layer 1 is not measured"
    assert meter.active_mask.tolist() == [True, False, True]
    assert all(layer.weight.grad is not None for layer in layers), "outside probing the optimizer needs them"


def test_probe_hooks_measure_in_backward_and_free_each_gradient():
    layers = three_layers()
    meter = meter_for(layers)
    meter.set_active([0, 1, 2], probing=True)
    meter.start_probe_hooks()
    x = torch.ones(1, 2)
    loss = sum(layer(x).sum() for layer in layers)  # d loss / d weight = 1 in every element
    loss.backward()
    assert all(layer.weight.grad is None for layer in layers), "freed as soon as measured"

    optimizer = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=0.1)
    assert meter.read_step(optimizer, scaler=None, probing=True).tolist() == [4.0, 4.0, 4.0]
    assert meter.read_step(optimizer, scaler=None, probing=True).tolist() == [0.0, 0.0, 0.0], "sums reset"

    meter.stop_probe_hooks()
    sum(layer(x).sum() for layer in layers).backward()
    assert all(layer.weight.grad is not None for layer in layers), "no hook after probing"


def test_probe_hooks_wait_for_the_micro_batch_that_closes_the_step():
    layers = three_layers()
    meter = meter_for(layers, free_probe_grads=False)
    meter.set_active([0, 1, 2], probing=True)
    meter.start_probe_hooks()
    x = torch.ones(1, 2)
    meter.micro_batch_closes_step = False
    sum(layer(x).sum() for layer in layers).backward()
    meter.micro_batch_closes_step = True
    sum(layer(x).sum() for layer in layers).backward()

    optimizer = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=0.1)
    assert meter.read_step(optimizer, scaler=None, probing=True).tolist() == [16.0, 16.0, 16.0], "gradient 2"
    assert all(layer.weight.grad is None for layer in layers), "probing leaves the optimizer nothing to step"


def test_without_probe_hooks_probing_reads_every_layer_at_the_step():
    layers = three_layers()
    meter = meter_for(layers, use_probe_hooks=False)
    meter.set_active([0, 1, 2], probing=True)
    meter.start_probe_hooks()
    set_grads(layers, [1.0, 2.0, 3.0])
    optimizer = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=0.1)
    assert meter.read_step(optimizer, scaler=None, probing=True).tolist() == [4.0, 16.0, 36.0]
    assert all(layer.weight.grad is None for layer in layers)


def test_a_non_finite_gradient_is_named_and_the_step_emptied():
    layers = three_layers()
    meter = meter_for(layers)
    meter.set_active([1, 2], probing=False)
    set_grads(layers, [1.0, float("inf"), 1.0])
    optimizer = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=0.1)
    layer_sq = meter.read_step(optimizer, scaler=None, probing=False)
    assert not meter.step_is_finite(layer_sq, optimizer, scaler=None)

    with pytest.warns(UserWarning, match=r"optimizer step 7 has non-finite gradients in layers \[1\]"):
        meter.skip_if_non_finite(layer_sq, optimizer, scaler=None, step=7)
    assert all(layer.weight.grad is None for layer in layers), "every gradient removed: the step is a no-op"


def test_the_window_tells_whether_any_active_layer_got_a_gradient():
    layers = three_layers()
    meter = meter_for(layers)
    meter.set_active([0, 2], probing=False)
    optimizer = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=0.1)
    for _ in range(2):  # no gradient at all: missing grads read as 0
        meter.add_to_window(meter.read_step(optimizer, None, probing=False), torch.tensor(True))
    set_grads(layers, [0.0, 5.0, 0.0])  # zero in the active layers; layer 1 is not measured
    meter.add_to_window(meter.read_step(optimizer, None, probing=False), torch.tensor(True))
    assert meter.close_window() == (3, False)

    meter.add_to_window(torch.tensor([float("inf"), 0.0, 1.0]), torch.tensor(False))
    assert meter.close_window() == (0, False), "a non-finite step is not counted, and the window was reset"
    set_grads(layers, [0.0, 0.0, 1.0])
    meter.add_to_window(meter.read_step(optimizer, None, probing=False), torch.tensor(True))
    assert meter.close_window() == (1, True)


def test_skip_if_non_finite_says_whether_it_skipped():
    layers = three_layers()
    meter = meter_for(layers)
    meter.set_active([0], probing=False)
    set_grads(layers, [1.0, 1.0, 1.0])
    optimizer = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=0.1)
    assert meter.skip_if_non_finite(meter.read_step(optimizer, None, probing=False), optimizer, None, step=1) is False
    assert all(layer.weight.grad is not None for layer in layers)
    with pytest.warns(UserWarning, match="optimizer step 2 has non-finite"):
        assert meter.skip_if_non_finite(torch.tensor([math.nan, 0.0, 0.0]), optimizer, None, step=2) is True
