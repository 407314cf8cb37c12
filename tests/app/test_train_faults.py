"""grass-train's own faults, in process: a refused run writes nothing, bad settings stop before work, signals
that arrive as training ends stop the run, a diverged loss is reported, and a full disk keeps the old model."""

import json
import math
import os
import signal
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from lightning_grass.app import train
from lightning_grass.app.lm import CausalLMModule
from lightning_grass.errors import StorageError
from lightning_grass.persistence.atomic_files import replace_directory_atomically

TINY = [
    "model=scratch_llama",
    "trainer.max_steps=2",
    "sampler.probe_steps=1",
    "sampler.sample_every=1",
    "logger=none",
    "callbacks=none",
    "ckpt_every_n_steps=0",
    "save_plots=false",
    "evaluate_before=false",
    "model.eval_examples=2",
]


# Every test here runs grass-train in process, which adds Hydra's logging handlers to the root logger.
pytestmark = pytest.mark.usefixtures("hydra_logging_restored")


def grass_train(monkeypatch, output_dir, *overrides):
    """``grass-train`` in this process, through Hydra's own entry point."""
    monkeypatch.setattr(sys, "argv", ["grass-train", *TINY, f"paths.output_dir={output_dir}", *overrides])
    train.main()


def test_a_refused_run_leaves_the_finished_runs_record_and_results_alone(tmp_path, monkeypatch, capsys):
    grass_train(monkeypatch, tmp_path / "out", "seed=1")
    record = {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file() and "lock" not in p.name}
    assert "seed=1" in (tmp_path / "out" / ".hydra" / "overrides.yaml").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        grass_train(monkeypatch, tmp_path / "out", "seed=2")
    assert stopped.value.code == 2
    refusal = capsys.readouterr().err.splitlines()[-1]
    assert refusal.startswith(f"error: paths.output_dir={tmp_path / 'out'} already holds the results of an earlier run")
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file() and "lock" not in p.name}
    assert after == record


def test_an_output_dir_that_is_a_file_stops_before_hydra_writes(tmp_path, monkeypatch, capsys):
    (tmp_path / "out").write_text("notes")
    with pytest.raises(SystemExit) as stopped:
        grass_train(monkeypatch, tmp_path / "out")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: paths.output_dir={tmp_path / 'out'} is a file, not a directory; give a directory"
    )
    assert (tmp_path / "out").read_text() == "notes"


@pytest.mark.parametrize(
    ("seed", "message"),
    [
        ("abc", "seed='abc' must be an integer in [0, 4294967295]"),
        ("-1", "seed=-1 must be an integer in [0, 4294967295]"),
        (str(10**21), f"seed={10**21} must be an integer in [0, 4294967295]"),
    ],
)
def test_a_seed_out_of_range_stops_before_the_output_dir_is_claimed(tmp_path, monkeypatch, capsys, seed, message):
    with pytest.raises(SystemExit) as stopped:
        grass_train(monkeypatch, tmp_path / "out", f"seed={seed}")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {message}"
    assert not (tmp_path / "out" / ".hydra").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.gradient_clip_val=nan", "trainer.gradient_clip_val=nan must be a finite number >= 0"),
        ("+trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 must be an integer >= 1"),
    ],
)
def test_trainer_settings_lightning_accepts_but_cannot_train_with(tmp_path, monkeypatch, capsys, override, message):
    with pytest.raises(SystemExit) as stopped:
        grass_train(monkeypatch, tmp_path / "out", override)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {message}"
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_exact_match_generates_up_to_the_models_max_new_tokens(tmp_path, monkeypatch):
    lengths = []
    scored = train.exact_match

    def recording(model, tokenizer, examples, pattern, max_new_tokens=48, **kwargs):
        lengths.append(max_new_tokens)
        return scored(model, tokenizer, examples, pattern, max_new_tokens, **kwargs)

    monkeypatch.setattr(train, "exact_match", recording)
    grass_train(monkeypatch, tmp_path / "out", "model.max_new_tokens=5", "evaluate_before=true")
    assert lengths == [5, 5], "before and after training (the arithmetic task has no test split)"


class SignalAtTrainEnd(Callback):
    """Sends its process a signal in ``on_train_end``: after the last step, while ``fit`` is ending."""

    def __init__(self, name):
        self.name = name

    def on_train_end(self, trainer, pl_module):
        os.kill(os.getpid(), getattr(signal, self.name))


@pytest.mark.parametrize(("name", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_as_fit_ends_stops_the_run_before_the_final_evaluation(tmp_path, monkeypatch, capsys, name, status):
    callbacks = train.checkpoint_callbacks
    monkeypatch.setattr(train, "checkpoint_callbacks", lambda *args: [*callbacks(*args), SignalAtTrainEnd(name)])
    with pytest.raises(SystemExit) as stopped:
        grass_train(monkeypatch, tmp_path / "out", "ckpt_every_n_steps=5")
    assert stopped.value.code == status
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"stopped by {name} as training ended (step 2), before the final evaluation; resume with ckpt_path=last "
        f"paths.output_dir={tmp_path / 'out'}"
    )
    assert torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_max_steps_0_says_that_nothing_was_trained(tmp_path, monkeypatch, capsys):
    grass_train(monkeypatch, tmp_path / "out", "trainer.max_steps=0")
    assert "  optimizer steps   0: nothing was trained; model/ holds the base model" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["optimizer_steps"] == 0


@pytest.mark.parametrize(
    ("metrics", "why"),
    [
        ({"train/loss": math.nan, "skipped_non_finite_steps": [1, 2, 3]}, "the last training loss is nan"),
        ({"train/loss": 0.5, "skipped_non_finite_steps": [1, 2, 3, 4]}, "4 of 6 optimizer steps were skipped"),
        ({"train/loss": 0.5, "skipped_non_finite_steps": [1, 2, 3]}, None),
    ],
)
def test_a_run_whose_last_loss_is_not_finite_diverged(metrics, why):
    diverged = train._divergence({"non_finite_tensors": 0, "optimizer_steps": 6, **metrics})
    assert diverged == why or diverged.startswith(why)


class SavesOnAFullDisk:
    def save_pretrained(self, directory, state_dict=None):
        (Path(directory) / "config.json").write_text("{}")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_disk_that_fills_while_the_model_is_written_keeps_the_old_model(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"previous weights")
    with pytest.raises(StorageError) as raised:
        replace_directory_atomically(model_dir, lambda staging: train._save_pretrained(SavesOnAFullDisk(), staging))
    assert str(raised.value).startswith(f"cannot write {model_dir}")
    assert "No space left on device" in str(raised.value)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (model_dir / "model.safetensors").read_bytes() == b"previous weights"


def test_grass_fsdp_on_one_process_trains_and_saves_a_model_that_reloads(tmp_path, monkeypatch):
    with mock.patch.dict(os.environ):  # Lightning sets MASTER_ADDR and MASTER_PORT for the process group
        try:
            grass_train(monkeypatch, tmp_path / "fsdp", "strategy=grass_fsdp")
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    metrics = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 2 and metrics["non_finite_tensors"] == 0
    saved = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    reloaded = CausalLMModule(pretrained_path=tmp_path / "fsdp" / "model")  # refuses a missing or misshapen tensor
    for name, weight in reloaded.model.state_dict().items():
        assert torch.equal(weight, saved[name]), name
    assert not any(isinstance(weight, DTensor) for weight in saved.values())
