import math

import pytest
import torch

from lightning_grass.sampling.importance import MeanGradNorm, grouped_sq_norms


def test_grouped_sq_norms_matches_hand_computation():
    grads = [
        torch.tensor([3.0, 4.0]),
        torch.tensor([[1.0, 2.0], [2.0, 0.0]]),
        torch.tensor([0.5]),
        torch.tensor([-2.0]),
    ]
    index = torch.tensor([0, 0, 2, 3])
    result = grouped_sq_norms(grads, index, num_groups=4)
    # group 0: 3^2 + 4^2 + (1 + 4 + 4) = 34; group 1: nothing; group 2: 0.25; group 3: 4
    assert result.tolist() == [34.0, 0.0, 0.25, 4.0]


def test_grouped_sq_norms_of_bf16_grads_is_float32():
    grads = [torch.full((4,), 0.5, dtype=torch.bfloat16)]
    result = grouped_sq_norms(grads, torch.tensor([0]), 1)
    assert result.dtype == torch.float32
    assert result.tolist() == [1.0]


def test_grouped_sq_norms_propagates_non_finite():
    result = grouped_sq_norms([torch.tensor([1.0, float("inf")]), torch.tensor([2.0])], torch.tensor([0, 1]), 2)
    assert math.isinf(result[0].item())
    assert result[1].item() == 4.0


def test_mgn_is_mean_over_steps_of_gradient_rms():
    mgn = MeanGradNorm(torch.tensor([4, 1, 2]))
    all_layers = torch.tensor([True, True, True])
    finite = torch.tensor(True)
    mgn.accumulate(torch.tensor([16.0, 9.0, 8.0]), all_layers, finite)  # rms: 2, 3, 2
    mgn.accumulate(torch.tensor([64.0, 1.0, 2.0]), all_layers, finite)  # rms: 4, 1, 1
    importance = mgn.initialize()
    assert importance.tolist() == [3.0, 2.0, 1.5]
    assert mgn.window_count.tolist() == [0.0, 0.0, 0.0]


def test_refresh_applies_ema_to_measured_layers_and_keeps_frozen_ones_stale():
    mgn = MeanGradNorm(torch.tensor([1, 1, 1]))
    mgn.importance = torch.tensor([1.0, 2.0, 3.0])
    active = torch.tensor([True, False, True])
    mgn.accumulate(torch.tensor([4.0, 100.0, 1.0]), active, torch.tensor(True))  # rms 2, -, 1
    mgn.accumulate(torch.tensor([16.0, 100.0, 9.0]), active, torch.tensor(True))  # rms 4, -, 3
    refreshed = mgn.refresh(ema=0.25)
    # layer 0: 0.25 * 3 + 0.75 * 1 = 1.5; layer 1 stale; layer 2: 0.25 * 2 + 0.75 * 3 = 2.75
    assert refreshed.tolist() == [1.5, 2.0, 2.75]


def test_a_non_finite_step_contributes_nothing():
    mgn = MeanGradNorm(torch.tensor([1, 1]))
    all_layers = torch.tensor([True, True])
    mgn.accumulate(torch.tensor([4.0, 1.0]), all_layers, torch.tensor(True))
    mgn.accumulate(torch.tensor([float("nan"), float("inf")]), all_layers, torch.tensor(False))
    mgn.accumulate(torch.tensor([16.0, float("inf")]), all_layers, torch.tensor(False))
    assert mgn.window_count.tolist() == [1.0, 1.0]
    assert mgn.initialize().tolist() == [2.0, 1.0]


def test_unmeasured_layer_takes_the_mean_of_measured_layers_after_probing():
    mgn = MeanGradNorm(torch.tensor([1, 1, 1]))
    mgn.accumulate(torch.tensor([1.0, 0.0, 9.0]), torch.tensor([True, False, True]), torch.tensor(True))
    assert mgn.initialize().tolist() == [1.0, 2.0, 3.0]


def test_state_dict_round_trip_and_shape_check():
    mgn = MeanGradNorm(torch.tensor([2, 2]))
    mgn.accumulate(torch.tensor([2.0, 8.0]), torch.tensor([True, True]), torch.tensor(True))
    restored = MeanGradNorm(torch.tensor([2, 2]))
    restored.load_state_dict(mgn.state_dict())
    assert torch.equal(restored.window_sum, mgn.window_sum)
    assert torch.equal(restored.window_count, mgn.window_count)
    with pytest.raises(ValueError, match=r"'window_sum' has shape \(2,\), expected \(3,\)"):
        MeanGradNorm(torch.tensor([1, 1, 1])).load_state_dict(mgn.state_dict())


def test_a_layer_without_trainable_parameters_has_importance_zero_and_no_warning(caplog):
    mgn = MeanGradNorm(torch.tensor([1, 0, 1]))
    mgn.accumulate(torch.tensor([4.0, 0.0, 16.0]), torch.tensor([True, False, True]), torch.tensor(True))
    with caplog.at_level("WARNING", logger="lightning_grass.sampling.importance"):
        assert mgn.initialize().tolist() == [2.0, 0.0, 4.0], "0, not the fallback mean of 3"
    assert caplog.messages == []
    mgn.accumulate(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([True, False, True]), torch.tensor(True))
    assert mgn.refresh(ema=0.5).tolist() == [1.5, 0.0, 2.5]
