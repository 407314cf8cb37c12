"""Exact match of the final answer in greedily generated text: the accuracy the paper reports."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_grass.app.data import Example, answers_match, encode_prompt, extract_answer


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: object,
    examples: Sequence[Example],
    max_new_tokens: int = 48,
    batch_size: int = 32,
) -> list[str]:
    """Greedy completions of each example's prompt (the response text only).

    The prompt is the one training used, :func:`~lightning_grass.app.data.encode_prompt`: the Alpaca prompt, or
    the rendering of the example's ``chat_template`` up to the last assistant turn. Prompts are left-padded
    within a batch so every completion starts right after its prompt.

    Args:
        model: A Hugging Face causal LM.
        tokenizer: Its tokenizer; it needs a pad and an EOS token.
        examples: The examples whose prompts are completed.
        max_new_tokens: Longest completion.
        batch_size: Prompts per ``generate`` call.

    Returns:
        One decoded completion per example, special tokens removed.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    completions: list[str] = []
    for start in range(0, len(examples), batch_size):
        prompts = [encode_prompt(tokenizer, e) for e in examples[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,  # greedy, whatever the checkpoint's generation_config says
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        completions += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return completions


def exact_match(
    model: nn.Module,
    tokenizer: object,
    examples: Sequence[Example],
    answer_pattern: str,
    max_new_tokens: int = 48,
    batch_size: int = 32,
) -> float:
    """Fraction of ``examples`` whose generated final answer equals ``example.answer``.

    Args:
        model: A Hugging Face causal LM.
        tokenizer: Its tokenizer.
        examples: Examples with an ``answer``; others are not counted.
        answer_pattern: Regular expression whose first group is the final answer in generated text.
        max_new_tokens: Longest completion.
        batch_size: Prompts per ``generate`` call.

    Returns:
        Exact match in [0, 1]; 0.0 when no example has an answer.
    """
    scored = [e for e in examples if e.answer is not None]
    if not scored:
        return 0.0
    completions = generate_answers(model, tokenizer, scored, max_new_tokens, batch_size)
    hits = sum(
        answers_match(extract_answer(text, answer_pattern), e.answer)
        for text, e in zip(completions, scored, strict=True)
    )
    return hits / len(scored)
