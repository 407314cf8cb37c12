"""Instruction data for GRASS fine-tuning: synthetic tasks, local datasets, chat templates, a DataModule."""

from lightning_grass.app.data.alpaca import load_alpaca
from lightning_grass.app.data.answers import DEFAULT_ANSWER_PATTERN, answers_match, extract_answer
from lightning_grass.app.data.collate import collate_batch
from lightning_grass.app.data.datamodule import InstructionDataModule
from lightning_grass.app.data.example import Example
from lightning_grass.app.data.hf_dataset import load_hf_dataset
from lightning_grass.app.data.prompt import (
    TokenizedExample,
    encode_prompt,
    format_prompt,
    prompt_segments,
    tokenize_example,
)
from lightning_grass.app.data.synthetic import TASKS, arithmetic_examples, multiple_choice_examples, pretraining_corpus
from lightning_grass.app.data.tokenizer import build_char_tokenizer, vocabulary_config
from lightning_grass.errors import DataFormatError

__all__ = [
    "DEFAULT_ANSWER_PATTERN",
    "TASKS",
    "DataFormatError",
    "Example",
    "InstructionDataModule",
    "TokenizedExample",
    "answers_match",
    "arithmetic_examples",
    "build_char_tokenizer",
    "collate_batch",
    "encode_prompt",
    "extract_answer",
    "format_prompt",
    "load_alpaca",
    "load_hf_dataset",
    "multiple_choice_examples",
    "pretraining_corpus",
    "prompt_segments",
    "tokenize_example",
    "vocabulary_config",
]
