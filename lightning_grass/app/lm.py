"""``CausalLMModule``: a LightningModule that fine-tunes any Hugging Face causal LM on instruction data."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lightning_grass.app.data import DEFAULT_ANSWER_PATTERN
from lightning_grass.app.evaluation import exact_match
from lightning_grass.app.lora import apply_lora, save_merged
from lightning_grass.errors import MissingPathError, SettingValueError

IGNORE_INDEX = -100

#: The weight dtypes ``CausalLMModule(dtype=...)`` accepts.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CausalLMModule(pl.LightningModule):
    """Fine-tune a Hugging Face causal LM with AdamW, linear warm-up and cosine decay.

    The model comes from a local directory (``pretrained_path``, loaded with ``from_pretrained`` and
    ``local_files_only=True``: nothing is downloaded) or, for tiny test models, from a config dict
    (``config``, with ``model_type`` such as ``"llama"``). The loss covers response tokens only: the data
    marks prompt tokens with -100 in ``labels``.

    Validation logs ``val/loss``, ``val/token_accuracy`` (micro-averaged over response tokens, padding and
    prompt ignored), ``val/perplexity`` (exp of the token-weighted mean NLL) and, when the datamodule has
    validation examples with answers, ``val/exact_match`` of the final answer in greedy generations.

    Args:
        pretrained_path: Local directory of a saved model and tokenizer.
        config: Model config dict for building from scratch, used when ``pretrained_path`` is ``None``.
        lr: Peak learning rate.
        betas: AdamW betas.
        weight_decay: AdamW weight decay; never applied to norms and biases (parameters with < 2 dims).
        warmup_steps: Linear warm-up steps; then cosine decay to ``min_lr_ratio * lr`` at the last step.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        gradient_checkpointing: Recompute activations in backward (non-reentrant, so frozen leading layers
            work).
        answer_pattern: Regular expression whose first group is the final answer in generated text.
        max_new_tokens: Longest generation for exact match.
        eval_examples: How many validation examples are generated for exact match at each validation.
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
        lora: dict[str, Any] | None = None,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = None
        if dtype is not None and dtype not in DTYPES:
            raise SettingValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)} or null")
        if pretrained_path is not None:
            path = Path(pretrained_path)
            if not (path / "config.json").is_file():
                raise MissingPathError(
                    f"pretrained_path={str(path)!r} has no config.json: point it at a directory written by "
                    "save_pretrained (models are never downloaded)"
                )
            self.model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=DTYPES[dtype] if dtype else "auto"
            )
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        elif config is not None:
            settings = dict(config)
            model_type = settings.pop("model_type", None)
            if model_type is None:
                raise SettingValueError(f"config={config!r} needs a 'model_type' such as 'llama'")
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
        """Log token accuracy, perplexity and, when there are answers, exact match."""
        self.log("val/token_accuracy", self.val_token_accuracy.compute())
        self.log("val/perplexity", torch.exp(self.val_nll.compute()))
        self.val_token_accuracy.reset()
        self.val_nll.reset()
        examples = getattr(self.trainer.datamodule, "val_examples", None) if self.trainer.datamodule else None
        if examples and self.tokenizer is not None and not self.trainer.sanity_checking:
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

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the model and its tokenizer with ``save_pretrained`` so ``from_pretrained`` reloads both.

        LoRA adapters are merged into a copy of the base weights, so the directory holds a plain model.
        """
        directory = Path(directory)
        if self.hparams.lora is not None:
            save_merged(self.model, directory)
        else:
            self.model.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        return directory


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
