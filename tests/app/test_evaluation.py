from __future__ import annotations

import torch
from torch import nn

from lightning_grass.app.data import Example, build_char_tokenizer, format_prompt, tokenize_example
from lightning_grass.app.evaluation import exact_match, generate_answers

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] + ':' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


class RecordingModel(nn.Module):
    """Records the prompts ``generate`` receives (left padding removed) and completes each with fixed ids."""

    def __init__(self, completion: list[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.completion = completion
        self.prompts: list[list[int]] = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.prompts += [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]
        tail = torch.tensor([self.completion] * len(input_ids), device=input_ids.device)
        return torch.cat([input_ids, tail], dim=1)


def test_generation_prompts_are_the_training_prompts():
    tok = build_char_tokenizer()
    chat = Example(
        "x2?",
        "",
        "#### 4",
        "4",
        messages=(("user", "1+1?"), ("assistant", "2"), ("user", "x2?"), ("assistant", "#### 4")),
        chat_template=TEMPLATE,
    )
    alpaca_chat = Example("Add.", "2 and 3", "#### 5", "5", chat_template=TEMPLATE)
    alpaca = Example("Add.", "2 and 3", "#### 5", "5")
    model = RecordingModel([*tok.encode("#### 4", add_special_tokens=False), tok.eos_token_id])
    completions = generate_answers(model, tok, [chat, alpaca_chat, alpaca], max_new_tokens=8)
    assert completions == ["#### 4"] * 3
    trained = [tokenize_example(tok, e, max_length=200) for e in (chat, alpaca_chat, alpaca)]
    # The prompt is every training token before the last response: for the conversation, both user turns and
    # the first assistant turn; for the others, the prompt before their one response.
    last_response = [len(trained[0].input_ids) - len(tok.encode("#### 4<eos>\n")), trained[1].prompt_length]
    assert model.prompts[0] == trained[0].input_ids[: last_response[0]]
    assert tok.decode(model.prompts[0]) == "<bos>user:1+1?\nassistant:2<eos>\nuser:x2?\nassistant:"
    assert model.prompts[1] == trained[1].input_ids[: last_response[1]]
    assert tok.decode(model.prompts[1]) == "<bos>user:Add.\n\n2 and 3\nassistant:"
    assert model.prompts[2] == tok.encode(format_prompt(alpaca), add_special_tokens=False)
    assert model.prompts[2] == trained[2].input_ids[: trained[2].prompt_length]
    assert exact_match(model, tok, [chat, alpaca_chat, alpaca], r"####\s*(\S+)", max_new_tokens=8) == 1 / 3
