"""A learning rate whose update overflows float32 is refused in one line before the step; a lower one steps as torch."""

import pytest
import torch
from conftest import TinyCausalLM, make_trainer, token_batches
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_grass import GRASSCallback, GRASSStrategy
from lightning_grass.errors import SettingValueError

REFUSED = (
    "is too large: AdamW scales its first update by lr / (1 - beta1) = {scale}, beyond the largest float32 "
    "(3.4e+38), so torch cannot compute the step. Use a learning rate below 3.4e+37; fine-tuning uses about 1e-5 "
    "to 1e-3"
)


class HalvedLR(TinyCausalLM):
    """AdamW under a scheduler that halves the learning rate it was given."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit(module, strategy, callbacks=(), max_steps=2):
    trainer = make_trainer(max_steps=max_steps, strategy=strategy, callbacks=list(callbacks))
    trainer.fit(module, token_batches())
    return trainer


@pytest.mark.parametrize("offload", ["none", "cpu", "disk"])
def test_adamw_at_lr_1e38_is_refused_naming_the_learning_rate_before_any_update(tmp_path, offload):
    module = TinyCausalLM(lr=1e38)
    before = [p.detach().clone() for p in module.parameters()]
    strategy = GRASSStrategy(offload=offload, offload_dir=tmp_path if offload == "disk" else None)
    callback = GRASSCallback(mode="lisa", n_active=2, sample_every=2, seed=0)
    with pytest.raises(SettingValueError) as refused:
        fit(module, strategy, [callback])
    assert str(refused.value) == "lr=1e+38 (parameter group 0) " + REFUSED.format(scale="1e+39")
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert list(tmp_path.iterdir()) == [], "the disk tier's folder is deleted at teardown"


def test_a_scheduled_learning_rate_is_named_with_the_one_that_was_set():
    with pytest.raises(SettingValueError) as refused:
        fit(HalvedLR(lr=1e38), GRASSStrategy())
    assert str(refused.value) == (
        "lr=5e+37 (parameter group 0, scheduled from initial_lr=1e+38) " + REFUSED.format(scale="5e+38")
    )


def test_a_learning_rate_whose_update_fits_steps_as_lightnings_own_strategy_steps_it():
    # 3e37 / (1 - 0.9) = 3e38 fits in float32: the weights blow up as they do under SingleDeviceStrategy.
    reference = TinyCausalLM(lr=3e37)
    fit(reference, SingleDeviceStrategy(device="cpu"))
    module = TinyCausalLM(lr=3e37)
    fit(module, GRASSStrategy())
    assert not all(torch.isfinite(p).all() for p in module.parameters())
    for ours, theirs in zip(module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
