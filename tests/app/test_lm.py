import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import MODULE_CONFIG as CONFIG
from conftest import make_trainer
from lightning.pytorch.callbacks import Callback
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tolerances import FP32_UNIT_ROUNDOFF, fp32_sum_rtol
from torch.nn import functional
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from lightning_grass import GRASSStrategy
from lightning_grass.app.lm import CausalLMModule, warmup_cosine
from lightning_grass.errors import DataFormatError, MissingPathError, SettingTypeError, SettingValueError
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


def test_a_tokenizer_without_a_pad_token_pads_with_its_eos_token(module, tmp_path):
    from lightning_grass.app.data import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    eos = tokenizer.eos_token_id
    tokenizer.pad_token = None  # as Llama-2's tokenizer is saved
    module.tokenizer = tokenizer
    module.save_pretrained(tmp_path / "model")
    reloaded = CausalLMModule(pretrained_path=tmp_path / "model")
    assert reloaded.tokenizer.pad_token_id == eos


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (-1, SettingValueError, "lr=-1 must be a finite number > 0, such as 2e-5"),
        (0, SettingValueError, "lr=0 must be a finite number > 0, such as 2e-5"),
        (math.nan, SettingValueError, "lr=nan must be a finite number > 0, such as 2e-5"),
        (math.inf, SettingValueError, "lr=inf must be a finite number > 0, such as 2e-5"),
        ("abc", SettingTypeError, "lr='abc' must be a finite number > 0, such as 2e-5"),
        (True, SettingTypeError, "lr=True must be a finite number > 0, such as 2e-5"),
    ],
)
def test_a_learning_rate_that_is_not_a_finite_positive_number_is_refused_at_construction(value, error, message):
    with pytest.raises(error) as refused:
        CausalLMModule(config=CONFIG, lr=value)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("setting", "error", "message"),
    [
        ({"weight_decay": math.nan}, SettingValueError, "weight_decay=nan must be a finite number >= 0"),
        ({"weight_decay": -0.1}, SettingValueError, "weight_decay=-0.1 must be a finite number >= 0"),
        ({"min_lr_ratio": 1.5}, SettingValueError, "min_lr_ratio=1.5 must be a finite number in [0, 1]"),
        ({"min_lr_ratio": "low"}, SettingTypeError, "min_lr_ratio='low' must be a finite number in [0, 1]"),
        (
            {"betas": (0.9, 1.0)},
            SettingValueError,
            "betas=[0.9, 1.0] must be two numbers in [0, 1), such as [0.9, 0.95]",
        ),
        (
            {"betas": [0.9, math.nan]},
            SettingValueError,
            "betas=[0.9, nan] must be two numbers in [0, 1), such as [0.9, 0.95]",
        ),
        ({"betas": 0.9}, SettingValueError, "betas=0.9 must be two numbers in [0, 1), such as [0.9, 0.95]"),
        ({"warmup_steps": "10"}, SettingTypeError, "warmup_steps='10' must be an integer >= 0"),
        ({"warmup_steps": math.nan}, SettingTypeError, "warmup_steps=nan must be an integer >= 0"),
        ({"warmup_steps": 2.5}, SettingTypeError, "warmup_steps=2.5 must be an integer >= 0"),
        ({"warmup_steps": -1}, SettingValueError, "warmup_steps=-1 must be an integer >= 0"),
        ({"max_new_tokens": 0}, SettingValueError, "max_new_tokens=0 must be an integer >= 1"),
        ({"eval_examples": math.nan}, SettingTypeError, "eval_examples=nan must be an integer >= 0"),
        ({"gradient_checkpointing": "yes"}, SettingTypeError, "gradient_checkpointing='yes' must be True or False"),
        ({"validation_exact_match": 1}, SettingTypeError, "validation_exact_match=1 must be True or False"),
        (
            {"answer_pattern": "####"},
            SettingValueError,
            r"answer_pattern='####' has no group; its first group is the answer, e.g. '####\s*(\S+)'",
        ),
        (
            {"answer_pattern": "(#"},
            SettingValueError,
            "answer_pattern='(#' is not a regular expression: missing ), unterminated subpattern at position 0",
        ),
        (
            {"config": {**CONFIG, "model_type": "lama"}},
            SettingValueError,
            f"config: model_type='lama' is not a model type that transformers {transformers.__version__} knows, "
            "such as 'llama'",
        ),
    ],
)
def test_every_other_setting_is_checked_at_construction(setting, error, message):
    with pytest.raises(error) as refused:
        CausalLMModule(**{"config": CONFIG, **setting})
    assert str(refused.value) == message


def test_settings_are_checked_before_the_model_is_loaded(tmp_path):
    with pytest.raises(SettingValueError, match=r"^lr=nan must be"):
        CausalLMModule(pretrained_path=tmp_path / "nothing", lr=math.nan)


@pytest.fixture
def model_dir(tmp_path, tiny_pretrained_dir):
    """A copy of the tiny saved model that a test may damage."""
    return shutil.copytree(tiny_pretrained_dir, tmp_path / "model")


def test_a_missing_model_directory_says_what_is_expected(tmp_path, model_dir):
    with pytest.raises(MissingPathError) as missing:
        CausalLMModule(pretrained_path=tmp_path / "nothing")
    assert str(missing.value) == (
        f"pretrained_path='{tmp_path / 'nothing'}' does not exist: point it at a directory written by "
        "save_pretrained (models are never downloaded)"
    )
    with pytest.raises(MissingPathError, match=r"^pretrained_path='.*config.json' is a file, not a directory: "):
        CausalLMModule(pretrained_path=model_dir / "config.json")
    (model_dir / "config.json").unlink()
    with pytest.raises(MissingPathError) as missing:
        CausalLMModule(pretrained_path=model_dir)
    assert str(missing.value) == (
        f"pretrained_path='{model_dir}' has no config.json: point it at a directory written by save_pretrained "
        "(models are never downloaded)"
    )
    with pytest.raises(SettingValueError, match="needs a 'model_type'"):
        CausalLMModule(config={"num_hidden_layers": 2})


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (
            b'{"model_type": "llama",',
            "line 1, column 24: invalid JSON: Expecting property name enclosed in double quotes",
        ),
        (b"", "line 1, column 1: invalid JSON: Expecting value"),
    ],
)
def test_a_corrupt_config_json_is_named_with_where_it_breaks(model_dir, content, problem):
    config_file = model_dir / "config.json"
    config_file.write_bytes(content)
    with pytest.raises(DataFormatError) as corrupt:
        CausalLMModule(pretrained_path=model_dir)
    assert str(corrupt.value) == f"{config_file}, {problem}; config.json is corrupt or truncated: save the model again"
    assert isinstance(corrupt.value.__cause__, json.JSONDecodeError)


def test_a_config_json_that_is_not_a_model_config_is_named(model_dir):
    config_file = model_dir / "config.json"
    config_file.write_bytes(b"\xff\xfe{}")
    with pytest.raises(DataFormatError) as corrupt:
        CausalLMModule(pretrained_path=model_dir)
    assert str(corrupt.value) == f"{config_file}: not UTF-8 text (byte 0); config.json is corrupt: save the model again"
    config_file.write_text('{"hidden_size": 32}')
    with pytest.raises(DataFormatError) as corrupt:
        CausalLMModule(pretrained_path=model_dir)
    assert str(corrupt.value) == f"{config_file} has no 'model_type': it is not a config written by save_pretrained"
    config_file.write_text('{"model_type": "lama"}')
    with pytest.raises(DataFormatError) as unknown:
        CausalLMModule(pretrained_path=model_dir)
    assert str(unknown.value) == (
        f"{config_file}: model_type='lama' is not a model type that transformers {transformers.__version__} knows, "
        "such as 'llama'"
    )


def test_missing_weights_are_named(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(MissingPathError) as missing:
        CausalLMModule(pretrained_path=model_dir)
    assert str(missing.value) == (
        f"pretrained_path='{model_dir}' has no weights: expected one of ['model.safetensors', "
        "'model.safetensors.index.json', 'pytorch_model.bin', 'pytorch_model.bin.index.json']; point it at a "
        "directory written by save_pretrained (models are never downloaded)"
    )


@pytest.mark.parametrize("cut", ["in the tensors", "in the header", "empty"])
def test_truncated_weights_are_named(model_dir, cut):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: {"in the tensors": len(data) // 2, "in the header": 20, "empty": 0}[cut]])
    with pytest.raises(DataFormatError) as truncated:
        CausalLMModule(pretrained_path=model_dir)
    message = str(truncated.value)
    assert message.startswith(f"{weights}: unreadable safetensors weights (Error while deserializing header: ")
    assert message.endswith("); the file is truncated or not a safetensors file: save the model again")
    assert isinstance(truncated.value.__cause__, SafetensorError)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_truncated_tokenizer_file_is_named(model_dir, name):
    tokenizer_file = model_dir / name
    tokenizer_file.write_text(tokenizer_file.read_text()[:40])
    with pytest.raises(DataFormatError) as corrupt:
        CausalLMModule(pretrained_path=model_dir)
    assert str(corrupt.value).startswith(f"{tokenizer_file}, line ")
    assert str(corrupt.value).endswith(f"; {name} is corrupt or truncated: save the model again")
    assert isinstance(corrupt.value.__cause__, json.JSONDecodeError)


def test_a_tokenizer_error_that_no_file_explains_keeps_its_type(model_dir, monkeypatch):
    error = json.JSONDecodeError("Expecting value", "", 0)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(json.JSONDecodeError) as raised:
        CausalLMModule(pretrained_path=model_dir)
    assert raised.value is error


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


class DropoutSeen(Callback):
    """Whether every module was in training mode at each training batch, and that batch's loss."""

    def __init__(self):
        self.all_training, self.losses = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.all_training.append(all(module.training for module in pl_module.modules()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def test_a_loaded_model_fine_tunes_in_training_mode_with_its_dropout_on(tmp_path, tiny_pretrained_dir):
    config = AutoConfig.from_pretrained(tiny_pretrained_dir)
    config.attention_dropout = 0.5
    transformers.AutoModelForCausalLM.from_pretrained(tiny_pretrained_dir, config=config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_pretrained_dir).save_pretrained(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not reference.training, "from_pretrained returns the model in eval mode"
    row = torch.arange(1, 11)
    batch = {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row}
    with torch.no_grad():
        eval_loss = reference(**{key: value[None] for key, value in batch.items()}).loss.item()

    module = CausalLMModule(pretrained_path=tmp_path)
    assert [name for name, m in module.named_modules() if not m.training] == []
    seen = DropoutSeen()
    torch.manual_seed(0)  # the dropout masks
    make_trainer(max_steps=1, callbacks=[seen]).fit(module, train_dataloaders=DataLoader([batch], 1))
    assert seen.all_training == [True]
    # The first step's weights are the checkpoint's: only attention dropout (p=0.5) can move its loss.
    assert abs(seen.losses[0] - eval_loss) > 1e-3 * eval_loss


def _refuse_loading_weights(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the weights were read before the tokenizer was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)


@pytest.mark.parametrize("kept", [[], ["tokenizer_config.json"]])
def test_a_directory_without_a_tokenizer_is_named_before_the_weights_are_read(model_dir, monkeypatch, kept):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if name not in kept:
            (model_dir / name).unlink()
    _refuse_loading_weights(monkeypatch)
    with pytest.raises(MissingPathError) as missing:
        CausalLMModule(pretrained_path=model_dir)
    holds = kept or "none"
    assert str(missing.value) == (
        f"pretrained_path='{model_dir}' has no tokenizer: it holds {holds} of ['tokenizer.json', "
        "'tokenizer_config.json', 'tokenizer.model', 'vocab.json'], and a tokenizer is read from tokenizer.json (or "
        "the tokenizer.model or vocab.json of a slow one) beside tokenizer_config.json; save the model's tokenizer "
        "into it with tokenizer.save_pretrained"
    )


def test_tokenizer_files_that_transformers_cannot_read_are_named_in_one_line(model_dir, monkeypatch):
    (model_dir / "tokenizer.json").unlink()
    (model_dir / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    _refuse_loading_weights(monkeypatch)
    with pytest.raises(DataFormatError) as unreadable:
        CausalLMModule(pretrained_path=model_dir)
    message = str(unreadable.value)
    assert message.startswith(
        f"pretrained_path='{model_dir}': transformers cannot build a tokenizer from its ['tokenizer_config.json', "
        "'tokenizer.model'] ("
    )
    assert message.endswith("); save the model's tokenizer into it with tokenizer.save_pretrained")
    assert "\n" not in message


def _edit_config(model_dir, **changes):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **changes}))


def test_a_config_whose_sizes_do_not_match_the_weights_names_the_first_tensor_that_differs(model_dir):
    _edit_config(model_dir, intermediate_size=128)
    with pytest.raises(DataFormatError) as mismatch:
        CausalLMModule(pretrained_path=model_dir)
    assert str(mismatch.value) == (
        f"pretrained_path='{model_dir}': its weights do not fit the sizes in config.json: "
        "model.layers.0.mlp.gate_proj.weight is [64, 32] in the weights but [128, 32] in the model config.json "
        "describes (6 of 21 tensors differ); config.json was edited or comes from another model: restore it, or save "
        "the model again with save_pretrained"
    )


def _rename_weights(model_dir, rename):
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    save_file({rename(name): tensor for name, tensor in tensors.items()}, weights, metadata={"format": "pt"})


def test_weights_saved_under_other_names_are_refused_not_replaced_by_random_ones(model_dir):
    _rename_weights(model_dir, lambda name: f"base_model.{name}")
    with pytest.raises(DataFormatError) as refused:
        CausalLMModule(pretrained_path=model_dir)
    assert str(refused.value) == (
        f"pretrained_path='{model_dir}': 21 of the 21 tensors of the LlamaForCausalLM that config.json describes are "
        "missing from its weights, such as ['model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.weight', "
        "'model.layers.0.self_attn.k_proj.weight'], and the weights hold 21 tensors it does not use, such as "
        "['base_model.lm_head.weight', 'base_model.model.embed_tokens.weight', "
        "'base_model.model.layers.0.input_layernorm.weight']; they were saved under other names (a prefix such as "
        "'base_model.') or from another model family than config.json's model_type='llama': save the model with "
        "save_pretrained of the model itself (for peft, merge_and_unload first)"
    )


def test_weights_of_another_model_family_are_refused(model_dir):
    _edit_config(model_dir, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(DataFormatError) as refused:
        CausalLMModule(pretrained_path=model_dir)
    # Only lm_head.weight has the same name and shape in both families.
    assert str(refused.value) == (
        f"pretrained_path='{model_dir}': 28 of the 29 tensors of the GPT2LMHeadModel that config.json describes are "
        "missing from its weights, such as ['transformer.wte.weight', 'transformer.wpe.weight', "
        "'transformer.h.0.ln_1.weight'], and the weights hold 20 tensors it does not use, such as "
        "['model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight', "
        "'model.layers.0.mlp.down_proj.weight']; they were saved under other names (a prefix such as 'base_model.') "
        "or from another model family than config.json's model_type='gpt2': save the model with save_pretrained of "
        "the model itself (for peft, merge_and_unload first)"
    )


@pytest.fixture
def tied_model_dir(tmp_path, tiny_pretrained_dir):
    """A tiny Llama whose output layer shares the input embedding: save_pretrained writes the embedding once."""
    config = AutoConfig.from_pretrained(tiny_pretrained_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    AutoTokenizer.from_pretrained(tiny_pretrained_dir).save_pretrained(tmp_path / "tied")
    return tmp_path / "tied"


def test_a_tied_output_layer_is_not_missing_unless_the_embedding_it_shares_is(tied_model_dir):
    assert "lm_head.weight" not in load_file(tied_model_dir / "model.safetensors")
    model = CausalLMModule(pretrained_path=tied_model_dir).model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = load_file(tied_model_dir / "model.safetensors")["model.embed_tokens.weight"]
    _rename_weights(tied_model_dir, lambda name: "lm_head.weight" if name == "model.embed_tokens.weight" else name)
    model = CausalLMModule(pretrained_path=tied_model_dir).model  # the shared tensor, under the output layer's name
    assert (
        torch.equal(model.model.embed_tokens.weight, embedding)
        and model.lm_head.weight is model.model.embed_tokens.weight
    )
    _rename_weights(tied_model_dir, lambda name: "unused.weight" if name == "lm_head.weight" else name)
    with pytest.raises(DataFormatError) as refused:
        CausalLMModule(pretrained_path=tied_model_dir)
    assert str(refused.value).startswith(
        f"pretrained_path='{tied_model_dir}': 2 of the 21 tensors of the LlamaForCausalLM that config.json describes "
        "are missing from its weights, such as ['model.embed_tokens.weight', 'lm_head.weight'], and the weights hold "
        "1 tensor it does not use, such as ['unused.weight']; "
    )


def test_tensors_the_model_does_not_have_are_ignored_with_a_warning(model_dir):
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "value_head.weight": torch.zeros(1, 32)}, weights, metadata={"format": "pt"})
    verbosity = transformers.logging.get_verbosity()
    with pytest.warns(UserWarning) as warned:
        module = CausalLMModule(pretrained_path=model_dir)
    assert [str(w.message) for w in warned if "ignoring" in str(w.message)] == [
        f"pretrained_path='{model_dir}': ignoring 1 tensor of the weights that the LlamaForCausalLM does not have, "
        "such as ['value_head.weight']"
    ]
    assert torch.equal(module.model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"])
    assert transformers.logging.get_verbosity() == verbosity


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_a_model_file_without_read_permission_is_named(tmp_path, tiny_pretrained_dir, monkeypatch, name):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_pretrained_dir, model_dir)
    unreadable = model_dir / name
    opened = Path.open

    # Simulated: the tests run as root, which chmod 000 does not stop.
    def refusing_open(self, *args, **kwargs):
        if self == unreadable:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)
    with pytest.raises(MissingPathError) as raised:
        CausalLMModule(pretrained_path=model_dir)
    assert str(raised.value) == (
        f"{unreadable} is not readable (Permission denied): give the user running this read permission on it "
        "(chmod a+r), or point to a readable copy"
    )
