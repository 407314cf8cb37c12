"""Building the tiny base model: its settings are checked before any corpus is made or step is taken."""

import math

import pytest

from lightning_grass.app.pretrain import build_base_model
from lightning_grass.errors import SettingTypeError, SettingValueError

MODEL = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32}


@pytest.mark.parametrize(
    ("setting", "error", "message"),
    [
        ({"batch_size": "abc"}, SettingTypeError, "base model build: batch_size='abc' must be an integer >= 1"),
        ({"max_steps": math.nan}, SettingTypeError, "base model build: max_steps=nan must be an integer >= 1"),
        ({"num_documents": 0}, SettingValueError, "base model build: num_documents=0 must be an integer >= 1"),
        ({"seq_len": 1}, SettingValueError, "base model build: seq_len=1 must be an integer >= 2"),
        ({"seed": -1}, SettingValueError, "base model build: seed=-1 must be an integer >= 0"),
        (
            {"lettered_share": math.nan},
            SettingValueError,
            "base model build: lettered_share=nan must be a finite number in [0, 1]",
        ),
        ({"lr": math.inf}, SettingValueError, "lr=inf must be a finite number > 0, such as 2e-5"),
    ],
)
def test_a_bad_build_setting_is_refused_before_any_work(tmp_path, setting, error, message):
    with pytest.raises(error) as refused:
        build_base_model(tmp_path / "base", MODEL, **setting)
    assert str(refused.value) == message
    assert list(tmp_path.iterdir()) == []
