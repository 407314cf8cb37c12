from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_grass.app.data import (
    Example,
    TokenizedExample,
    build_char_tokenizer,
    collate_batch,
    format_prompt,
    prompt_segments,
    tokenize_example,
)
from lightning_grass.app.data.prompt import IGNORE_INDEX, _longest_token

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


def _counting(tokenizer, monkeypatch):
    """``tokenizer``, recording the length of every text its ``encode`` is given."""
    lengths = []
    encode = tokenizer.encode

    def counting_encode(text, **kwargs):
        lengths.append(len(text))
        return encode(text, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", counting_encode)
    return tokenizer, lengths


def _untruncated(tokenizer, example, max_length, truncation="truncate"):
    """What ``tokenize_example`` gave before its work was bounded: every piece tokenized whole."""
    segments = prompt_segments(tokenizer, example)
    input_ids, labels = [], []
    for text, trained in segments:
        ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    if example.chat_template is None or tokenizer.eos_token not in segments[-1][0]:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    prompt_length = len(tokenizer.encode(segments[0][0], add_special_tokens=False))
    truncated = len(input_ids) > max_length
    if truncated:
        if truncation == "skip" or prompt_length >= max_length:
            return None
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedExample(input_ids=input_ids, labels=labels, prompt_length=prompt_length, truncated=truncated)


def test_a_huge_response_is_cut_before_tokenizing(monkeypatch):
    tok, lengths = _counting(build_char_tokenizer(), monkeypatch)
    huge = Example("Add 2 and 3.", "", "2 + 3 = 5 " * 2_000_000, "5")
    assert len(huge.output) == 20_000_000
    result = tokenize_example(tok, huge, max_length=64)
    # The prompt (45 characters) is read whole; the response only up to (64 - 45 + 1) tokens of at most 5
    # characters each (the longest entry of the vocabulary is "<pad>").
    assert lengths == [45, 100]
    short = Example("Add 2 and 3.", "", "2 + 3 = 5 " * 3, "5")
    assert result == tokenize_example(tok, short, max_length=64) == _untruncated(tok, short, 64)
    assert result.truncated and len(result.input_ids) == 64
    lengths.clear()
    assert tokenize_example(tok, huge, max_length=64, truncation="skip") is None
    assert lengths == [45, 100]


def test_a_huge_prompt_is_dropped_after_reading_a_prefix(monkeypatch):
    tok, lengths = _counting(build_char_tokenizer(), monkeypatch)
    huge = Example("x" * 20_000_000, "", "#### 1", "1")
    assert tokenize_example(tok, huge, max_length=64) is None
    assert lengths == [65 * 5]


def _byte_level_bpe():
    """A byte-level BPE tokenizer (GPT-2's scheme) trained here on text with long repeated words."""
    rng = random.Random(0)
    words = ["the", "answer", "is", "12", "345", "====", "    ", "ab" * 6, "über", "😀", "\n"]
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(400)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def test_bounded_tokenizing_gives_the_ids_of_whole_tokenizing():
    tok = _byte_level_bpe()
    longest = _longest_token(tok)
    assert longest > 4  # merges longer than one byte, so the bound is not the character count
    rng = random.Random(1)
    pieces = ["the ", "answer ", "is ", "12", "345 ", "==== ", "    ", "abab", "über ", "😀", "\n", "<eos>", "q"]
    template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.role == 'assistant' %}<eos>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    outcomes = {"fits": 0, "truncated": 0, "dropped": 0, "response cut before tokenizing": 0}
    for _ in range(200):
        sizes = ([1, 5, 20], [0, 5, 40], [1, 5, 40, 400])
        texts = ["".join(rng.choice(pieces) for _ in range(rng.choice(choices))) for choices in sizes]
        example = Example(texts[0], texts[1], texts[2], None, chat_template=template if rng.random() < 0.3 else None)
        for max_length in (8, 30, 60, 120, 1000):
            for truncation in ("truncate", "skip"):
                expected = _untruncated(tok, example, max_length, truncation)
                assert tokenize_example(tok, example, max_length, truncation) == expected
                outcomes["dropped" if expected is None else "truncated" if expected.truncated else "fits"] += 1
                outcomes["response cut before tokenizing"] += len(example.output) > (max_length + 1) * longest
    assert outcomes == {"fits": 774, "truncated": 154, "dropped": 1072, "response cut before tokenizing": 204}


def test_a_token_longer_than_its_entry_reads_more_of_the_text(monkeypatch):
    # A word-level tokenizer turns any unknown word into one "<unk>", however long: the prefix that the bound
    # allows fits, so it is doubled until the whole word is read, and the example is kept whole.
    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok, lengths = _counting(
        PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>"), monkeypatch
    )
    example = Example("a", "", "w" * 1000, None)
    result = tokenize_example(tok, example, max_length=12)
    # "### Instruction:\na\n\n### Response:\n" is five words, four of them unknown; the response is one.
    assert result == TokenizedExample(input_ids=[2, 2, 3, 2, 2, 2, 1], labels=[-100] * 5 + [2, 1], prompt_length=5)
    assert lengths == [len(format_prompt(example)), 40, 80, 160, 320, 640, 1000]
    assert result == _untruncated(tok, example, 12)


def test_the_longest_entry_is_measured_again_when_tokens_are_added():
    tok = build_char_tokenizer()
    assert _longest_token(tok) == 5
    tok.add_tokens(["<" + "z" * 38 + ">"])
    assert _longest_token(tok) == 40
