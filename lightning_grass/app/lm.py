"""``CausalLMModule``: a LightningModule that fine-tunes any Hugging Face causal LM on instruction data."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import transformers
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from safetensors import SafetensorError, safe_open
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from lightning_grass.app.data import DEFAULT_ANSWER_PATTERN
from lightning_grass.app.data.utf8 import not_readable
from lightning_grass.app.evaluation import exact_match
from lightning_grass.app.input_errors import one_line
from lightning_grass.app.lora import apply_lora, check_lora_settings, save_merged
from lightning_grass.errors import (
    DataFormatError,
    InputError,
    MissingPathError,
    SettingTypeError,
    SettingValueError,
)
from lightning_grass.setting_checks import check_flag, check_int, check_number, is_number

IGNORE_INDEX = -100

#: The weight dtypes ``CausalLMModule(dtype=...)`` accepts.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: The weight files ``from_pretrained`` reads from a local directory, one of which must be there.
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)

#: The files a saved tokenizer is read from: ``tokenizer_config.json`` beside ``tokenizer.json`` (a fast
#: tokenizer, what ``save_pretrained`` writes) or the vocabulary of a slow one (``tokenizer.model``, ``vocab.json``).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

#: How many names of missing or unexpected tensors a message lists.
_NAMES_SHOWN = 3

_SAVED_MODEL_HINT = "point it at a directory written by save_pretrained (models are never downloaded)"


class CausalLMModule(pl.LightningModule):
    """Fine-tune a Hugging Face causal LM with AdamW, linear warm-up and cosine decay.

    The model comes from a local directory (``pretrained_path``, loaded with ``from_pretrained`` and
    ``local_files_only=True``: nothing is downloaded, and put in training mode, which ``from_pretrained`` does
    not leave it in) or, for tiny test models, from a config dict
    (``config``, with ``model_type`` such as ``"llama"``). The loss covers response tokens only: the data
    marks prompt tokens with -100 in ``labels``.

    Every setting is checked here, before a model is loaded: a learning rate that is not a finite number above
    0, a count given as text, a fraction or NaN, or NaN or infinity in any other number raises a
    :class:`~lightning_grass.errors.SettingValueError` or :class:`~lightning_grass.errors.SettingTypeError` that
    names the setting and the value. A model directory that is missing, holds no ``config.json``, weights or
    tokenizer, or whose ``config.json``, ``model.safetensors`` or tokenizer files are corrupt or truncated raises
    a :class:`~lightning_grass.errors.MissingPathError` or :class:`~lightning_grass.errors.DataFormatError` that
    names the file. So do weights that do not fill the model ``config.json`` describes: a tensor of another shape
    (a size edited in ``config.json``), or any tensor missing (weights saved under other names, such as with a
    ``base_model.`` prefix, or from another model family); a tied tensor, such as an output layer that shares the
    input embedding, is not missing when the tensor it shares is there. Tensors of the files that the model does
    not have are ignored, with a warning. The tokenizer is loaded before the weights, so a missing tokenizer
    is reported at once.

    Validation logs ``val/loss``, ``val/token_accuracy`` (micro-averaged over response tokens, padding and
    prompt ignored), ``val/perplexity`` (exp of the token-weighted mean NLL) and, when the datamodule has
    validation examples with answers, ``val/exact_match`` of the final answer in greedy generations.

    Args:
        pretrained_path: Local directory of a saved model and tokenizer.
        config: Model config dict for building from scratch, used when ``pretrained_path`` is ``None``.
        lr: Peak learning rate, a finite number > 0.
        betas: AdamW betas, two numbers in [0, 1).
        weight_decay: AdamW weight decay, a finite number >= 0; never applied to norms and biases (parameters
            with < 2 dims).
        warmup_steps: Linear warm-up steps (an integer >= 0); then cosine decay to ``min_lr_ratio * lr`` at the
            last step.
        min_lr_ratio: Final learning rate as a fraction of ``lr``, in [0, 1].
        gradient_checkpointing: Recompute activations in backward (non-reentrant, so frozen leading layers
            work).
        answer_pattern: Regular expression whose first group is the final answer in generated text.
        max_new_tokens: Longest generation for exact match, an integer >= 1.
        eval_examples: How many validation examples are generated for exact match at each validation, an
            integer >= 0.
        validation_exact_match: Whether each validation also generates for ``val/exact_match``; ``False``
            logs loss, token accuracy and perplexity only, for frequent validations of a learning curve.
        lora: ``peft.LoraConfig`` fields (``r``, ``lora_alpha``, ``target_modules``, ...) to train LoRA
            adapters instead of the model's own weights; ``None`` trains the weights.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the dtype the weights are loaded or built in.
            ``None`` (default) keeps a checkpoint's own dtype, and builds a config's model in float32. A
            bfloat16 checkpoint then trains in bfloat16 under any precision, and ``GRASSStrategy`` steps it on
            fp32 master weights.
    """

    def __init__(
        self,
        pretrained_path: str | os.PathLike | None = None,
        config: dict[str, Any] | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        answer_pattern: str = DEFAULT_ANSWER_PATTERN,
        max_new_tokens: int = 48,
        eval_examples: int = 64,
        validation_exact_match: bool = True,
        lora: dict[str, Any] | None = None,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        _check_optimizer_settings(lr, betas, weight_decay, warmup_steps, min_lr_ratio)
        _check_evaluation_settings(answer_pattern, max_new_tokens, eval_examples)
        check_flag("gradient_checkpointing", gradient_checkpointing)
        check_flag("validation_exact_match", validation_exact_match)
        if dtype is not None and dtype not in DTYPES:
            raise SettingValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)} or null")
        if lora is not None:
            check_lora_settings(lora)
        self.save_hyperparameters()
        self.tokenizer = None
        if pretrained_path is not None:
            # from_pretrained returns the model in eval mode, and Lightning's fit does not call train() (it only
            # warns about modules in eval mode): without this, dropout would stay off while fine-tuning.
            _check_model_directory(Path(pretrained_path))
            self.tokenizer = _load_tokenizer(Path(pretrained_path))
            self.model = _load_model(Path(pretrained_path), dtype).train()
        elif config is not None:
            if not isinstance(config, Mapping):
                raise SettingTypeError(f"config={config!r} must be a dict of model config fields")
            settings = dict(config)
            model_type = settings.pop("model_type", None)
            if model_type is None:
                raise SettingValueError(f"config={config!r} needs a 'model_type' such as 'llama'")
            unknown = _unknown_model_type(model_type)
            if unknown is not None:
                raise SettingValueError(f"config: {unknown}")
            self.model = AutoModelForCausalLM.from_config(
                AutoConfig.for_model(model_type, **settings), dtype=DTYPES[dtype or "float32"]
            )
        else:
            raise SettingValueError("CausalLMModule needs pretrained_path (a local directory) or config (a dict)")
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None:
            self.model = apply_lora(self.model, lora)
        vocab = self.model.config.vocab_size
        self.val_token_accuracy = MulticlassAccuracy(num_classes=vocab, average="micro", ignore_index=IGNORE_INDEX)
        self.val_nll = MeanMetric()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Causal-LM loss over response tokens."""
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Loss, token accuracy and token-weighted NLL over response tokens."""
        output = self.model(**batch)
        logits = output.logits[:, :-1]
        targets = batch["labels"][:, 1:]
        tokens = (targets != IGNORE_INDEX).sum()
        self.val_token_accuracy.update(logits.argmax(-1), targets)
        self.val_nll.update(output.loss.detach(), weight=tokens)
        self.log("val/loss", output.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def on_validation_epoch_end(self) -> None:
        """Log token accuracy, perplexity and, when there are answers and it is wanted, exact match."""
        self.log("val/token_accuracy", self.val_token_accuracy.compute())
        self.log("val/perplexity", torch.exp(self.val_nll.compute()))
        self.val_token_accuracy.reset()
        self.val_nll.reset()
        examples = getattr(self.trainer.datamodule, "val_examples", None) if self.trainer.datamodule else None
        wanted = self.hparams.validation_exact_match and not self.trainer.sanity_checking
        if examples and self.tokenizer is not None and wanted:
            score = exact_match(
                self.model,
                self.tokenizer,
                examples[: self.hparams.eval_examples],
                self.hparams.answer_pattern,
                self.hparams.max_new_tokens,
            )
            self.log("val/exact_match", score, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over all parameters (no decay on norms and biases), linear warm-up then cosine decay."""
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            warmup_cosine(
                self.hparams.warmup_steps, self.trainer.estimated_stepping_batches, self.hparams.min_lr_ratio
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the model and its tokenizer with ``save_pretrained`` so ``from_pretrained`` reloads both.

        LoRA adapters are merged into a copy of the base weights, so the directory holds a plain model.

        Args:
            directory: Where to write.
            state_dict: The model's full weights, where its parameters do not hold them (FSDP2 shards); by
                default the parameters themselves.
        """
        directory = Path(directory)
        if self.hparams.lora is not None:
            save_merged(self.model, directory)
        else:
            self.model.save_pretrained(directory, state_dict=state_dict)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        return directory


def _check_optimizer_settings(
    lr: object, betas: object, weight_decay: object, warmup_steps: object, min_lr_ratio: object
) -> None:
    """Refuse what AdamW or the schedule would fail on at fit start, or turn into NaN weights."""
    check_number("lr", lr, "> 0, such as 2e-5", lambda value: value > 0)
    pair = isinstance(betas, Sequence) and not isinstance(betas, str) and len(betas) == 2
    if not pair or not all(is_number(beta) and 0 <= beta < 1 for beta in betas):
        given = list(betas) if isinstance(betas, Sequence) and not isinstance(betas, str) else betas
        raise SettingValueError(f"betas={given!r} must be two numbers in [0, 1), such as [0.9, 0.95]")
    check_number("weight_decay", weight_decay, ">= 0", lambda value: value >= 0)
    check_int("warmup_steps", warmup_steps, minimum=0)
    check_number("min_lr_ratio", min_lr_ratio, "in [0, 1]", lambda value: 0 <= value <= 1)


def _check_evaluation_settings(answer_pattern: object, max_new_tokens: object, eval_examples: object) -> None:
    """Refuse an answer pattern that cannot capture an answer, and counts that are not integers in range."""
    if not isinstance(answer_pattern, str):
        raise SettingTypeError(f"answer_pattern={answer_pattern!r} must be a regular expression (a string)")
    try:
        groups = re.compile(answer_pattern).groups
    except re.error as error:
        raise SettingValueError(f"answer_pattern={answer_pattern!r} is not a regular expression: {error}") from error
    if groups < 1:
        raise SettingValueError(
            f"answer_pattern={answer_pattern!r} has no group; its first group is the answer, e.g. '####\\s*(\\S+)'"
        )
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_int("eval_examples", eval_examples, minimum=0)


def _unknown_model_type(model_type: object) -> str | None:
    """Why ``model_type`` cannot be built by this version of transformers, or ``None`` if it can."""
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return None
    return (
        f"model_type={model_type!r} is not a model type that transformers {transformers.__version__} knows, "
        "such as 'llama'"
    )


def _read_json(file: Path) -> Any:
    """The content of a JSON file, or a :class:`DataFormatError` that names the file and where it is broken."""
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataFormatError(
            f"{file}: not UTF-8 text (byte {error.start}); {file.name} is corrupt: save the model again"
        ) from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFormatError(
            f"{file}, line {error.lineno}, column {error.colno}: invalid JSON: {error.msg}; "
            f"{file.name} is corrupt or truncated: save the model again"
        ) from error


def _check_model_directory(path: Path) -> None:
    """Refuse a model directory that is missing, or lacks a ``config.json`` of a known model type or weights.

    Raises:
        MissingPathError: When ``path`` is not a directory, or has no ``config.json`` or no weights file.
        DataFormatError: When ``config.json`` is not JSON or names no ``model_type`` that transformers knows.
    """
    if not path.exists():
        raise MissingPathError(f"pretrained_path={str(path)!r} does not exist: {_SAVED_MODEL_HINT}")
    if not path.is_dir():
        raise MissingPathError(f"pretrained_path={str(path)!r} is a file, not a directory: {_SAVED_MODEL_HINT}")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise MissingPathError(f"pretrained_path={str(path)!r} has no {CONFIG_NAME}: {_SAVED_MODEL_HINT}")
    for name in (CONFIG_NAME, *WEIGHT_FILES, *TOKENIZER_FILES):
        _check_readable(path / name)
    config = _read_json(config_file)
    if not isinstance(config, dict) or "model_type" not in config:
        raise DataFormatError(f"{config_file} has no 'model_type': it is not a config written by save_pretrained")
    unknown = _unknown_model_type(config["model_type"])
    if unknown is not None:
        raise DataFormatError(f"{config_file}: {unknown}")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise MissingPathError(
            f"pretrained_path={str(path)!r} has no weights: expected one of {list(WEIGHT_FILES)}; {_SAVED_MODEL_HINT}"
        )


def _check_readable(file: Path) -> None:
    """Refuse a file of the model directory that this process may not read (a missing one is checked elsewhere)."""
    try:
        with file.open("rb"):
            pass
    except (FileNotFoundError, IsADirectoryError):
        return
    except PermissionError as error:
        raise not_readable(file, error) from error


@contextmanager
def _without_transformers_warnings() -> Iterator[None]:
    """Silence transformers' warnings in the block: :func:`_check_loading_info` reports what its load report says."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _load_model(path: Path, dtype: str | None) -> PreTrainedModel:
    """``from_pretrained`` of a checked model directory, refused unless the weights fill every tensor of the model.

    Raises:
        DataFormatError: For unreadable safetensors weights, or weights that :func:`_check_loading_info` refuses.
    """
    try:
        with _without_transformers_warnings():
            model, loading_info = AutoModelForCausalLM.from_pretrained(
                path,
                local_files_only=True,
                dtype=DTYPES[dtype] if dtype else "auto",
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported by _check_loading_info, which names the first one
            )
    except SafetensorError as error:
        raise DataFormatError(
            f"{_unreadable_safetensors(path)}: unreadable safetensors weights ({error}); the file is truncated or "
            "not a safetensors file: save the model again"
        ) from error
    _check_loading_info(path, model, loading_info)
    return model


def _expected_tensors(model: PreTrainedModel) -> list[str]:
    """The names of the tensors a checkpoint of ``model`` holds, in the model's order; tied ones named once."""
    parameters = [name for name, _ in model.named_parameters()]  # a parameter shared by two modules comes once
    every_parameter = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = [name for name in model.state_dict() if name not in every_parameter]  # the persistent ones
    return parameters + buffers


def _tensors(count: int) -> str:
    """``"1 tensor"`` or ``"<count> tensors"``."""
    return f"{count} tensor{'' if count == 1 else 's'}"


def _check_loading_info(path: Path, model: PreTrainedModel, loading_info: dict[str, Any]) -> None:
    """Refuse weights that left a tensor of ``model`` at its random initialisation; warn of unused ones.

    transformers fills a tensor whose shape differs from the file's, or that the files lack, with random values
    and goes on. A tied tensor (an output layer sharing the input embedding) is not reported missing when the
    tensor it shares was loaded.

    Args:
        path: The model directory, for messages.
        model: The model ``from_pretrained`` returned.
        loading_info: Its ``output_loading_info``: ``missing_keys``, ``unexpected_keys`` and ``mismatched_keys``
            (``(name, shape in the files, shape in the model)``).

    Raises:
        DataFormatError: For a tensor whose shape differs (the message names the first, in the model's order,
            with both shapes), or any missing tensor (the message gives how many of how many, and a few names
            of missing and of unexpected tensors).
    """
    order = {name: index for index, name in enumerate(model.state_dict())}
    mismatched = sorted(loading_info["mismatched_keys"], key=lambda item: order.get(item[0], len(order)))
    expected = _expected_tensors(model)
    if mismatched:
        name, stored, built = mismatched[0]
        raise DataFormatError(
            f"pretrained_path={str(path)!r}: its weights do not fit the sizes in {CONFIG_NAME}: {name} is "
            f"{list(stored)} in the weights but {list(built)} in the model {CONFIG_NAME} describes ({len(mismatched)} "
            f"of {len(expected)} tensors differ); {CONFIG_NAME} was edited or comes from another model: restore it, "
            "or save the model again with save_pretrained"
        )
    missing = sorted(loading_info["missing_keys"], key=lambda name: order.get(name, len(order)))
    unexpected = sorted(loading_info["unexpected_keys"])
    if missing:
        total = len(set(expected) | set(missing))
        unused = (
            f"{_tensors(len(unexpected))} it does not use, such as {unexpected[:_NAMES_SHOWN]}"
            if unexpected
            else "no other tensor"
        )
        raise DataFormatError(
            f"pretrained_path={str(path)!r}: {len(missing)} of the {total} tensors of the {type(model).__name__} "
            f"that {CONFIG_NAME} describes are missing from its weights, such as {missing[:_NAMES_SHOWN]}, and the "
            f"weights hold {unused}; they were saved under other names (a prefix such as 'base_model.') or from "
            f"another model family than {CONFIG_NAME}'s model_type={model.config.model_type!r}: save the model "
            "with save_pretrained of the model itself (for peft, merge_and_unload first)"
        )
    if unexpected:
        rank_zero_warn(
            f"pretrained_path={str(path)!r}: ignoring {_tensors(len(unexpected))} of the weights that the "
            f"{type(model).__name__} does not have, such as {unexpected[:_NAMES_SHOWN]}"
        )


def _unreadable_safetensors(path: Path) -> Path:
    """The first ``*.safetensors`` file in ``path`` whose header does not open, else ``path`` itself."""
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except SafetensorError:
            return file
    return path


def _load_tokenizer(path: Path) -> Any:
    """``AutoTokenizer.from_pretrained`` of a local directory; a corrupt JSON file in it is named.

    A tokenizer without a pad token (Llama-2's, for one) pads with its eos token: padding is masked out of
    attention and labels, so the choice changes no loss and no completion.

    Raises:
        DataFormatError: For a tokenizer file that is not JSON, or files that transformers cannot build a
            tokenizer from.
        MissingPathError: When the directory holds none of the vocabulary files of :data:`TOKENIZER_FILES`.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        for file in sorted(path.glob("*.json")):
            try:
                _read_json(file)
            except DataFormatError as corrupt:
                raise corrupt from error
        raise
    except (ValueError, OSError) as error:
        raise _tokenizer_error(path, error) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_error(path: Path, error: Exception) -> InputError:
    """Why transformers could not build a tokenizer from ``path``, in one line that names the files.

    Args:
        path: The model directory.
        error: What ``AutoTokenizer.from_pretrained`` raised.

    Returns:
        A :class:`MissingPathError` when no vocabulary file is there (transformers' own message then suggests
        installing sentencepiece, which would not help), else a :class:`DataFormatError` with its message.
    """
    present = [name for name in TOKENIZER_FILES if (path / name).is_file()]
    saved = "save the model's tokenizer into it with tokenizer.save_pretrained"
    if not set(present) - {"tokenizer_config.json"}:
        return MissingPathError(
            f"pretrained_path={str(path)!r} has no tokenizer: it holds {present or 'none'} of {list(TOKENIZER_FILES)}, "
            "and a tokenizer is read from tokenizer.json (or the tokenizer.model or vocab.json of a slow one) beside "
            f"tokenizer_config.json; {saved}"
        )
    return DataFormatError(
        f"pretrained_path={str(path)!r}: transformers cannot build a tokenizer from its {present} "
        f"({type(error).__name__}: {one_line(str(error))}); {saved}"
    )


def warmup_cosine(warmup_steps: int, total_steps: int | float, min_ratio: float = 0.1) -> Any:
    """LR multiplier: linear from 1/warmup to 1 over ``warmup_steps``, then cosine down to ``min_ratio``.

    Args:
        warmup_steps: Steps of linear warm-up.
        total_steps: Steps of the whole run (``trainer.estimated_stepping_batches``).
        min_ratio: Multiplier reached at ``total_steps``.

    Returns:
        A function of the step for ``LambdaLR``.
    """
    total = max(1, int(total_steps) if math.isfinite(total_steps) else warmup_steps + 1)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
