import math

import pytest
import torch
from tolerances import fp32_softmax_rtol

from lightning_grass.sampling.distribution import (
    cap_probabilities,
    effective_layers,
    normalize_importance,
    sample_layers,
    sample_within_budget,
    sampling_probabilities,
    uniform_probabilities,
)


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


def test_effective_layers_runs_from_one_to_the_number_of_layers():
    assert effective_layers(torch.tensor([1.0, 0.0, 0.0, 0.0])) == 1.0
    assert effective_layers(uniform_probabilities(8)) == pytest.approx(8.0, rel=1e-12)
    assert effective_layers(torch.tensor([0.5, 0.5, 0.0])) == pytest.approx(2.0, rel=1e-12)


def test_rank_normalization_sees_only_the_order_and_ties_share_a_rank():
    # One correctly rounded float32 division each, as converting the exact fractions to float32 is.
    assert torch.equal(normalize_importance(torch.tensor([30.0, 1.0, 2.0]), "rank"), torch.tensor([1.0, 1 / 3, 2 / 3]))
    assert normalize_importance(torch.tensor([5.0, 1.0, 1.0, 0.5]), "rank").tolist() == [1.0, 0.625, 0.625, 0.25]
    outlier, mild = torch.tensor([100.0, 2.0, 1.0]), torch.tensor([3.0, 2.0, 1.0])
    assert torch.equal(sampling_probabilities(outlier, 1.0, "rank"), sampling_probabilities(mild, 1.0, "rank"))


def test_log_normalization_draws_in_proportion_to_importance_at_temperature_one():
    importance = torch.tensor([6.0, 1.0, 2.0, 3.0])
    probs = sampling_probabilities(importance, temperature=1.0, normalize="log")
    # log, a mean of 4 and a subtraction before a softmax of logits up to log 3.
    rtol = fp32_softmax_rtol(num_values=4, max_abs_logit=math.log(3.0), input_operations=4)
    assert probs.tolist() == pytest.approx([0.5, 1 / 12, 1 / 6, 0.25], rel=rtol)
    squared = sampling_probabilities(importance, temperature=0.5, normalize="log")  # p proportional to m ** 2
    assert squared.tolist() == pytest.approx([36 / 50, 1 / 50, 4 / 50, 9 / 50], rel=2 * rtol)


@pytest.mark.parametrize("target", [1.5, 3.0, 6.5])
def test_a_target_effective_number_of_layers_sets_the_temperature(target):
    importance = torch.tensor([6.0, 1.2, 1.0, 1.1, 0.9, 1.0, 1.0, 1.0])  # layer 0 dominates, as measured
    probs = sampling_probabilities(importance, temperature=1.0, normalize="mean", target_effective_layers=target)
    # Bisection on log(temperature) to 2^-60 of its range; the float32 softmax then rounds to about 1e-6.
    assert effective_layers(probs) == pytest.approx(target, rel=1e-5)
    assert probs.argmax() == 0 and probs[1] > probs[4], "the order of importance is kept"


def test_a_cap_shares_the_excess_among_the_other_layers_in_proportion():
    capped = cap_probabilities(torch.tensor([0.7, 0.2, 0.1]), 0.5)
    # 0.2 above the cap goes to the others 2:1.
    assert capped.tolist() == pytest.approx([0.5, 0.2 + 0.2 * 2 / 3, 0.1 + 0.2 / 3], rel=1e-6)
    cascaded = cap_probabilities(torch.tensor([0.6, 0.3, 0.05, 0.05]), 0.32)
    assert cascaded.max() <= 0.32 + 1e-7 and cascaded.sum().item() == pytest.approx(1.0, rel=1e-6)
    assert cascaded.tolist()[:2] == pytest.approx([0.32, 0.32])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(target_effective_layers=5.0),
            r"target_effective_layers=5.0 must be between 1 and the number of layers \(4\)",
        ),
        (dict(max_probability=0.2), r"max_probability=0.2 must be between 1/4 \(uniform\) and 1"),
    ],
)
def test_calibration_ranges_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sampling_probabilities(torch.ones(4), 1.0, **kwargs)


def test_layers_outside_eligible_get_probability_zero_and_the_rest_is_computed_among_the_eligible():
    importance = torch.tensor([1.0, 0.0, 2.0, 3.0])
    for normalize in ("mean", "rank", "log", "max", "none"):
        probs = sampling_probabilities(importance, 0.5, normalize, target_effective_layers=2.0, eligible=[0, 2, 3])
        alone = sampling_probabilities(torch.tensor([1.0, 2.0, 3.0]), 0.5, normalize, target_effective_layers=2.0)
        assert probs[1].item() == 0.0
        assert torch.equal(probs[[0, 2, 3]], alone), "the same computation on the eligible layers alone"
    capped = sampling_probabilities(importance, 0.1, max_probability=0.5, eligible=[0, 2, 3])
    assert capped[1].item() == 0.0 and capped.max().item() == pytest.approx(0.5, rel=1e-6)
    assert torch.equal(uniform_probabilities(4, eligible=[0, 2, 3]), torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3]))


def test_only_eligible_layers_are_drawn_even_when_too_few_have_a_non_zero_probability():
    probs = torch.tensor([0.5, 0.5, 0.0, 0.0])  # layer 3 is not eligible; layer 2's probability underflowed to 0
    for seed in range(20):
        assert sample_layers(probs, 3, torch.Generator().manual_seed(seed), eligible=[0, 1, 2]) == [0, 1, 2]
    draws = {tuple(sample_layers(probs, 3, torch.Generator().manual_seed(seed))) for seed in range(20)}
    assert any(3 in draw for draw in draws), "without eligible, torch.multinomial fills in zero-probability layers"
    with pytest.raises(ValueError, match=r"n_active=4 must be between 1 and the number of layers \(3\)"):
        sample_layers(probs, 4, torch.Generator(), eligible=[0, 1, 2])


# Llama-like modules of two layers: q, k, v, o, gate, up, down (hidden 32, 2 of 4 heads for k and v, MLP 64).
MODULE_SIZES = [1024, 512, 512, 1024, 2048, 2048, 2048] * 2


@pytest.mark.parametrize("seed", range(20))
def test_a_budgeted_draw_never_exceeds_the_budget_and_stops_only_when_no_undrawn_unit_fits(seed):
    generator = torch.Generator().manual_seed(seed)
    probabilities = torch.softmax(torch.randn(len(MODULE_SIZES), generator=generator), 0)
    budget = 9216 + 64  # one layer's modules and its two norms: what unit="module" with n_active=1 allows
    drawn = sample_within_budget(probabilities, MODULE_SIZES, budget, generator)
    held = sum(MODULE_SIZES[unit] for unit in drawn)
    left = [MODULE_SIZES[unit] for unit in range(len(MODULE_SIZES)) if unit not in drawn]
    assert drawn == sorted(set(drawn)) and held <= budget
    assert all(size > budget - held for size in left), "the draw stopped with room for another module"


def test_a_budgeted_draw_is_deterministic_for_a_seed_and_follows_the_probabilities():
    probabilities = torch.tensor([0.7, 0.2, 0.1])
    draws = [sample_within_budget(probabilities, [4, 4, 4], 4, torch.Generator().manual_seed(s)) for s in range(4000)]
    assert draws[:50] == [
        sample_within_budget(probabilities, [4, 4, 4], 4, torch.Generator().manual_seed(s)) for s in range(50)
    ]
    counts = torch.tensor([draws.count([unit]) for unit in range(3)], dtype=torch.float64)
    # Each count is binomial(4000, p): five standard deviations either side.
    expected = 4000 * probabilities.double()
    assert ((counts - expected).abs() <= 5 * (expected * (1 - probabilities.double())).sqrt()).all(), counts


def test_equal_units_under_a_budget_of_n_are_n_distinct_units():
    probabilities = torch.softmax(torch.arange(6.0), 0)
    for seed in range(10):
        drawn = sample_within_budget(probabilities, [3] * 6, 3 * 4 + 2, torch.Generator().manual_seed(seed))
        assert len(drawn) == 4 and len(set(drawn)) == 4


def test_a_budgeted_draw_takes_eligible_units_only_and_fills_the_budget_past_zero_probabilities():
    probabilities = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])
    drawn = sample_within_budget(probabilities, [1] * 5, 3, torch.Generator().manual_seed(0), eligible=[1, 2, 3, 4])
    assert 2 in drawn and len(drawn) == 3 and 0 not in drawn


def test_a_budget_that_holds_no_unit_is_refused():
    with pytest.raises(
        ValueError, match="a parameter budget of 511 holds none of the units, the smallest of which has 512"
    ):
        sample_within_budget(torch.full((3,), 1 / 3), [512, 1024, 2048], 511, torch.Generator())
