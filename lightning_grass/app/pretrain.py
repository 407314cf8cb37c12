"""Building the tiny pretrained base model that the default fine-tuning job starts from."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lightning_grass.app.base_cache import check_cache_writable
from lightning_grass.app.data import build_char_tokenizer, pretraining_corpus, vocabulary_config
from lightning_grass.app.lm import CausalLMModule
from lightning_grass.persistence.atomic_files import replace_directory_atomically
from lightning_grass.setting_checks import check_int, check_number


class PackedCorpus(Dataset):
    """Documents joined with EOS and cut into blocks of ``seq_len`` tokens; every token is a target."""

    def __init__(self, token_ids: list[int], seq_len: int) -> None:
        blocks = len(token_ids) // seq_len
        self.blocks = torch.tensor(token_ids[: blocks * seq_len]).view(blocks, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "attention_mask": torch.ones_like(block), "labels": block}


def build_base_model(
    output_dir: str | os.PathLike,
    model_config: dict[str, Any],
    num_documents: int = 20000,
    max_steps: int = 800,
    batch_size: int = 32,
    seq_len: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    accelerator: str = "cpu",
    enable_progress_bar: bool = True,
    lettered_kinds: Sequence[str] = (),
    lettered_share: float = 0.1,
) -> Path:
    """Pretrain a small causal LM on the synthetic corpus and save it, with its tokenizer, to ``output_dir``.

    The model is written to a temporary folder next to ``output_dir`` and renamed into place when it is
    complete, so an interrupted build never leaves a half-written base behind.

    Args:
        output_dir: Where the model and tokenizer are saved (``from_pretrained`` reloads both).
        model_config: Architecture, e.g. ``{"model_type": "llama", "num_hidden_layers": 4, ...}``; the
            vocabulary and special-token ids are taken from the built-in character tokenizer.
        num_documents: Synthetic documents in the corpus.
        max_steps: Optimizer steps.
        batch_size: Blocks per step.
        seq_len: Tokens per block.
        lr: Peak learning rate.
        seed: Seed of the corpus and of the initialisation.
        accelerator: Lightning accelerator.
        enable_progress_bar: Show Lightning's progress bar.
        lettered_kinds: Multiple-choice kinds the corpus includes as lettered questions (see
            :func:`~lightning_grass.app.data.pretraining_corpus`); none by default.
        lettered_share: The share of those questions among the documents.

    Returns:
        ``output_dir``.

    Raises:
        SettingTypeError, SettingValueError: Before any work, for a count that is not an integer of at least 1
            (``seq_len``: 2, ``seed``: 0), a ``lettered_share`` outside [0, 1], or a setting the model refuses
            (``lr``).
        StorageError: Before any work, when ``output_dir`` cannot be written
            (:func:`~lightning_grass.app.base_cache.check_cache_writable`); or when the disk fills as it is saved.
    """
    for name, value, minimum in (
        ("num_documents", num_documents, 1),
        ("max_steps", max_steps, 1),
        ("batch_size", batch_size, 1),
        ("seq_len", seq_len, 2),
        ("seed", seed, 0),
    ):
        check_int(f"base model build: {name}", value, minimum)
    check_number("base model build: lettered_share", lettered_share, "in [0, 1]", lambda v: 0 <= v <= 1)
    output_dir = Path(output_dir)
    check_cache_writable(output_dir)
    pl.seed_everything(seed, verbose=False)
    tokenizer = build_char_tokenizer()
    config = {
        **model_config,
        **vocabulary_config(tokenizer),
        "max_position_embeddings": max(seq_len, int(model_config.get("max_position_embeddings", seq_len))),
    }
    module = CausalLMModule(config=config, lr=lr, warmup_steps=max(1, max_steps // 20), weight_decay=0.01)
    module.tokenizer = tokenizer
    token_ids: list[int] = []
    for document in pretraining_corpus(num_documents, seed, lettered_kinds, lettered_share):
        token_ids += [*tokenizer.encode(document, add_special_tokens=False), tokenizer.eos_token_id]
    loader = DataLoader(
        PackedCorpus(token_ids, seq_len),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=enable_progress_bar,
        limit_val_batches=0,
    )
    trainer.fit(module, loader)
    replace_directory_atomically(output_dir, module.save_pretrained)
    return output_dir


def ensure_base_model(output_dir: str | os.PathLike, **build_args: Any) -> tuple[Path, float | None]:
    """Reuse the base model in ``output_dir`` if it is complete, otherwise build it (saying so).

    Args:
        output_dir: The base model's directory.
        **build_args: Passed to :func:`build_base_model`.

    Returns:
        The directory, and the seconds the build took (``None`` when the cached base was reused).

    Raises:
        SettingTypeError, SettingValueError, StorageError: As :func:`build_base_model`, before it builds.
    """
    output_dir = Path(output_dir)
    if (output_dir / "config.json").is_file():
        return output_dir, None
    rank_zero_info(f"Building the tiny base model in {output_dir} (first run only; later runs reuse it)")
    start = time.perf_counter()
    build_base_model(output_dir, **build_args)
    seconds = time.perf_counter() - start
    rank_zero_info(f"Base model built in {seconds:.0f} s")
    return output_dir, seconds
