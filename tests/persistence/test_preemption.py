"""``CheckpointOnSigterm``: SIGTERM mid-epoch writes a checkpoint at the end of that step; resuming is exact."""

import os
import signal

import pytest
import torch
from conftest import VOCAB, TinyCausalLM, make_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

from lightning_grass import GRASSCallback, GRASSStrategy
from lightning_grass.persistence.preemption import CheckpointOnSigterm


class SigtermAtStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *unused):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def loader():
    tokens = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(1))
    dataset = TensorDataset(tokens)
    # 8 batches per epoch, shuffled by a generator that the loader's state covers.
    return StatefulDataLoader(dataset, batch_size=2, sampler=RandomSampler(dataset, generator=torch.Generator()))


def fit(tmp_path, max_steps, extra_callbacks=(), ckpt_path=None):
    module = TinyCausalLM()
    sampler = GRASSCallback(probe_steps=2, sample_every=3, seed=0)
    trainer = make_trainer(
        max_steps=max_steps,
        strategy=GRASSStrategy(offload="cpu"),
        enable_checkpointing=True,
        callbacks=[sampler, CheckpointOnSigterm(tmp_path / "last.ckpt"), *extra_callbacks],
    )
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return module, sampler


def test_sigterm_saves_the_step_it_arrived_in_and_the_run_resumes_bit_exactly(tmp_path):
    expected, expected_sampler = fit(tmp_path / "reference", 12)

    with pytest.raises(SIGTERMException):
        fit(tmp_path, 12, [SigtermAtStep(5)])
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 5, "step 5 of 8 in the first epoch"

    resumed, resumed_sampler = fit(tmp_path, 12, ckpt_path=tmp_path / "last.ckpt")
    assert resumed_sampler.history == expected_sampler.history
    for (name, weight), (_, other) in zip(expected.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(weight, other), name


def test_without_sigterm_nothing_is_written(tmp_path):
    fit(tmp_path, 3)
    assert not (tmp_path / "last.ckpt").exists()
