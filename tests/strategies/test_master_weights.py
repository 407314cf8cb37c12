"""Half-precision weights under GRASSStrategy: fp32 masters in a Trainer, float16 refused, resume exact."""

import copy

import pytest
import torch
from conftest import TinyCausalLM, make_trainer, token_batches
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_grass import GRASSCallback, GRASSStrategy
from lightning_grass.offload import MASTER_KEY


def fit_bf16(strategy, callback=None, max_steps=6, module=None, **kwargs):
    module = module or TinyCausalLM(weight_decay=0.1)
    callbacks = [callback] if callback is not None else []
    trainer = make_trainer(max_steps=max_steps, strategy=strategy, callbacks=callbacks, precision="bf16-true", **kwargs)
    trainer.fit(module, token_batches())
    return module, trainer


def test_bf16_weights_are_stepped_on_fp32_masters_that_round_to_them():
    callback = GRASSCallback(mode="lisa", n_active=2, sample_every=2, seed=0)
    module, trainer = fit_bf16(GRASSStrategy(offload="none"), callback)
    state = trainer.optimizers[0].state
    trained = [p for p in module.parameters() if p in state]
    assert len(trained) > 3 * 9, "the always-on modules and several layers were trained"
    for p in trained:
        assert p.dtype == torch.bfloat16
        master = state[p][MASTER_KEY]
        assert master.dtype == torch.float32 and state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(p.detach(), master.to(torch.bfloat16))


def test_without_the_callback_bf16_weights_still_get_masters():
    module, trainer = fit_bf16(GRASSStrategy(), max_steps=2)
    state = trainer.optimizers[0].state
    assert all(state[p][MASTER_KEY].dtype == torch.float32 for p in module.parameters())


def test_master_weights_false_steps_bf16_directly():
    module, trainer = fit_bf16(GRASSStrategy(master_weights=False), max_steps=2)
    state = trainer.optimizers[0].state
    assert all(MASTER_KEY not in state[p] and state[p]["exp_avg"].dtype == torch.bfloat16 for p in module.parameters())


def test_float16_weights_are_refused_before_training():
    module = TinyCausalLM()
    before = copy.deepcopy(module.state_dict())
    trainer = make_trainer(max_steps=2, strategy=GRASSStrategy(), precision="16-true")
    with pytest.raises(
        ValueError, match=r"would train in float16 \(precision='16-true' converts .* Use precision='bf16"
    ):
        trainer.fit(module, token_batches())
    assert all(torch.equal(before[name], p) for name, p in module.state_dict().items())


def test_a_model_loaded_in_float16_is_refused_too():
    module = TinyCausalLM().to(torch.float16)
    with pytest.raises(ValueError, match=r"\(the model was loaded with float16 weights, for example 'model\.model"):
        make_trainer(max_steps=2, strategy=GRASSStrategy()).fit(module, token_batches())


def weight_update(precision, master_weights, lr=2e-5, steps=30):
    """The block weights' change over ``steps`` full fine-tuning steps, as float32, from the trained dtype's start."""
    module = TinyCausalLM(lr=lr, weight_decay=0.0)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    start = {name: p.detach().to(dtype).float().clone() for name, p in module.named_parameters() if "layers." in name}
    strategy = GRASSStrategy(offload="none", master_weights=master_weights)
    make_trainer(max_steps=steps, strategy=strategy, precision=precision).fit(module, token_batches())
    return torch.cat(
        [(p.detach().float() - start[name]).flatten() for name, p in module.named_parameters() if name in start]
    )


def test_bf16_with_masters_updates_like_fp32_at_a_fine_tuning_learning_rate():
    reference = weight_update("32-true", True)
    with_masters = weight_update("bf16-true", True)
    without = weight_update("bf16-true", False)
    cosine = torch.nn.functional.cosine_similarity
    # Measured here: 1.01x the fp32 update's norm with cosine 0.98 with masters; 0.46x and 0.45 without, where
    # updates smaller than half a bf16 step are rounded away.
    assert 0.9 <= with_masters.norm() / reference.norm() <= 1.1
    assert cosine(with_masters, reference, dim=0) >= 0.9
    assert without.norm() / reference.norm() < 0.9


def run_with_checkpoints(tmp_path, max_steps, resume_from=None, checkpoints=None):
    module = TinyCausalLM(weight_decay=0.1)
    callbacks = [GRASSCallback(probe_steps=2, sample_every=2, seed=0)]
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(checkpoints, filename="{step}", every_n_train_steps=3, save_top_k=-1))
    # Room for two of the largest tensors while stepped (gate_proj: 12N + 4 bytes of state and master, 4N of
    # master gradient, 8N of the for-loop AdamW's temporaries; N = 2048), less than a layer: they stream.
    strategy = GRASSStrategy(offload="disk", offload_dir=tmp_path / "offload", max_resident_bytes="100KiB")
    trainer = make_trainer(
        max_steps=max_steps,
        strategy=strategy,
        callbacks=callbacks,
        precision="bf16-true",
        enable_checkpointing=checkpoints is not None,
    )
    trainer.fit(module, token_batches(num_batches=3), ckpt_path=resume_from)
    return module


def test_resume_with_masters_streamed_through_the_disk_tier_is_bit_exact(tmp_path):
    full = run_with_checkpoints(tmp_path, 12, checkpoints=tmp_path / "ckpt")
    saved = torch.load(tmp_path / "ckpt" / "step=6.ckpt", weights_only=False)["optimizer_states"][0]["state"]
    assert all(state[MASTER_KEY].dtype == torch.float32 for state in saved.values())
    resumed = run_with_checkpoints(tmp_path, 12, resume_from=tmp_path / "ckpt" / "step=6.ckpt")
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters(), strict=True))
