import math

import pytest
import torch
from conftest import MODULE_CONFIG as CONFIG
from conftest import make_trainer
from tolerances import FP32_UNIT_ROUNDOFF, fp32_sum_rtol
from torch.nn import functional
from torch.utils.data import DataLoader

from lightning_grass import GRASSStrategy
from lightning_grass.app.lm import CausalLMModule, warmup_cosine
from lightning_grass.offload import MASTER_KEY

# The model's loss and a hand-written cross-entropy reduce the same float32 logits with different kernels: a
# log-sum-exp over the vocabulary (an absolute error of at most (V + 2) u in the log, so a relative one as
# large while the NLL is at least 1, as for an untrained model) and a mean over the response tokens.
VOCAB = CONFIG["vocab_size"]
RESPONSE_TOKENS = 5
LOSS_RTOL = fp32_sum_rtol(VOCAB + RESPONSE_TOKENS, extra_operations=4)


@pytest.fixture
def module():
    torch.manual_seed(0)
    return CausalLMModule(config=CONFIG, weight_decay=0.1)


def masked_batch():
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, -100, 13, 14, -100, -100]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_loss_covers_response_tokens_only(module):
    batch = masked_batch()
    loss = module.training_step(batch, 0)
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    manual = functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    assert (targets != -100).sum() == RESPONSE_TOKENS and manual.item() > 1
    assert loss.item() == pytest.approx(manual.item(), rel=LOSS_RTOL)
    # Changing a prompt token's label target to -100 or not matters; changing masked positions' ids does not.
    batch["labels"][0, 1] = 6
    assert module.training_step(batch, 0).item() != pytest.approx(loss.item(), rel=LOSS_RTOL)


def test_validation_metrics_are_micro_token_accuracy_and_token_weighted_perplexity(module):
    batch = masked_batch()
    module.validation_step(batch, 0)
    logits = module.model(**batch).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    kept = targets != -100
    accuracy = (logits.argmax(-1)[kept] == targets[kept]).float().mean()
    nll = functional.cross_entropy(logits[kept], targets[kept])
    # Both accuracies are one float32 division of the same two integer counts.
    assert module.val_token_accuracy.compute().item() == accuracy.item()
    # The weighted mean adds a product and a division to the loss's rounding; exp turns the NLL's absolute
    # error (NLL times its relative error) into the perplexity's relative error.
    nll_rtol = LOSS_RTOL + 2 * FP32_UNIT_ROUNDOFF
    ppl_rtol = nll.item() * nll_rtol + 2 * FP32_UNIT_ROUNDOFF
    assert math.exp(module.val_nll.compute().item()) == pytest.approx(math.exp(nll.item()), rel=ppl_rtol)


def test_no_weight_decay_on_norms_and_biases(module):
    class FakeTrainer:
        estimated_stepping_batches = 100

    module.trainer = FakeTrainer()  # configure_optimizers reads the run length from the trainer
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))


def test_warmup_then_cosine_schedule():
    # Python float64 arithmetic: a few roundings of 1e-16 each, far inside pytest.approx's default 1e-6.
    multiplier = warmup_cosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert multiplier(0) == pytest.approx(0.1)
    assert multiplier(9) == pytest.approx(1.0)
    assert multiplier(10) == pytest.approx(1.0)
    assert multiplier(60) == pytest.approx(0.55)
    assert multiplier(110) == pytest.approx(0.1)


def test_save_pretrained_reloads_model_and_tokenizer(module, tmp_path):
    from lightning_grass.app.data import build_char_tokenizer

    module.tokenizer = build_char_tokenizer()
    module.save_pretrained(tmp_path / "model")
    reloaded = CausalLMModule(pretrained_path=tmp_path / "model")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(module.model(input_ids=ids).logits, reloaded.model(input_ids=ids).logits)
    text = "Tom has 5 apples.\n#### 5"
    assert reloaded.tokenizer.encode(text, add_special_tokens=False) == module.tokenizer.encode(
        text, add_special_tokens=False
    )


def test_missing_model_directory_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pretrained_path='.*nothing' has no config.json: .*never downloaded"):
        CausalLMModule(pretrained_path=tmp_path / "nothing")
    with pytest.raises(ValueError, match="needs a 'model_type'"):
        CausalLMModule(config={"num_hidden_layers": 2})


def test_dtype_keeps_a_checkpoints_own_or_casts_to_the_one_asked_for(tmp_path, tiny_pretrained_dir):
    CausalLMModule(pretrained_path=tiny_pretrained_dir, dtype="bfloat16").save_pretrained(tmp_path / "bf16")
    assert CausalLMModule(pretrained_path=tmp_path / "bf16").model.dtype == torch.bfloat16
    assert CausalLMModule(pretrained_path=tmp_path / "bf16", dtype="float32").model.dtype == torch.float32
    assert CausalLMModule(config=CONFIG).model.dtype == torch.float32
    assert CausalLMModule(config=CONFIG, dtype="bfloat16").model.dtype == torch.bfloat16
    with pytest.raises(
        ValueError, match=r"dtype='fp8' is not supported; use one of \['bfloat16', 'float16', 'float32'"
    ):
        CausalLMModule(config=CONFIG, dtype="fp8")


def test_a_bf16_checkpoint_trains_on_fp32_masters_under_the_default_precision(tmp_path, tiny_pretrained_dir):
    CausalLMModule(pretrained_path=tiny_pretrained_dir, dtype="bfloat16").save_pretrained(tmp_path / "bf16")
    module = CausalLMModule(pretrained_path=tmp_path / "bf16", warmup_steps=1)
    ids = torch.randint(1, 40, (4, 10), generator=torch.Generator().manual_seed(0))
    batches = DataLoader([{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids], 2)
    trainer = make_trainer(max_steps=2, strategy=GRASSStrategy())
    trainer.fit(module, train_dataloaders=batches)
    assert trainer.precision == "32-true"
    state = trainer.optimizers[0].state
    assert all(p.dtype == torch.bfloat16 and state[p][MASTER_KEY].dtype == torch.float32 for p in module.parameters())
