import math

import pytest
import torch
from tolerances import fp32_softmax_rtol

from lightning_grass.sampling import sample_layers, sampling_probabilities, uniform_probabilities


def test_softmax_of_mean_normalized_importance():
    importance = torch.tensor([1.0, 2.0, 3.0])  # mean 2 -> normalized 0.5, 1, 1.5
    probs = sampling_probabilities(importance, temperature=0.5, normalize="mean")
    expected = [math.exp(v / 0.5) for v in (0.5, 1.0, 1.5)]
    # float32 against the exact value: a mean, a division and the temperature before a softmax of logits up to 3.
    rtol = fp32_softmax_rtol(num_values=3, max_abs_logit=3.0, input_operations=3)
    assert probs.tolist() == pytest.approx([e / sum(expected) for e in expected], rel=rtol)


@pytest.mark.parametrize(("normalize", "scaled"), [("max", (1 / 3, 2 / 3, 1.0)), ("none", (1.0, 2.0, 3.0))])
def test_other_normalizations(normalize, scaled):
    probs = sampling_probabilities(torch.tensor([1.0, 2.0, 3.0]), temperature=1.0, normalize=normalize)
    expected = [math.exp(v) for v in scaled]
    # float32 against the exact value: a division by the max and by the temperature, logits up to 3, then the softmax.
    rtol = fp32_softmax_rtol(num_values=3, max_abs_logit=3.0, input_operations=2)
    assert probs.tolist() == pytest.approx([e / sum(expected) for e in expected], rel=rtol)


def test_mean_normalization_makes_temperature_independent_of_gradient_scale():
    small = sampling_probabilities(torch.tensor([1e-4, 2e-4, 4e-4]), temperature=1.0)
    large = sampling_probabilities(torch.tensor([10.0, 20.0, 40.0]), temperature=1.0)
    # Both are the exact softmax of [3/7, 6/7, 12/7] within the float32 bound (the inputs' own rounding, a sum of
    # 3, a division by 3 and one by the mean), so they are within twice that bound of each other.
    rtol = 2 * fp32_softmax_rtol(num_values=3, max_abs_logit=12 / 7, input_operations=5)
    assert torch.allclose(small, large, rtol=rtol, atol=0)


def test_zero_importance_gives_uniform_probabilities():
    assert sampling_probabilities(torch.zeros(4), temperature=1.0).tolist() == [0.25] * 4


def test_small_temperature_exploits_large_explores():
    importance = torch.tensor([1.0, 1.0, 2.0])
    sharp = sampling_probabilities(importance, temperature=0.05)
    flat = sampling_probabilities(importance, temperature=100.0)
    assert sharp[2] > 0.999
    assert flat.max() - flat.min() < 0.01


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=0.0), "temperature=0.0 must be > 0"),
        (dict(temperature=1.0, normalize="zscore"), "normalize='zscore' is not supported"),
    ],
)
def test_probability_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sampling_probabilities(torch.ones(3), **kwargs)


def test_sampling_is_distinct_sorted_and_deterministic_for_a_seed():
    probs = uniform_probabilities(8)
    first = [sample_layers(probs, 3, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    draws = [sample_layers(probs, 3, gen) for gen in [torch.Generator().manual_seed(5)] for _ in range(50)]
    assert all(len(set(d)) == 3 and d == sorted(d) for d in draws)
    assert len({tuple(d) for d in draws}) > 10


def test_sampling_frequency_follows_probabilities():
    probs = torch.tensor([0.7, 0.1, 0.1, 0.1])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(2000):
        counts[sample_layers(probs, 1, generator)] += 1
    assert 1300 < counts[0] < 1500
    assert all(150 < c < 250 for c in counts[1:].tolist())


@pytest.mark.parametrize("n_active", [0, 5])
def test_sampling_rejects_impossible_counts(n_active):
    with pytest.raises(ValueError, match=f"n_active={n_active} must be between 1 and the number of layers \\(4\\)"):
        sample_layers(uniform_probabilities(4), n_active, torch.Generator())
