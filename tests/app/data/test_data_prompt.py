from __future__ import annotations

import pytest
import torch

from lightning_grass.app.data import (
    Example,
    TokenizedExample,
    build_char_tokenizer,
    collate_batch,
    format_prompt,
    tokenize_example,
)

EXAMPLE = Example("Add 2 and 3.", "", "2 + 3 = 5\n#### 5", "5")
PROMPT = "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_format_prompt():
    assert format_prompt(EXAMPLE) == PROMPT
    with_input = Example("Pick one.", "A) x\nB) y", "B")
    assert format_prompt(with_input) == "### Instruction:\nPick one.\n\n### Input:\nA) x\nB) y\n\n### Response:\n"


def test_labels_mask_exactly_the_prompt(tok):
    result = tokenize_example(tok, EXAMPLE, max_length=128)
    prompt_ids = tok.encode(PROMPT, add_special_tokens=False)
    response_ids = tok.encode(EXAMPLE.output, add_special_tokens=False)
    assert result.prompt_length == len(PROMPT) == 45
    assert result.input_ids == prompt_ids + response_ids + [tok.eos_token_id]
    assert len(result.input_ids) == 45 + 16 + 1
    assert result.labels[:45] == [-100] * 45
    assert result.labels[45:] == result.input_ids[45:]
    assert -100 not in result.labels[45:]
    assert result.labels[-1] == 2
    assert tok.decode(result.input_ids[:45]) == PROMPT
    assert result.truncated is False


def test_exact_fit_is_not_truncated(tok):
    result = tokenize_example(tok, EXAMPLE, max_length=62)
    assert len(result.input_ids) == 62
    assert not result.truncated
    assert tokenize_example(tok, EXAMPLE, max_length=62, truncation="skip") == result


def test_truncate_cuts_the_end_of_the_response(tok):
    result = tokenize_example(tok, EXAMPLE, max_length=50)
    assert result.truncated
    assert len(result.input_ids) == len(result.labels) == 50
    assert result.prompt_length == 45
    assert tok.decode(result.input_ids) == PROMPT + "2 + 3"
    assert result.labels == [-100] * 45 + tok.encode("2 + 3", add_special_tokens=False)
    without_eos = tokenize_example(tok, EXAMPLE, max_length=61)
    assert tok.decode(without_eos.input_ids) == PROMPT + EXAMPLE.output
    assert without_eos.truncated


def test_truncate_keeps_one_response_token_then_drops(tok):
    assert tokenize_example(tok, EXAMPLE, max_length=46).labels[-1] == tok.convert_tokens_to_ids("2")
    assert tokenize_example(tok, EXAMPLE, max_length=45) is None
    assert tokenize_example(tok, EXAMPLE, max_length=10) is None


def test_skip_policy(tok):
    assert tokenize_example(tok, EXAMPLE, max_length=61, truncation="skip") is None
    assert tokenize_example(tok, EXAMPLE, max_length=1000, truncation="skip").input_ids[-1] == tok.eos_token_id


def test_invalid_arguments(tok):
    with pytest.raises(ValueError, match=r"truncation='left' is not supported; use one of \('truncate', 'skip'\)"):
        tokenize_example(tok, EXAMPLE, 64, truncation="left")
    with pytest.raises(ValueError, match="max_length=0 must be >= 1"):
        tokenize_example(tok, EXAMPLE, 0)


def test_tokenizer_without_pad_or_eos_token():
    no_pad = build_char_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match=r"tokenizer has no pad token; set tokenizer\.pad_token"):
        tokenize_example(no_pad, EXAMPLE, 64)
    no_eos = build_char_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="tokenizer has no eos token"):
        tokenize_example(no_eos, EXAMPLE, 64)


def test_collate_pads_right():
    batch = [
        TokenizedExample(input_ids=[5, 6, 7], labels=[-100, 6, 7], prompt_length=1),
        TokenizedExample(input_ids=[8], labels=[8], prompt_length=0),
        TokenizedExample(input_ids=[9, 10], labels=[-100, -100], prompt_length=2),
    ]
    out = collate_batch(batch, pad_token_id=0)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(tensor.dtype == torch.long and tensor.shape == (3, 3) for tensor in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [-100, -100, -100]]
    assert collate_batch(batch[1:2], pad_token_id=99)["input_ids"].tolist() == [[8]]
    assert collate_batch(batch[1:], pad_token_id=99)["input_ids"].tolist() == [[8, 99], [9, 10]]


def test_collate_empty_batch():
    with pytest.raises(ValueError, match="batch is empty"):
        collate_batch([], pad_token_id=0)
