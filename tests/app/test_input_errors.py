"""How the entry points tell bad input from a failure: one line and exit status 2, or the traceback."""

from argparse import ArgumentError

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer

from lightning_grass.app.input_errors import find_input_error, report_input_errors, trainer_settings
from lightning_grass.errors import DataFormatError, MissingPathError, SettingTypeError, SettingValueError

# Trainer settings that build nothing the tests do not need.
QUIET = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (SettingValueError("n_active=9 must be ..."), ValueError),
        (SettingTypeError("seed='a' must be an integer"), TypeError),
        (DataFormatError("data.jsonl:3: invalid JSON"), ValueError),
        (MissingPathError("model/ has no config.json"), FileNotFoundError),
    ],
)
def test_input_errors_are_the_builtin_exceptions_python_users_catch(error, builtin):
    assert isinstance(error, builtin)


def test_bad_input_prints_one_line_and_exits_with_status_2(capsys, monkeypatch):
    monkeypatch.delenv("LIGHTNING_GRASS_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info, report_input_errors():
        raise SettingValueError("n_active=9 must be between 1 and the number of layers (2)")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: n_active=9 must be between 1 and the number of layers (2)\n"


def test_bad_input_wrapped_by_hydra_instantiate_is_found_through_its_cause(capsys, monkeypatch):
    monkeypatch.delenv("LIGHTNING_GRASS_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    from hydra.errors import InstantiationException

    cause = SettingValueError("ema=2 must be in (0, 1]")
    with pytest.raises(SystemExit), report_input_errors():
        raise InstantiationException("Error in call to target 'GRASSCallback'") from cause
    assert capsys.readouterr().err == "error: ema=2 must be in (0, 1]\n"


def test_an_unexpected_error_keeps_its_traceback():
    with pytest.raises(RuntimeError, match="CUDA error"), report_input_errors():
        raise RuntimeError("CUDA error")
    assert find_input_error(ValueError("a ValueError that is not ours")) is None


@pytest.mark.parametrize("variable", ["LIGHTNING_GRASS_TRACEBACK", "HYDRA_FULL_ERROR"])
def test_the_traceback_of_bad_input_when_asked_for(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    with pytest.raises(SettingValueError, match="n_active"), report_input_errors():
        raise SettingValueError("n_active=9")


def test_a_malformed_command_line_is_one_line_in_the_parsers_own_words(capsys, monkeypatch):
    monkeypatch.delenv("LIGHTNING_GRASS_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info, report_input_errors():
        raise ArgumentError(None, "Parser key \"model.lr\":\n  Expected a <class 'float'>. Got value: abc")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: Parser key \"model.lr\": Expected a <class 'float'>. Got value: abc\n"


def test_lightnings_own_setting_errors_become_bad_input_naming_the_trainer():
    with pytest.raises(SettingValueError) as refused, trainer_settings():
        Trainer(max_steps=-5, **QUIET)
    assert str(refused.value) == (
        "trainer: `max_steps` must be a non-negative integer or -1 (infinite steps). You passed in -5."
    )
    assert isinstance(refused.value.__cause__, MisconfigurationException)
    with pytest.raises(SettingValueError) as refused, trainer_settings():
        Trainer(precision="bogus", **QUIET)
    assert str(refused.value).startswith("trainer: Precision 'bogus' is invalid. Allowed precision values: (")
    assert type(refused.value.__cause__) is ValueError


def test_a_trainer_node_that_hydra_instantiates_is_reported_through_the_wrapper(capsys, monkeypatch):
    monkeypatch.delenv("LIGHTNING_GRASS_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    node = {"_target_": "lightning.pytorch.Trainer", **QUIET, "devices": "abc"}
    with pytest.raises(SystemExit) as exit_info, report_input_errors(), trainer_settings("trainer"):
        instantiate(node)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: trainer: `devices` selected with `CPUAccelerator` should be an int > 0.\n"
    with pytest.raises(SettingValueError) as refused, trainer_settings("pl_trainer"):
        instantiate({**node, "devices": 1, "accelerator": "tpux"})
    # Lightning lists the accelerator names from a set, in an order that changes between runs.
    assert str(refused.value).startswith(
        "pl_trainer: You selected an invalid accelerator name: `accelerator='tpux'`. Available names are: "
    )
    assert isinstance(refused.value.__cause__, InstantiationException)


def test_only_lightnings_refusals_are_turned_into_trainer_errors():
    ours = SettingValueError("max_resident_bytes='12 parsecs' is not a byte size")
    with pytest.raises(SettingValueError) as raised, trainer_settings():
        raise ours
    assert raised.value is ours
    with pytest.raises(InstantiationException) as raised, trainer_settings():
        raise InstantiationException("Error in call to target 'GRASSStrategy'") from ours
    assert raised.value.__cause__ is ours
    with pytest.raises(RuntimeError, match="CUDA error"), trainer_settings():
        raise RuntimeError("CUDA error")
    with pytest.raises(InstantiationException, match="Error locating target"), trainer_settings():
        instantiate({"_target_": "lightning.pytorch.NoSuchTrainer"})
