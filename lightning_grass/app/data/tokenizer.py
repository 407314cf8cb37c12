"""A character-level tokenizer for tiny models, built locally with the ``tokenizers`` library."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

#: Special tokens, in id order: ``<pad>`` is id 0.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")

#: Every printable ASCII character except vertical tab and form feed; space, tab and newline included.
CHARACTERS = tuple(char for char in string.printable if char not in "\x0b\x0c")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per printable ASCII character, no download.

    The vocabulary is ``<pad>`` (id 0), ``<bos>``, ``<eos>``, ``<unk>`` and then :data:`CHARACTERS`, 102
    tokens in all. Any other character encodes to ``<unk>``. Encoding never adds special tokens, whatever
    ``add_special_tokens`` says, so ``decode(encode(text))`` gives back any printable ASCII text. The
    special tokens are matched as whole strings, so the text ``"<eos>"`` encodes to the eos id. Saved with
    ``save_pretrained``, it reloads with ``transformers.AutoTokenizer.from_pretrained``.

    Returns:
        The tokenizer, with pad, bos, eos and unk tokens set.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    pad, bos, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        clean_up_tokenization_spaces=False,
    )


def vocabulary_config(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Model-config entries that must agree with ``tokenizer``: vocabulary size and special-token ids.

    Args:
        tokenizer: The tokenizer a new model will be trained with.

    Returns:
        ``vocab_size``, ``pad_token_id``, ``bos_token_id`` and ``eos_token_id``.
    """
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
