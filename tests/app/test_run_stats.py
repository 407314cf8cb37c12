"""``RunStats``: the validation-loss curve of a run, and what of it a checkpoint keeps."""

import torch
from conftest import MODULE_CONFIG, make_trainer
from torch.utils.data import DataLoader

from lightning_grass.app.lm import CausalLMModule
from lightning_grass.app.run_stats import RunStats


def batches(count, seed):
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(count):
        input_ids = torch.randint(3, MODULE_CONFIG["vocab_size"], (2, 8), generator=generator)
        labels = input_ids.clone()
        labels[:, :3] = -100
        data.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    return data


def test_each_validation_adds_its_step_and_loss_and_a_checkpoint_keeps_the_curve():
    torch.manual_seed(0)
    module = CausalLMModule(config=MODULE_CONFIG, warmup_steps=0, validation_exact_match=False)
    stats = RunStats()
    train, val = batches(6, seed=0), batches(2, seed=1)
    trainer = make_trainer(
        max_steps=6, val_check_interval=2, check_val_every_n_epoch=None, callbacks=[stats], limit_val_batches=2
    )
    trainer.fit(module, DataLoader(train, batch_size=None), DataLoader(val, batch_size=None))
    assert [step for step, _ in stats.validation_curve] == [2, 4, 6]
    # The last validation ran on the final weights: validating them again is the same computation on the same
    # batches, bit for bit.
    (again,) = trainer.validate(module, DataLoader(val, batch_size=None), verbose=False)
    assert stats.validation_curve[-1][1] == again["val/loss"]
    losses = [loss for _, loss in stats.validation_curve]
    assert losses[0] != losses[-1], "the weights changed between validations"

    restored = RunStats()
    restored.load_state_dict(stats.state_dict())
    assert restored.validation_curve == stats.validation_curve
