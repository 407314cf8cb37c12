"""AtomicCheckpointIO: a save that fails keeps the previous checkpoint; a bad file is named with what is wrong."""

import errno
import os
import zipfile

import pytest
import torch
from conftest import TinyCausalLM, make_trainer, token_batches
from lightning.pytorch.callbacks import ModelCheckpoint
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_grass.app.checkpoints import check_resume_checkpoint
from lightning_grass.errors import CheckpointError, MissingPathError, StorageError
from lightning_grass.persistence import atomic_files
from lightning_grass.persistence.atomic_checkpoint_io import AtomicCheckpointIO, read_checkpoint


def fit(directory, max_steps, ckpt_path=None, module=None):
    module = module or TinyCausalLM()
    periodic = ModelCheckpoint(
        dirpath=directory, every_n_train_steps=2, save_top_k=0, save_last=True, enable_version_counter=False
    )
    trainer = make_trainer(
        max_steps=max_steps, enable_checkpointing=True, callbacks=[periodic], plugins=[AtomicCheckpointIO()]
    )
    # A stateful loader, so that a checkpoint in the middle of the epoch resumes at the right batch.
    trainer.fit(module, StatefulDataLoader(token_batches().dataset, batch_size=2), ckpt_path=ckpt_path)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    fit(directory, 2)
    return directory / "last.ckpt"


def test_a_save_that_fills_the_disk_keeps_the_previous_checkpoint_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    expected = fit(tmp_path / "uninterrupted", 6)

    real_fsync, calls = os.fsync, []

    def fsync_full_after_the_first_checkpoint(descriptor):
        calls.append(descriptor)
        # Each save fsyncs its file, then its directory: the third call is the second checkpoint's file.
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(descriptor)

    monkeypatch.setattr(atomic_files.os, "fsync", fsync_full_after_the_first_checkpoint)
    with pytest.raises(StorageError, match=r"cannot write .*last\.ckpt: No space left on device \([0-9,]+ bytes"):
        fit(tmp_path / "run", 6)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last.ckpt"], "no temporary file is left"
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["global_step"] == 2

    resumed = fit(tmp_path / "run", 6, ckpt_path=tmp_path / "run" / "last.ckpt")
    for (name, weight), (_, other) in zip(expected.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(weight, other), name


def test_a_checkpoint_round_trips(checkpoint):
    loaded = AtomicCheckpointIO().load_checkpoint(checkpoint)
    assert loaded["global_step"] == 2
    assert loaded["state_dict"].keys() == TinyCausalLM().state_dict().keys()


def test_an_empty_checkpoint_is_named(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"^checkpoint {path} is empty \\(0 bytes\\): the save that wrote it"):
        read_checkpoint(path)


def test_a_truncated_checkpoint_is_named(tmp_path, checkpoint):
    path = tmp_path / "last.ckpt"
    path.write_bytes(checkpoint.read_bytes()[: 282_624 // 100])
    with pytest.raises(CheckpointError, match=f"^checkpoint {path} is truncated \\(2,826 bytes, the end of the"):
        read_checkpoint(path)


# torch's zip reader fails on some cut points with OSError EINVAL: here 1% and 10% of 545 KB (5 and 55 KB), and
# half of grass-train's 134 KB scratch_llama checkpoint.
@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.2, 0.5, 0.9, 0.999])
def test_a_checkpoint_cut_at_any_point_is_named_truncated(tmp_path, checkpoint, fraction, mmap):
    data = checkpoint.read_bytes()
    path = tmp_path / "last.ckpt"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError) as raised:
        read_checkpoint(path, mmap=mmap)
    size = path.stat().st_size
    assert str(raised.value) == f"checkpoint {path} is truncated ({size:,} bytes, the end of the archive is missing)"


def test_a_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_text("hello\n")
    with pytest.raises(CheckpointError, match=f"^checkpoint {path} is not a checkpoint \\(6 bytes, not a torch.save"):
        read_checkpoint(path)


def test_a_foreign_zip_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    with pytest.raises(CheckpointError, match=r"is a zip archive but not a torch.save file \(it holds \['notes.txt'\]"):
        read_checkpoint(path)


def test_a_torch_file_that_is_not_a_lightning_checkpoint_is_named(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError) as raised:
        read_checkpoint(path)
    assert str(raised.value) == (
        f"checkpoint {path} is a torch file but not a Lightning checkpoint: it lacks ['state_dict', "
        "'pytorch-lightning_version'] (it holds ['weight'])"
    )


def test_a_checkpoint_without_a_global_step_loads_as_in_lightning(tmp_path, checkpoint):
    path = tmp_path / "no_step.ckpt"
    content = torch.load(checkpoint, weights_only=True)
    del content["global_step"]
    torch.save(content, path)
    assert read_checkpoint(path).keys() == content.keys()


def test_a_missing_checkpoint_is_named_in_lightnings_words(tmp_path):
    with pytest.raises(MissingPathError) as raised:
        read_checkpoint("not existing")
    assert isinstance(raised.value, FileNotFoundError)
    assert str(raised.value) == "Checkpoint file not found: not existing"


def test_a_checkpoint_of_another_model_shape_names_a_mismatched_tensor(checkpoint):
    assert check_resume_checkpoint(checkpoint, TinyCausalLM()) == 2
    with pytest.raises(CheckpointError, match=r"holds another model: it has tensors this model lacks, e.g. \["):
        check_resume_checkpoint(checkpoint, TinyCausalLM(num_layers=2))
    wider = TinyCausalLM()
    wider.model.lm_head = torch.nn.Linear(32, 80, bias=False)
    with pytest.raises(CheckpointError, match=r"model.lm_head.weight is \[64, 32\] in the checkpoint and \[80, 32\]"):
        check_resume_checkpoint(checkpoint, wider)
