"""GRASSStrategy under a budget below its largest tensors: chunks of rows, bitwise no offload, refusals, resume."""

import copy

import pytest
import torch
from conftest import TinyCausalLM, make_trainer, token_batches
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_grass import GRASSCallback, GRASSStrategy
from lightning_grass.errors import SettingValueError
from lightning_grass.offload import device_bytes_while_stepped


def largest_third(optimizer_name, precision):
    """A third of what the largest tensor (the embedding) needs while stepped: it and its peers stream in chunks."""
    module = TinyCausalLM(optimizer=optimizer_name)
    optimizer = module.configure_optimizers()
    largest = max(module.parameters(), key=lambda p: p.numel())
    return device_bytes_while_stepped(optimizer, largest, master=precision == "bf16-true") // 3


def fit(
    strategy, precision="32-true", optimizer="adamw", max_steps=8, module=None, extra=(), ckpt_path=None, batches=8
):
    module = module or TinyCausalLM(weight_decay=0.1, optimizer=optimizer)
    callbacks = [GRASSCallback(mode="lisa", n_active=2, sample_every=2, seed=0), *extra]
    trainer = make_trainer(
        max_steps=max_steps,
        strategy=strategy,
        callbacks=callbacks,
        precision=precision,
        enable_checkpointing=bool(extra),
    )
    trainer.fit(module, token_batches(num_batches=batches), ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.parametrize(
    ("optimizer", "precision", "offload"),
    [
        ("adamw", "32-true", "cpu"),
        ("adamw", "32-true", "disk"),
        ("fused_adamw", "32-true", "cpu"),
        ("sgd", "32-true", "disk"),
        ("adamw", "bf16-true", "cpu"),
    ],
)
def test_tensors_larger_than_the_budget_stream_in_chunks_bitwise_as_without_offload(
    tmp_path, optimizer, precision, offload
):
    resident, _ = fit(GRASSStrategy(offload="none"), precision, optimizer)
    budget = largest_third(optimizer, precision)
    strategy = GRASSStrategy(offload=offload, offload_dir=tmp_path, max_resident_bytes=budget, offload_always_on=True)
    streamed, trainer = fit(strategy, precision, optimizer)
    store = trainer.strategy._offloaded.store
    chunked = {id(p) for p, rows in zip(store.params, store.rows, strict=True) if rows is not None}
    assert id(streamed.model.model.embed_tokens.weight) in chunked and id(streamed.model.lm_head.weight) in chunked
    # Four windows of two layers, every layer's and the always-on tensors' states streamed through the tier.
    for a, b in zip(resident.parameters(), streamed.parameters(), strict=True):
        assert torch.equal(a, b)
    stats = trainer.strategy.offload_stats
    assert 0 < stats["peak_resident_bytes"] <= budget and stats["bytes_to_device"] > 0


def test_a_run_with_chunks_resumes_bitwise(tmp_path):
    budget = largest_third("adamw", "32-true")

    def strategy():
        return GRASSStrategy(offload="cpu", max_resident_bytes=budget, offload_always_on=True)

    # Epochs of 3 batches, so that the checkpoint at step 3 ends an epoch and the data resume where they were.
    full, _ = fit(strategy(), max_steps=7, batches=3)
    checkpoints = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    fit(strategy(), max_steps=3, extra=[checkpoints], batches=3)  # the checkpoint holds the chunks' states, joined
    resumed, _ = fit(strategy(), max_steps=7, ckpt_path=tmp_path / "step=3.ckpt", batches=3)
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


class AdafactorLM(TinyCausalLM):
    def configure_optimizers(self):
        return torch.optim.Adafactor(self.parameters(), lr=self.lr)


def test_an_optimizer_that_is_not_elementwise_is_refused_below_its_largest_tensor_before_training():
    module = AdafactorLM()
    before = copy.deepcopy(module.state_dict())
    strategy = GRASSStrategy(offload="cpu", max_resident_bytes="4KiB", offload_always_on=True)
    with pytest.raises(SettingValueError) as refused:
        fit(strategy, module=module)
    message = str(refused.value)
    # The first of the largest tensors (64 x 32, counted as AdamW's state and temporaries), named with its bytes.
    assert message.startswith(
        "max_resident_bytes=4096 bytes (4.00 KiB) cannot hold model.model.layers.0.mlp.gate_proj.weight while it is "
        "stepped (32772 bytes"
    )
    assert message.endswith(
        "and Adafactor cannot step it in chunks of rows: only an elementwise update (Adam, AdamW, SGD) gives the "
        "same result on a chunk as on the whole tensor. Raise it to at least 32772 bytes, or use one of those "
        "optimizers"
    )
    assert all(torch.equal(before[name], p) for name, p in module.state_dict().items())
