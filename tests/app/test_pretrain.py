"""Building the tiny base model: its settings are checked before any corpus is made or step is taken."""

import math

import pytest

from lightning_grass.app import pretrain
from lightning_grass.app.pretrain import build_base_model, ensure_base_model
from lightning_grass.errors import SettingTypeError, SettingValueError, StorageError

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


def test_a_cache_that_is_a_file_is_named_before_the_corpus_is_made(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the base model was being built")

    monkeypatch.setattr(pretrain, "pretraining_corpus", fail)
    (tmp_path / "cache").write_text("notes")
    output_dir = tmp_path / "cache" / "base" / "tiny_llama"
    with pytest.raises(StorageError) as refused:
        ensure_base_model(output_dir, model_config=MODEL)
    assert str(refused.value) == (
        f"cannot build the base model in {output_dir}: {tmp_path / 'cache'} is a file, not a directory; set "
        "paths.cache_dir (grass-train) to a directory this user can write, or fix its permissions"
    )


def test_a_complete_base_in_a_read_only_cache_is_reused(tmp_path, monkeypatch, tiny_pretrained_dir):
    monkeypatch.setattr(pretrain, "build_base_model", None)  # a call would fail: nothing may be built
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny_llama").symlink_to(tiny_pretrained_dir)
    cache.chmod(0o555)
    try:
        assert ensure_base_model(cache / "tiny_llama", model_config=MODEL) == (cache / "tiny_llama", None)
    finally:
        cache.chmod(0o755)
