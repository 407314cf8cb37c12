"""The prompt format, and turning an ``Example`` into token ids with the prompt masked out of the loss."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lightning_grass.app.data.example import Example
from lightning_grass.errors import SettingValueError

#: Label value that ``torch.nn.functional.cross_entropy`` ignores.
IGNORE_INDEX = -100

#: Accepted values of ``truncation``.
TRUNCATION_POLICIES = ("truncate", "skip")


def format_prompt(example: Example) -> str:
    r"""The compact Alpaca-style prompt the model answers after.

    Args:
        example: The example whose ``instruction`` (and ``input``, when non-empty) fill the prompt.

    Returns:
        ``"### Instruction:\n{instruction}\n\n### Response:\n"``, with ``"### Input:\n{input}\n\n"``
        inserted before the response header when ``input`` is non-empty.
    """
    prompt = f"### Instruction:\n{example.instruction}\n\n"
    if example.input:
        prompt += f"### Input:\n{example.input}\n\n"
    return prompt + "### Response:\n"


@dataclass
class TokenizedExample:
    """Token ids of prompt + response + eos, and the labels the loss is computed on.

    Attributes:
        input_ids: Prompt tokens, then response tokens, then the eos token (unless truncated away).
        labels: ``-100`` for every prompt token, the token id for every response and eos token.
        prompt_length: Number of prompt tokens at the start of ``input_ids``.
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


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int, truncation: str = "truncate"
) -> TokenizedExample | None:
    """Tokenize prompt and response separately, so that the prompt mask is exact, and append eos.

    Args:
        tokenizer: A tokenizer with pad and eos tokens. Special tokens are not added around the texts.
        example: The example to tokenize.
        max_length: The most tokens the result may have, ``>= 1``.
        truncation: What to do with an example longer than ``max_length``: ``"truncate"`` cuts the end of
            the response (eos included) and keeps the whole prompt; ``"skip"`` drops the example.

    Returns:
        The tokenized example, or ``None`` when it is dropped: too long under ``"skip"``, or under
        ``"truncate"`` when the prompt alone has ``max_length`` tokens or more.

    Raises:
        SettingValueError: For ``max_length < 1``, an unknown ``truncation``, or a tokenizer without pad or eos token.
    """
    if max_length < 1:
        raise SettingValueError(f"max_length={max_length!r} must be >= 1")
    if truncation not in TRUNCATION_POLICIES:
        raise SettingValueError(f"truncation={truncation!r} is not supported; use one of {TRUNCATION_POLICIES}")
    check_special_tokens(tokenizer)
    prompt_ids = tokenizer.encode(format_prompt(example), add_special_tokens=False)
    response_ids = [*tokenizer.encode(example.output, add_special_tokens=False), tokenizer.eos_token_id]
    truncated = len(prompt_ids) + len(response_ids) > max_length
    if truncated:
        if truncation == "skip" or len(prompt_ids) >= max_length:
            return None
        response_ids = response_ids[: max_length - len(prompt_ids)]
    return TokenizedExample(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        prompt_length=len(prompt_ids),
        truncated=truncated,
    )
