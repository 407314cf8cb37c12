import math

import pytest

from lightning_grass import GRASSCallback, GRASSConfig
from lightning_grass.errors import SettingValueError


def test_defaults():
    config = GRASSConfig()
    assert (config.mode, config.n_active, config.probe_steps, config.sample_every) == ("grass", 2, 10, 25)
    assert (config.refresh_every, config.temperature, config.ema, config.normalize) == (25, 1.0, 0.5, "mean")
    assert config.probes
    assert not GRASSConfig(mode="lisa").probes
    assert not GRASSConfig(mode="lisa", probe_steps=0).probes


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(mode="random"), ValueError, "mode='random' is not supported; use one of"),
        (dict(n_active=0), ValueError, "n_active=0 must be an integer >= 1"),
        (dict(n_active=1.5), TypeError, "n_active=1.5 must be an integer >= 1"),
        (dict(probe_steps=-1), ValueError, "probe_steps=-1 must be an integer >= 1"),
        (dict(probe_steps=0), ValueError, "probe_steps=0 must be an integer >= 1"),
        (dict(mode="grass_static", probe_steps=0), ValueError, "probe_steps=0 must be an integer >= 1"),
        (dict(mode="lisa", probe_steps=-2), ValueError, "probe_steps=-2 must be an integer >= 0"),
        (dict(sample_every=0), ValueError, "sample_every=0 must be an integer >= 1"),
        (dict(update_every=-3), ValueError, "update_every=-3 must be an integer >= 1"),
        (dict(temperature=0), ValueError, "temperature=0 must be a finite number > 0"),
        (dict(temperature=-1.0), ValueError, "temperature=-1.0 must be a finite number > 0"),
        (dict(temperature="hot"), TypeError, "temperature='hot' must be a finite number > 0"),
        (dict(ema=0.0), ValueError, r"ema=0.0 must be a finite number in \(0, 1\]"),
        (dict(ema=1.5), ValueError, r"ema=1.5 must be a finite number in \(0, 1\]"),
        (dict(normalize="zscore"), ValueError, "normalize='zscore' is not supported"),
        (
            dict(importance="fisher"),
            ValueError,
            r"importance='fisher' is not supported; use one of \('mgn', 'relative'\)",
        ),
        (dict(target_effective_layers=0.5), ValueError, "target_effective_layers=0.5 must be a finite number >= 1"),
        (
            dict(target_effective_layers="wide"),
            TypeError,
            "target_effective_layers='wide' must be a finite number >= 1",
        ),
        (dict(max_probability=0.0), ValueError, r"max_probability=0.0 must be a finite number in \(0, 1\]"),
        (dict(max_probability=1.5), ValueError, r"max_probability=1.5 must be a finite number in \(0, 1\]"),
        (dict(seed=-1), ValueError, "seed=-1 must be an integer >= 0"),
        (
            dict(layers=""),
            ValueError,
            r"^layers='' must be a dotted module path such as 'model.model.layers', or None$",
        ),
        (
            dict(layers=" "),
            ValueError,
            r"^layers=' ' must be a dotted module path such as 'model.model.layers', or None$",
        ),
        (dict(layers=3), TypeError, r"^layers=3 must be a dotted module path such as 'model.model.layers', or None$"),
        (dict(mode="fixed"), ValueError, "fixed_layers=None: mode='fixed' needs a non-empty list"),
        (
            dict(mode="fixed", fixed_layers=[]),
            ValueError,
            r"fixed_layers=\[\]: mode='fixed' needs a non-empty list",
        ),
        (dict(mode="fixed", fixed_layers=[1, 3, 1]), ValueError, r"fixed_layers=\[1, 3, 1\] repeats \[1\]"),
        (dict(mode="fixed", fixed_layers=[-1]), ValueError, "fixed_layers=-1 must be an integer >= 0"),
        (
            dict(mode="lisa", fixed_layers=[0]),
            ValueError,
            r"fixed_layers=\[0\] is only used with mode='fixed', not 'lisa'",
        ),
    ],
)
def test_every_bad_value_names_the_field_and_what_is_allowed(kwargs, error, message):
    with pytest.raises(error, match=message):
        GRASSCallback(**kwargs)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("temperature", math.nan, r"> 0"),
        ("temperature", math.inf, r"> 0"),
        ("ema", math.nan, r"in \(0, 1\]"),
        ("target_effective_layers", math.nan, r">= 1"),
        ("target_effective_layers", math.inf, r">= 1"),
        ("max_probability", math.nan, r"in \(0, 1\]"),
    ],
)
def test_every_float_setting_refuses_nan_and_infinity(field, value, allowed):
    with pytest.raises(SettingValueError, match=rf"^{field}={value!r} must be a finite number {allowed}$"):
        GRASSCallback(**{field: value})


def test_fixed_mode_sets_n_active_from_the_list():
    config = GRASSConfig(mode="fixed", fixed_layers=[3, 1])
    assert (config.fixed_layers, config.n_active) == ((1, 3), 2)


def test_model_dependent_checks():
    with pytest.raises(ValueError, match=r"n_active=5 must be between 1 and the number of layers \(4\)"):
        GRASSConfig(n_active=5).check_num_layers(4)
    with pytest.raises(
        ValueError,
        match=r"fixed_layers=\[1, 4\] has indices \[4\] out of range: the model has 4 layers \(0 to 3\)",
    ):
        GRASSConfig(mode="fixed", fixed_layers=[1, 4]).check_num_layers(4)
    GRASSConfig(n_active=4).check_num_layers(4)
    with pytest.raises(ValueError, match=r"target_effective_layers=9 must be between 1 and the number of layers \(4\)"):
        GRASSConfig(target_effective_layers=9).check_num_layers(4)
    with pytest.raises(ValueError, match=r"max_probability=0.1 is below 1/4, the uniform probability"):
        GRASSConfig(max_probability=0.1).check_num_layers(4)


def test_model_dependent_checks_count_only_the_trainable_layers():
    frozen = "trainable layers \\(2; layers \\[1, 2\\] have no parameter that requires grad\\)"
    with pytest.raises(SettingValueError, match=rf"^n_active=3 must be between 1 and the number of {frozen}$"):
        GRASSConfig(n_active=3).check_num_layers(4, untrainable=[1, 2])
    GRASSConfig(n_active=2).check_num_layers(4, untrainable=[1, 2])
    with pytest.raises(
        SettingValueError, match=rf"target_effective_layers=3 must be between 1 and the number of {frozen}"
    ):
        GRASSConfig(target_effective_layers=3).check_num_layers(4, untrainable=[1, 2])
    with pytest.raises(SettingValueError, match=r"max_probability=0.4 is below 1/2, .* model's 2 trainable layers"):
        GRASSConfig(max_probability=0.4).check_num_layers(4, untrainable=[1, 2])
    with pytest.raises(
        SettingValueError,
        match=r"^fixed_layers=\[0, 2\] names layers \[2\], which have no parameter that requires grad \(they were "
        r"frozen before fit\), so they would train nothing. Unfreeze them or leave them out$",
    ):
        GRASSConfig(mode="fixed", fixed_layers=[0, 2]).check_num_layers(4, untrainable=[1, 2])
