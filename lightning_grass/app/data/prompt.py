"""The prompt format, and turning an ``Example`` into token ids with the prompt masked out of the loss."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lightning_grass.app.data.chat import chat_segments, example_messages
from lightning_grass.app.data.example import Example
from lightning_grass.errors import DataFormatError, SettingValueError

#: Label value that ``torch.nn.functional.cross_entropy`` ignores.
IGNORE_INDEX = -100

#: Accepted values of ``truncation``.
TRUNCATION_POLICIES = ("truncate", "skip")

#: What each ``prompt_format`` writes before the ``### Instruction:`` header: without and with an input.
_PREAMBLES = {
    "compact": ("", ""),
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n",
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n",
    ),
}

#: Accepted values of ``prompt_format``: the Alpaca prompt's headers alone, or after Stanford Alpaca's preamble.
PROMPT_FORMATS = tuple(_PREAMBLES)

#: The longest vocabulary entry of each tokenizer :func:`tokenize_example` has met, with the vocabulary size it
#: was measured at (a tokenizer given more tokens since is measured again).
_LONGEST_TOKEN: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, tuple[int, int]] = weakref.WeakKeyDictionary()


def format_prompt(example: Example) -> str:
    r"""The Alpaca-style prompt the model answers after, in the example's ``prompt_format``.

    Args:
        example: The example whose ``instruction`` (and ``input``, when non-empty) fill the prompt.

    Returns:
        For ``prompt_format="compact"``, ``"### Instruction:\n{instruction}\n\n### Response:\n"``, with
        ``"### Input:\n{input}\n\n"`` inserted before the response header when ``input`` is non-empty. For
        ``"alpaca"``, the same after Stanford Alpaca's preamble and a blank line: ``"Below is an instruction
        that describes a task. Write a response that appropriately completes the request."``, or, with an
        input, ``"Below is an instruction that describes a task, paired with an input that provides further
        context. Write a response that appropriately completes the request."``. That is the template
        LLM-Adapters trains on ``math_10k.json`` and ``commonsense_170k.json`` with and evaluates with, without
        the indentation and trailing spaces its source code leaves inside the strings.

    Raises:
        SettingValueError: For a ``prompt_format`` not in :data:`PROMPT_FORMATS`.
    """
    preambles = _PREAMBLES.get(example.prompt_format)
    if preambles is None:
        raise SettingValueError(
            f"prompt_format={example.prompt_format!r} is not supported; use one of {PROMPT_FORMATS}"
        )
    prompt = preambles[bool(example.input)] + f"### Instruction:\n{example.instruction}\n\n"
    if example.input:
        prompt += f"### Input:\n{example.input}\n\n"
    return prompt + "### Response:\n"


@dataclass
class TokenizedExample:
    """Token ids of prompt + response + eos, and the labels the loss is computed on.

    A conversation alternates prompts and responses (assistant turns); every response is in the loss.

    Attributes:
        input_ids: Prompt tokens, then response tokens, then the eos token (unless truncated away).
        labels: ``-100`` for every prompt token, the token id for every response and eos token.
        prompt_length: Number of prompt tokens at the start of ``input_ids``, before the first response.
        truncated: Whether the end of the response was cut to fit ``max_length``.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    truncated: bool = False


def check_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Check that ``tokenizer`` has the pad and eos tokens that training needs.

    Args:
        tokenizer: The tokenizer to check.

    Raises:
        SettingValueError: When the tokenizer has no pad token or no eos token.
    """
    if tokenizer.pad_token_id is None:
        raise SettingValueError(
            "tokenizer has no pad token; set tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.eos_token)"
        )
    if tokenizer.eos_token_id is None:
        raise SettingValueError("tokenizer has no eos token; set tokenizer.eos_token so that responses can end")


def prompt_segments(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[tuple[str, bool]]:
    """The text of ``example`` as the model sees it, in pieces, each with whether the loss covers it.

    Training (:func:`tokenize_example`) and evaluation (:func:`encode_prompt`) both build their tokens from
    these pieces, so the prompt the model is scored on is the prompt it was trained on.

    Args:
        tokenizer: Provides the special tokens a chat template may use.
        example: The example; its ``chat_template`` chooses the rendering.

    Returns:
        Without a chat template, ``[(format_prompt(example), False), (example.output, True)]``. With one,
        the pieces of :func:`~lightning_grass.app.data.chat.chat_segments`: the text before each assistant
        turn (``False``) and the turn (``True``), for an Alpaca example the conversation of a user message
        and an assistant message.

    Raises:
        DataFormatError: For a conversation without a chat template, or a template that refuses the
            conversation or is not prefix-consistent.
    """
    if example.chat_template is not None:
        return chat_segments(tokenizer, example.chat_template, example_messages(example))
    if example.messages:
        raise DataFormatError(
            "a conversation (an example with messages) needs a chat template, but none is in use: "
            "chat_template='none', or 'auto' with a tokenizer whose chat_template is unset. Pass "
            "chat_template='auto' with a tokenizer that has one, or a Jinja template as chat_template"
        )
    return [(format_prompt(example), False), (example.output, True)]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[int]:
    """The token ids the model completes to answer ``example``: its training tokens before the last response.

    Args:
        tokenizer: The tokenizer.
        example: The example.

    Returns:
        The ids of every piece of :func:`prompt_segments` but the last, each tokenized on its own without
        special tokens, as :func:`tokenize_example` does: the Alpaca prompt, or the chat-template rendering
        of all messages but the last with the generation prompt.

    Raises:
        DataFormatError: As :func:`prompt_segments`.
    """
    segments = prompt_segments(tokenizer, example)[:-1]
    return [token for text, _ in segments for token in tokenizer.encode(text, add_special_tokens=False)]


def _longest_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most characters an entry of ``tokenizer``'s vocabulary has, added tokens included.

    Args:
        tokenizer: The tokenizer.

    Returns:
        The length of its longest vocabulary string, at least 1.
    """
    size = len(tokenizer)
    measured = _LONGEST_TOKEN.get(tokenizer)
    if measured is None or measured[0] != size:
        measured = (size, max(1, max(map(len, tokenizer.get_vocab()), default=1)))
        _LONGEST_TOKEN[tokenizer] = measured
    return measured[1]


def _encode_within(tokenizer: PreTrainedTokenizerBase, text: str, budget: int) -> list[int]:
    """The ids of ``text``, or of a prefix of it when that prefix alone has more than ``budget`` of them.

    The work is bounded by ``budget``, not by the length of ``text``: a text longer than ``(budget + 1) * L``
    characters, where ``L`` is the longest vocabulary entry, is tokenized only up to there.

    Why that changes no example that fits: in the tokenizers this project meets (its character tokenizer,
    byte-level BPE as in GPT-2, Llama 3 or Qwen, SentencePiece as in Llama 2 or Mistral), every token stands
    for at most as many characters of the text as its vocabulary entry has (a byte-level entry has one
    character per byte, and a character has at least one byte), and every character of the text is in some
    token. So ``k`` tokens never cover more than ``k * L`` characters: a text of at most ``budget`` tokens has
    at most ``budget * L`` characters and is tokenized whole, as before; a longer one has more than ``budget``
    tokens, and so has its prefix of ``(budget + 1) * L`` characters. The caller then keeps at most ``budget``
    of that prefix's tokens; they cover at most ``budget * L`` characters, ending at least ``L`` characters
    before the cut, so they are the whole text's tokens unless the tokenizer's split of a single word depends
    on characters further ahead than that. A tokenizer where one token stands for more characters (an
    unknown-word token, a normalizer that drops characters) may find the prefix within ``budget``; then the
    prefix is doubled until it is not, or the whole text is tokenized: a text is cut only where its prefix
    alone already exceeds ``budget``.

    Args:
        tokenizer: The tokenizer; no special tokens are added.
        text: The text.
        budget: The most tokens that may still be kept, ``>= 0``.

    Returns:
        ``tokenizer.encode(text)`` when the text may fit, otherwise the ids of a prefix, more than ``budget``.
    """
    if len(text) > budget + 1:
        limit = (budget + 1) * _longest_token(tokenizer)
        while limit < len(text):
            ids = tokenizer.encode(text[:limit], add_special_tokens=False)
            if len(ids) > budget:
                return ids
            limit *= 2
    return tokenizer.encode(text, add_special_tokens=False)


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int, truncation: str = "truncate"
) -> TokenizedExample | None:
    """Tokenize the pieces of :func:`prompt_segments` separately, so that the mask is exact, and end with eos.

    Each piece is tokenized on its own, without special tokens; the labels of the pieces the loss does not
    cover are ``-100``. The eos token is appended after the Alpaca response. With a chat template it is
    appended only when the template's rendering of the last assistant turn does not already hold the eos
    token: a template that ends its turns with eos is not given a second one, and one that ends them with
    another token (``<|im_end|>``, say) gets eos after it, so that generation stops there.

    The work is bounded by ``max_length``, not by the length of the texts: tokenizing stops at the first piece
    that overflows ``max_length``, and of a piece longer than ``max_length + 1`` times the longest vocabulary
    entry (in characters) only a prefix that long is tokenized. That prefix already shows that the example is
    too long and gives its first ``max_length`` tokens. With a tokenizer whose tokens stand for no more
    characters than their vocabulary entries (byte-level BPE, SentencePiece, the character tokenizer), an
    example that fits is tokenized whole, exactly as without the bound; ``_encode_within`` says why, and what
    happens with other tokenizers.

    Args:
        tokenizer: A tokenizer with pad and eos tokens. Special tokens are not added around the texts.
        example: The example to tokenize.
        max_length: The most tokens the result may have, ``>= 1``.
        truncation: What to do with an example longer than ``max_length``: ``"truncate"`` cuts the end (eos
            included) and keeps the whole prompt before the first response; ``"skip"`` drops the example.

    Returns:
        The tokenized example, or ``None`` when it is dropped: too long under ``"skip"``, or under
        ``"truncate"`` when the prompt alone has ``max_length`` tokens or more.

    Raises:
        SettingValueError: For ``max_length < 1``, an unknown ``truncation``, or a tokenizer without pad or eos token.
        DataFormatError: As :func:`prompt_segments`.
    """
    if max_length < 1:
        raise SettingValueError(f"max_length={max_length!r} must be >= 1")
    if truncation not in TRUNCATION_POLICIES:
        raise SettingValueError(f"truncation={truncation!r} is not supported; use one of {TRUNCATION_POLICIES}")
    check_special_tokens(tokenizer)
    segments = prompt_segments(tokenizer, example)
    input_ids: list[int] = []
    labels: list[int] = []
    prompt_length = 0
    for index, (text, trained) in enumerate(segments):
        ids = _encode_within(tokenizer, text, max_length - len(input_ids))
        if index == 0:
            prompt_length = len(ids)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
        if len(input_ids) > max_length:
            break
    else:
        if example.chat_template is None or tokenizer.eos_token not in segments[-1][0]:
            input_ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
    truncated = len(input_ids) > max_length
    if truncated:
        if truncation == "skip" or prompt_length >= max_length:
            return None
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedExample(input_ids=input_ids, labels=labels, prompt_length=prompt_length, truncated=truncated)
