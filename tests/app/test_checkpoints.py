"""grass-train's checkpoint settings: checked before any work, and where ``ckpt_path=last`` points."""

import pytest
import torch
from conftest import TinyCausalLM, make_trainer, token_batches
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_grass.app.checkpoints import (
    CheckpointAtTrainEnd,
    check_checkpoint_settings,
    checkpoint_callbacks,
    resume_path,
    resumes_in_place,
)
from lightning_grass.errors import MissingPathError, SettingTypeError, SettingValueError
from lightning_grass.preemption import CheckpointOnSigterm


@pytest.mark.parametrize(
    ("every", "path", "error", "message"),
    [
        (-1, None, SettingValueError, "ckpt_every_n_steps=-1 must be >= 0 (0 turns checkpoints off)"),
        (2.5, None, SettingTypeError, "ckpt_every_n_steps=2.5 must be an int (0 turns checkpoints off)"),
        (True, None, SettingTypeError, "ckpt_every_n_steps=True must be an int (0 turns checkpoints off)"),
        (5, 3, SettingTypeError, "ckpt_path=3 must be 'last' or the path of a .ckpt file"),
        (5, "/no/x.ckpt", MissingPathError, "ckpt_path='/no/x.ckpt' is not a file; give 'last' or the path of a"),
    ],
)
def test_bad_settings_are_refused_with_the_field_and_what_is_allowed(every, path, error, message):
    with pytest.raises(error) as raised:
        check_checkpoint_settings(every, path)
    assert str(raised.value).startswith(message)


def test_good_settings_pass(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"")
    for every, path in [(0, None), (500, "last"), (1, str(tmp_path / "x.ckpt"))]:
        check_checkpoint_settings(every, path)


def test_last_resumes_from_the_runs_own_last_checkpoint_once_it_exists(tmp_path):
    assert resume_path(None, tmp_path) is None
    assert resume_path("last", tmp_path) is None, "no checkpoint yet: start from step 0"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resume_path("last", tmp_path) == tmp_path / "checkpoints" / "last.ckpt"
    assert resume_path("/elsewhere/x.ckpt", tmp_path).as_posix() == "/elsewhere/x.ckpt"


def test_the_callbacks_keep_only_last_ckpt_and_write_it_on_sigterm(tmp_path):
    assert checkpoint_callbacks(tmp_path, 0) == []
    at_end, periodic, on_sigterm = checkpoint_callbacks(tmp_path, 7)
    assert isinstance(periodic, ModelCheckpoint) and isinstance(on_sigterm, CheckpointOnSigterm)
    assert isinstance(at_end, CheckpointAtTrainEnd) and at_end.path == tmp_path / "checkpoints" / "last.ckpt"
    assert (periodic.dirpath, periodic.save_top_k, periodic.save_last) == (str(tmp_path / "checkpoints"), 0, True)
    assert periodic._every_n_train_steps == 7
    assert on_sigterm.path == tmp_path / "checkpoints" / "last.ckpt"


def test_last_ckpt_is_never_versioned_beside_an_existing_one(tmp_path):
    _, periodic, _ = checkpoint_callbacks(tmp_path, 7)
    assert periodic._enable_version_counter is False


def test_a_run_resumes_in_place_from_last_or_from_a_file_of_its_own_checkpoints(tmp_path):
    assert not resumes_in_place(None, tmp_path)
    assert resumes_in_place("last", tmp_path)
    assert resumes_in_place(str(tmp_path / "checkpoints" / "last.ckpt"), tmp_path)
    assert not resumes_in_place(str(tmp_path / "elsewhere" / "last.ckpt"), tmp_path), "continues into a new run"


def test_the_last_step_is_saved_when_the_run_length_is_not_a_multiple_of_the_interval(tmp_path):
    trainer = make_trainer(max_steps=5, enable_checkpointing=True, callbacks=checkpoint_callbacks(tmp_path, 3))
    trainer.fit(TinyCausalLM(), token_batches())
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
