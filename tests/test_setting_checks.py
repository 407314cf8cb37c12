"""The shared setting checks: the type error for a wrong type, the value error for a value out of range."""

import math

import pytest

from lightning_grass.errors import SettingTypeError, SettingValueError
from lightning_grass.setting_checks import check_choice, check_flag, check_int, check_module_path, check_number


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("abc", SettingTypeError, "batch_size='abc' must be an integer >= 1"),
        (True, SettingTypeError, "batch_size=True must be an integer >= 1"),
        (math.nan, SettingTypeError, "batch_size=nan must be an integer >= 1"),
        (16.0, SettingTypeError, "batch_size=16.0 must be an integer >= 1"),
        (0, SettingValueError, "batch_size=0 must be an integer >= 1"),
    ],
)
def test_an_integer_setting(value, error, message):
    with pytest.raises(error) as raised:
        check_int("batch_size", value, minimum=1)
    assert str(raised.value) == message
    check_int("batch_size", 1, minimum=1)
    check_int("seed", -3)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("1e-3", SettingTypeError),
        (False, SettingTypeError),
        (math.nan, SettingValueError),
        (math.inf, SettingValueError),
        (-1.0, SettingValueError),
        (0, SettingValueError),
    ],
)
def test_a_number_setting(value, error):
    with pytest.raises(error) as raised:
        check_number("lr", value, "> 0", lambda v: v > 0)
    assert str(raised.value) == f"lr={value!r} must be a finite number > 0"
    check_number("lr", 2e-5, "> 0", lambda v: v > 0)


def test_a_choice_and_a_flag():
    with pytest.raises(SettingValueError) as raised:
        check_choice("offload", "gpu", ("none", "cpu"))
    assert str(raised.value) == "offload='gpu' is not supported; use one of ('none', 'cpu')"
    with pytest.raises(SettingTypeError) as raised:
        check_flag("overlap", 1)
    assert str(raised.value) == "overlap=1 must be True or False"
    check_flag("overlap", False)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("two", SettingTypeError),
        ("Auto", SettingTypeError),
        (2.0, SettingTypeError),
        (True, SettingTypeError),
        (0, SettingValueError),
    ],
)
def test_an_integer_setting_that_also_takes_a_word(value, error):
    with pytest.raises(error) as raised:
        check_int("data_parallel_size", value, minimum=1, or_word="auto")
    assert str(raised.value) == f"data_parallel_size={value!r} must be an integer >= 1 or 'auto'"
    check_int("data_parallel_size", "auto", minimum=1, or_word="auto")
    check_int("data_parallel_size", 2, minimum=1, or_word="auto")


@pytest.mark.parametrize(
    ("value", "error"),
    [(3, SettingTypeError), (["model.layers"], SettingTypeError), ("", SettingValueError), (" ", SettingValueError)],
)
def test_a_module_path_setting(value, error):
    with pytest.raises(error) as raised:
        check_module_path("layers", value)
    assert str(raised.value) == f"layers={value!r} must be a dotted module path such as 'model.model.layers', or None"
    check_module_path("layers", None)
    check_module_path("layers", "model.encoder.block, model.decoder.block")
