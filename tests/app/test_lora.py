"""The LoRA baseline: peft adapters on every linear layer, frozen base weights, a plain merged save."""

import math

import pytest
import torch
from conftest import MODULE_CONFIG as CONFIG
from conftest import make_trainer
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightning_grass.app.lm import CausalLMModule
from lightning_grass.app.lora import apply_lora
from lightning_grass.errors import SettingTypeError, SettingValueError

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}


def batches(n=4):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (n * 2, 10), generator=generator)
    return DataLoader([{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids], 2)


def test_only_adapters_train_and_they_cover_every_linear_layer_but_the_head():
    torch.manual_seed(0)
    module = CausalLMModule(config=CONFIG, lora=LORA)
    trainable = {name: p.numel() for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    # per layer: q, k, v, o are 32x32, gate and up 32->64, down 64->32; rank 4 adds 4 * (in + out) each
    per_layer = 4 * (4 * (32 + 32) + 2 * (32 + 64) + (64 + 32))
    assert sum(trainable.values()) == 2 * per_layer
    assert not any("lm_head" in name for name in trainable)


def test_training_changes_adapters_only_and_the_save_is_a_plain_merged_model(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(config=CONFIG, lora=LORA, lr=1e-2, warmup_steps=1)
    base_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    adapters_before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    make_trainer(max_steps=4).fit(module, train_dataloaders=batches())
    for name, parameter in module.named_parameters():
        if name in base_before:
            assert torch.equal(parameter, base_before[name]), name
    assert any(not torch.equal(p, adapters_before[n]) for n, p in module.named_parameters() if p.requires_grad)

    module.save_pretrained(tmp_path / "merged")
    assert isinstance(module.model, PeftModel), "saving merges a copy; the module keeps its adapters"
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    module.model.eval()
    with torch.no_grad():
        adapted = module.model(input_ids=ids).logits
        with module.model.disable_adapter():
            effect = (adapted - module.model(input_ids=ids).logits).abs().max()
        error = (merged(ids).logits - adapted).abs().max()
    # A merge that dropped the adapters or scaled them wrongly is off by a large part of their effect on the
    # logits; folding them into the weights only changes float32 roundings, orders of magnitude smaller.
    assert effect > 1e-2, "the adapters trained enough to tell a merged model from the base"
    assert error <= 1e-3 * effect


def test_unknown_lora_field_is_named():
    model = AutoModelForCausalLM.from_config(CausalLMModule(config=CONFIG).model.config)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\]"):
        apply_lora(model, {"rank": 8})


def test_rank_below_one_is_refused():
    model = AutoModelForCausalLM.from_config(CausalLMModule(config=CONFIG).model.config)
    with pytest.raises(ValueError, match=r"lora\.r=0 must be an integer >= 1"):
        apply_lora(model, {"r": 0})


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"r": True}, SettingTypeError, "lora.r=True must be an integer >= 1"),
        ({"r": "8"}, SettingTypeError, "lora.r='8' must be an integer >= 1"),
        ({"lora_alpha": math.nan}, SettingValueError, "lora.lora_alpha=nan must be a finite number > 0"),
        ({"lora_alpha": "16"}, SettingTypeError, "lora.lora_alpha='16' must be a finite number > 0"),
        ({"lora_dropout": 1.0}, SettingValueError, "lora.lora_dropout=1.0 must be a finite number in [0, 1)"),
        ("r=8", SettingTypeError, "lora='r=8' must be a dict of LoraConfig fields such as r and lora_alpha"),
    ],
)
def test_lora_numbers_are_checked_before_the_model_is_loaded(tmp_path, settings, error, message):
    with pytest.raises(error) as refused:
        CausalLMModule(pretrained_path=tmp_path / "nothing", lora=settings)
    assert str(refused.value) == message
