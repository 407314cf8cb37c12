"""How the entry points tell bad input from a failure: one line and exit status 2, or the traceback."""

import pytest

from lightning_grass.app.input_errors import find_input_error, report_input_errors
from lightning_grass.errors import DataFormatError, MissingPathError, SettingTypeError, SettingValueError


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
