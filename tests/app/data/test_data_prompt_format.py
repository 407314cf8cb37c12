"""``prompt_format="alpaca"``: Stanford Alpaca's prompt, the template LLM-Adapters trains and evaluates with."""

import json

import pytest

from lightning_grass.app.data import (
    Example,
    InstructionDataModule,
    build_char_tokenizer,
    format_prompt,
    tokenize_example,
)
from lightning_grass.errors import SettingValueError

NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
)
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n"
    "### Response:\n"
)


def test_the_alpaca_prompt_with_and_without_an_input():
    assert format_prompt(Example("Add 2 and 3.", "", "5", prompt_format="alpaca")) == NO_INPUT
    assert format_prompt(Example("Add.", "2 and 3", "5", prompt_format="alpaca")) == WITH_INPUT
    assert (
        format_prompt(Example("Add.", "2 and 3", "5"))
        == "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    with pytest.raises(
        SettingValueError, match=r"prompt_format='llama' is not supported; use one of \('compact', 'alpaca'\)"
    ):
        format_prompt(Example("Add.", "", "5", prompt_format="llama"))


def test_the_datamodule_trains_on_the_alpaca_prompt(tmp_path):
    data = tmp_path / "math_10k.json"
    records = [
        {"instruction": f"Add 2 and {i}.", "input": "", "output": f"The answer is {i + 2}.", "answer": str(i + 2)}
        for i in range(4)
    ]
    data.write_text(json.dumps(records))
    tok = build_char_tokenizer()
    dm = InstructionDataModule(
        task=str(data), tokenizer=tok, num_val=1, max_length=512, prompt_format="alpaca", chat_template="none"
    )
    dm.setup("fit")
    example = dm.val_examples[0]
    assert (example.prompt_format, example.answer) == ("alpaca", "5")
    trained = tokenize_example(tok, example, max_length=512)
    assert tok.decode(trained.input_ids[: trained.prompt_length]) == format_prompt(example)
    assert format_prompt(example).startswith("Below is an instruction that describes a task. Write")
    with pytest.raises(
        SettingValueError, match=r"prompt_format='plain' is not supported; use one of \('compact', 'alpaca'\)"
    ):
        InstructionDataModule(task=str(data), tokenizer=tok, prompt_format="plain")
