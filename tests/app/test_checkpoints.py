"""grass-train's checkpoints: settings checked before any work, where ``ckpt_path=last`` points, what is written
when, and which checkpoints a run can resume from."""

import pytest
import torch
from conftest import TinyCausalLM, make_trainer, token_batches
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_grass import GRASSDDPStrategy, GRASSStrategy
from lightning_grass.app.checkpoints import (
    LastCheckpoint,
    check_checkpoint_settings,
    check_resume_checkpoint,
    checkpoint_callbacks,
    report_changed_settings,
    resume_path,
    resumes_in_place,
)
from lightning_grass.errors import (
    CheckpointError,
    MissingPathError,
    SettingTypeError,
    SettingValueError,
    StorageError,
)
from lightning_grass.persistence.preemption import CheckpointOnSigterm


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
    last, on_sigterm = checkpoint_callbacks(tmp_path, 7)
    assert isinstance(last, LastCheckpoint) and isinstance(on_sigterm, CheckpointOnSigterm)
    assert (last.path, last.every_n_steps) == (tmp_path / "checkpoints" / "last.ckpt", 7)
    assert on_sigterm.path == tmp_path / "checkpoints" / "last.ckpt"


def test_a_last_ckpt_that_is_a_directory_is_refused_before_training(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.mkdir(parents=True)
    with pytest.raises(MissingPathError) as raised:
        resume_path("last", tmp_path)
    assert str(raised.value) == (
        f"ckpt_path=last names {last}, which is a directory, not a checkpoint file; move it away (the run writes "
        "its checkpoints there) and run again"
    )
    with pytest.raises(StorageError) as raised:
        checkpoint_callbacks(tmp_path, 7)
    assert str(raised.value) == (
        f"cannot write checkpoints to {last}: it is a directory, not a file; move it away and run again"
    )
    assert checkpoint_callbacks(tmp_path, 0) == [], "a run that writes no checkpoint does not mind"


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


class ValidatedLM(TinyCausalLM):
    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)


class ValidationCounter(Callback):
    """Counts the validations of the fit, in the checkpoint too."""

    def __init__(self):
        self.validations = 0

    def on_validation_end(self, trainer, pl_module):
        self.validations += 1

    def state_dict(self):
        return {"validations": self.validations}


def fit_counting_saves(tmp_path, every_n_steps, ckpt_path=None, **settings):
    """Fit with grass-train's checkpoint callbacks; return the global step of each save."""
    callbacks = [ValidationCounter(), *checkpoint_callbacks(tmp_path, every_n_steps)]
    trainer = make_trainer(enable_checkpointing=True, callbacks=callbacks, **settings)
    saves, save = [], trainer.save_checkpoint

    def counted_save(path, *args, **kwargs):
        saves.append(trainer.global_step)
        save(path, *args, **kwargs)

    trainer.save_checkpoint = counted_save
    validation = token_batches(num_batches=1) if settings.get("val_check_interval") else None
    trainer.fit(ValidatedLM(), token_batches(), validation, ckpt_path=ckpt_path)
    return saves


@pytest.mark.parametrize(
    ("settings", "saves"),
    [
        (dict(max_steps=6, val_check_interval=3), [3, 6]),  # the last step after its validation, once
        (dict(max_steps=2), [2]),  # shorter than the interval: written at the end only
        (dict(max_epochs=2, limit_train_batches=3, accumulate_grad_batches=2), [3, 4]),  # 2 steps an epoch
    ],
)
def test_every_step_is_written_once_and_the_last_after_its_validation(tmp_path, settings, saves):
    assert fit_counting_saves(tmp_path, 3, **settings) == saves
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == saves[-1]
    if "val_check_interval" in settings:
        assert last["callbacks"]["ValidationCounter"] == {"validations": 2}, "saved after the step-6 validation"


def test_a_resume_with_nothing_left_to_train_rewrites_nothing(tmp_path):
    assert fit_counting_saves(tmp_path, 3, max_steps=4) == [3, 4]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert fit_counting_saves(tmp_path, 3, ckpt_path=last, max_steps=4) == []
    assert fit_counting_saves(tmp_path, 3, ckpt_path=last, max_steps=7) == [6, 7]


@pytest.fixture(scope="module")
def shuffled_run(tmp_path_factory):
    """A full and a weights-only checkpoint of 2 steps, taken in the middle of a shuffled epoch."""
    directory = tmp_path_factory.mktemp("shuffled")
    trainer = make_trainer(max_steps=2)
    trainer.fit(TinyCausalLM(), StatefulDataLoader(token_batches().dataset, batch_size=2, shuffle=True))
    trainer.save_checkpoint(directory / "full.ckpt")
    trainer.save_checkpoint(directory / "weights.ckpt", weights_only=True)
    return directory


def test_a_weights_only_checkpoint_is_refused_for_resuming(shuffled_run):
    path = shuffled_run / "weights.ckpt"
    with pytest.raises(CheckpointError) as raised:
        check_resume_checkpoint(path, TinyCausalLM())
    assert str(raised.value) == (
        f"checkpoint {path} holds the model's weights only (it was saved with weights_only=True), without the "
        "optimizer and loop states that training resumes from; resume from a full checkpoint, such as the "
        "checkpoints/last.ckpt of a run"
    )


# Ids that name the object, not its address: pytest-xdist's workers must collect the same test names.
@pytest.mark.parametrize(
    "strategy", [None, "auto", "grass", GRASSStrategy()], ids=["None", "auto", "grass", "GRASSStrategy()"]
)
def test_a_single_process_checkpoint_resumes_under_a_single_process_strategy(shuffled_run, strategy):
    assert check_resume_checkpoint(shuffled_run / "full.ckpt", TinyCausalLM(), strategy) == 2


@pytest.mark.parametrize(
    ("strategy", "name"),
    [("grass_ddp", "strategy=grass_ddp"), (GRASSDDPStrategy(), "GRASSDDPStrategy")],
    ids=["grass_ddp", "GRASSDDPStrategy()"],
)
def test_a_shuffled_single_process_position_is_refused_under_data_parallelism(shuffled_run, strategy, name):
    # Lightning would load it into each process's DistributedSampler, which is not stateful: an AssertionError
    # in torchdata's BatchSampler.load_state_dict, during fit.
    path = shuffled_run / "full.ckpt"
    with pytest.raises(CheckpointError) as raised:
        check_resume_checkpoint(path, TinyCausalLM(), strategy)
    assert str(raised.value) == (
        f"checkpoint {path} was written by a single-process strategy (such as strategy=grass), and {name} cannot "
        "load its position in the training data (it splits the data between processes); resume with the strategy "
        f"the run started with, or start a new run with {name}"
    )


CONFIG = {"seed": 0, "model": {"lr": 0.001}, "paths": {"output_dir": "/a"}, "sampler": {"_target_": "S", "n": 2}}


def test_changed_settings_are_reported_one_line_each(tmp_path, capsys):
    (tmp_path / "resolved_config.yaml").write_text(OmegaConf.to_yaml(CONFIG))
    changed = {**CONFIG, "model": {"lr": 0.002}, "paths": {"output_dir": "/b"}, "sampler": {"_target_": "S", "n": 3}}
    report_changed_settings(OmegaConf.create(changed), tmp_path, 5)
    assert capsys.readouterr().out == (
        "resuming from the checkpoint of step 5\nresuming with model.lr=0.002; the run started with model.lr=0.001\n"
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"seed: 0\nmodel: {lr: 0.001\n", "it is not valid YAML (expected ',' or '}', but got '<stream end>', line 3)"),
        (b"seed: 0\nname: caf\xe9\n", "it is not UTF-8 text (byte 0xe9 at offset 17)"),
        (b"- seed\n- 0\n", "it holds a list, not a mapping of settings"),
    ],
    ids=["yaml", "latin-1", "list"],
)
def test_a_saved_config_that_cannot_be_read_is_reported_and_the_resume_goes_on(tmp_path, capsys, content, reason):
    saved = tmp_path / "resolved_config.yaml"
    saved.write_bytes(content)
    report_changed_settings(OmegaConf.create(CONFIG), tmp_path, 5)
    assert capsys.readouterr().out == (
        "resuming from the checkpoint of step 5\n"
        f"could not compare settings with {saved}: {reason}; resuming without the comparison\n"
    )
