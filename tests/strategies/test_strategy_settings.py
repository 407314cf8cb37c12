"""Settings of the three strategies checked at construction: one-line errors naming the field and the value."""

import pytest
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_grass import AtomicCheckpointIO, GRASSDDPStrategy, GRASSFSDPStrategy, GRASSStrategy
from lightning_grass.errors import SettingTypeError, SettingValueError

UNITS = "write a number with one of the units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, for example '512MiB'"
NOT_BYTES = "must be a number of bytes or a string such as '512MiB'"
MODULE_PATH = "must be a dotted module path such as 'model.model.layers', or None"
DP = "an integer >= 1 or 'auto'"


@pytest.mark.parametrize("strategy", [GRASSStrategy, GRASSDDPStrategy], ids=["grass", "grass_ddp"])
@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (float("nan"), SettingTypeError, f"max_resident_bytes=nan {NOT_BYTES}"),
        (float("inf"), SettingTypeError, f"max_resident_bytes=inf {NOT_BYTES}"),
        (2.0**30, SettingTypeError, f"max_resident_bytes=1073741824.0 {NOT_BYTES}"),
        (True, SettingTypeError, f"max_resident_bytes=True {NOT_BYTES}"),
        ("nan", SettingValueError, f"max_resident_bytes='nan' is not a byte size; {UNITS}"),
        ("inf GiB", SettingValueError, f"max_resident_bytes='inf GiB' is not a byte size; {UNITS}"),
        ("1e9", SettingValueError, f"max_resident_bytes='1e9' is not a byte size; {UNITS}"),
        ("12 parsecs", SettingValueError, f"max_resident_bytes='12 parsecs' is not a byte size; {UNITS}"),
        ("-1GiB", SettingValueError, f"max_resident_bytes='-1GiB' is not a byte size; {UNITS}"),
        ("0.4 B", SettingValueError, "max_resident_bytes='0.4 B' must be at least one byte"),
    ],
)
def test_max_resident_bytes_refuses_non_finite_and_malformed_values_in_one_line(strategy, value, error, message):
    with pytest.raises(error) as raised:
        strategy(offload="cpu", max_resident_bytes=value)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1.5GB", 1_500_000_000), ("0.1 KiB", 102), ("1" * 400 + " B", int("1" * 400)), (2**70, 2**70)],
)
def test_max_resident_bytes_parses_exactly_without_float_rounding_or_overflow(value, expected):
    assert GRASSStrategy(offload="cpu", max_resident_bytes=value).max_resident_bytes == expected


@pytest.mark.parametrize("strategy", [GRASSStrategy, GRASSDDPStrategy, GRASSFSDPStrategy])
@pytest.mark.parametrize("value", [5, float("nan"), ["/tmp"]])
def test_offload_dir_of_the_wrong_type_is_refused(strategy, value):
    with pytest.raises(SettingTypeError) as raised:
        strategy(offload="disk", offload_dir=value)
    assert str(raised.value) == (
        f"offload_dir={value!r} must be a folder path (a string or a pathlib.Path) or None for the system temp folder"
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(offload=float("nan")), SettingValueError, "offload=nan is not supported; use one of ('auto', 'none',"),
        (dict(layers=3), SettingTypeError, f"layers=3 {MODULE_PATH}"),
        (dict(layers=""), SettingValueError, f"layers='' {MODULE_PATH}"),
        (dict(data_parallel_size=float("nan")), SettingTypeError, f"data_parallel_size=nan must be {DP}"),
        (dict(data_parallel_size="two"), SettingTypeError, f"data_parallel_size='two' must be {DP}"),
        (dict(data_parallel_size=2.0), SettingTypeError, f"data_parallel_size=2.0 must be {DP}"),
        (dict(data_parallel_size=True), SettingTypeError, f"data_parallel_size=True must be {DP}"),
        (dict(data_parallel_size=0), SettingValueError, f"data_parallel_size=0 must be {DP}"),
        (dict(tensor_parallel_size=float("nan")), SettingValueError, "tensor_parallel_size=nan is not supported"),
        (dict(tensor_parallel_size=True), SettingValueError, "tensor_parallel_size=True is not supported by grass"),
    ],
)
def test_grass_fsdp_settings_of_the_wrong_type_or_value_are_refused(kwargs, error, message):
    with pytest.raises(error) as raised:
        GRASSFSDPStrategy(**kwargs)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("strategy_class", [GRASSStrategy, GRASSDDPStrategy])
def test_checkpoints_are_written_atomically_unless_another_plugin_is_given(strategy_class):
    assert type(strategy_class().checkpoint_io) is AtomicCheckpointIO
    mine = TorchCheckpointIO()
    assert strategy_class(checkpoint_io=mine).checkpoint_io is mine


def _estimate(**settings):
    from conftest import TinyCausalLM

    from lightning_grass import estimate_memory

    return estimate_memory(TinyCausalLM().model, n_active=2, **settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(offload="nvme"), "offload='nvme' is not supported; use one of ('auto', 'none', 'cpu', 'disk')"),
        (dict(offload="none", max_resident_bytes="1MiB"), "max_resident_bytes='1MiB' bounds the states an offload"),
        (dict(offload="cpu", max_resident_bytes="12 parsecs"), "max_resident_bytes='12 parsecs' is not a byte size"),
        (dict(offload="cpu", offload_always_on="yes"), "offload_always_on='yes' must be True or False"),
    ],
)
def test_one_offload_setting_is_refused_with_one_message_by_every_strategy_and_the_estimate(settings, message):
    takers = [GRASSStrategy, GRASSDDPStrategy, _estimate]
    if set(settings) <= {"offload", "offload_dir"}:
        takers.append(GRASSFSDPStrategy)  # grass_fsdp takes the tier and its folder only
    messages = set()
    for take in takers:
        with pytest.raises((SettingValueError, SettingTypeError)) as raised:
            take(**settings)
        messages.add(str(raised.value))
    assert len(messages) == 1 and messages.pop().startswith(message)


@pytest.mark.parametrize(("layers", "error"), [(3, SettingTypeError), ("", SettingValueError)])
def test_layers_is_refused_with_one_error_and_one_message_by_the_callback_the_fsdp_strategy_and_the_estimate(
    layers, error
):
    from lightning_grass import GRASSCallback

    for take in (GRASSCallback, GRASSFSDPStrategy, _estimate):
        with pytest.raises(error) as raised:
            take(layers=layers)
        assert str(raised.value) == f"layers={layers!r} {MODULE_PATH}", take


def test_a_precision_grass_fsdp_does_not_train_in_is_refused_by_one_check():
    from lightning_grass.offload.settings import check_sharded_precision

    with pytest.raises(SettingValueError) as raised:
        check_sharded_precision("16-mixed")
    assert str(raised.value) == (
        "precision='16-mixed' is not supported by grass_fsdp; use one of ('32-true', 'bf16-mixed', 'bf16-true')"
    )
    for precision in ("32-true", "32", "bf16-mixed", "bf16-true"):
        check_sharded_precision(precision)
