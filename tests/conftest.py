"""Tiny models and Trainer settings shared by the tests."""

from __future__ import annotations

import logging
import os

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM


def pytest_configure(config):
    """In a pytest-xdist worker, give torch the worker's share of the CPU cores, here and in what the tests start.

    With two workers on two cores, torch's default of one thread per core would run four on two cores, and its
    threads then wait for each other (the suite took over twice as long). An OMP_NUM_THREADS set by the user stays.
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS
    threads = str(max(1, cores // int(workers)))
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)  # for the processes the tests start
    torch.set_num_threads(int(threads))


VOCAB = 64
# A 2-layer Llama as the config dict that CausalLMModule(config=...) takes.
MODULE_CONFIG = dict(
    model_type="llama",
    num_hidden_layers=2,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=50,
    max_position_embeddings=64,
)


def tiny_llama_config(num_layers: int = 4, **overrides) -> LlamaConfig:
    settings = dict(
        num_hidden_layers=num_layers,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


class TinyCausalLM(pl.LightningModule):
    """A LightningModule holding a 4-layer Llama, trained with AdamW over all parameters."""

    def __init__(
        self,
        num_layers: int = 4,
        lr: float = 1e-2,
        weight_decay: float = 0.1,
        scheduler: bool = False,
        optimizer: str = "adamw",
        seed: int = 0,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = LlamaForCausalLM(tiny_llama_config(num_layers, attn_implementation=attn_implementation))
        self.lr, self.weight_decay, self.scheduler, self.optimizer_name = (
            lr,
            weight_decay,
            scheduler,
            optimizer,
        )

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self):
        if self.optimizer_name == "fused_adamw":
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=True)
        elif self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if not self.scheduler:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def token_batches(num_batches: int = 8, batch_size: int = 2, seq_len: int = 12, seed: int = 1) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (num_batches * batch_size, seq_len), generator=generator)
    return DataLoader(TensorDataset(tokens), batch_size=batch_size, shuffle=False)


def make_trainer(**kwargs) -> pl.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    settings.update(kwargs)
    return pl.Trainer(**settings)


@pytest.fixture
def tiny_module() -> TinyCausalLM:
    return TinyCausalLM()


@pytest.fixture(scope="session")
def tiny_pretrained_dir(tmp_path_factory):
    """A tiny Llama with the built-in character tokenizer, saved with save_pretrained (no download)."""
    from lightning_grass.app.data import build_char_tokenizer, vocabulary_config

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = tiny_llama_config(2, **vocabulary_config(tokenizer), max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny_pretrained")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread, and restore the count after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hydra_logging_restored():
    """Remove the handlers (a log file among them) that an in-process Hydra run adds to the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
