from __future__ import annotations

from dataclasses import replace

import pytest

from lightning_grass.app.data import (
    DataFormatError,
    Example,
    build_char_tokenizer,
    encode_prompt,
    format_prompt,
    prompt_segments,
    tokenize_example,
)
from lightning_grass.app.data.chat import chat_segments, resolve_chat_template

# Each message is "role:content", an assistant turn ends with eos, every message with a newline; the
# generation prompt is "assistant:". Every character is in the char tokenizer's vocabulary.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] + ':' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)
# The same without eos: turns end with a newline only.
TEMPLATE_WITHOUT_EOS = TEMPLATE.replace("{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}", "")

TWO_TURNS = Example(
    instruction="x2?",
    input="",
    output="4",
    messages=(("user", "1+1?"), ("assistant", "2"), ("user", "x2?"), ("assistant", "4")),
    chat_template=TEMPLATE,
)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def ids(tok, *pieces):
    """Token ids by hand: ``"<bos>"`` and ``"<eos>"`` are one token each, any other piece one per character."""
    out = []
    for piece in pieces:
        out += (
            [tok.convert_tokens_to_ids(piece)]
            if piece in ("<bos>", "<eos>")
            else tok.convert_tokens_to_ids(list(piece))
        )
    return out


def masked(tok, *pieces):
    return [-100] * len(ids(tok, *pieces))


def test_two_assistant_turns_are_both_in_the_loss(tok):
    assert prompt_segments(tok, TWO_TURNS) == [
        ("<bos>user:1+1?\nassistant:", False),
        ("2<eos>\n", True),
        ("user:x2?\nassistant:", False),
        ("4<eos>\n", True),
    ]
    result = tokenize_example(tok, TWO_TURNS, max_length=100)
    # The template ends the last turn with eos itself, so none is appended.
    assert result.input_ids == ids(
        tok, "<bos>", "user:1+1?\nassistant:", "2", "<eos>", "\n", "user:x2?\nassistant:", "4", "<eos>", "\n"
    )
    assert result.labels == [
        *masked(tok, "<bos>", "user:1+1?\nassistant:"),
        *ids(tok, "2", "<eos>", "\n"),
        *masked(tok, "user:x2?\nassistant:"),
        *ids(tok, "4", "<eos>", "\n"),
    ]
    assert len(result.input_ids) == 46
    assert (result.prompt_length, result.truncated) == (21, False)
    joined = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in TWO_TURNS.messages], chat_template=TEMPLATE, tokenize=False
    )
    assert tok.encode(joined, add_special_tokens=False) == result.input_ids


def test_truncation_cuts_the_end_and_keeps_the_first_prompt(tok):
    full = tokenize_example(tok, TWO_TURNS, max_length=46)
    assert not full.truncated
    cut = tokenize_example(tok, TWO_TURNS, max_length=44)
    assert cut.input_ids == full.input_ids[:44] and cut.input_ids[-1] == tok.convert_tokens_to_ids("4")
    assert cut.labels == full.labels[:44] and cut.labels[-1] == tok.convert_tokens_to_ids("4")
    assert (cut.prompt_length, cut.truncated) == (21, True)
    one_token = tokenize_example(tok, TWO_TURNS, max_length=22)
    assert one_token.labels == [*masked(tok, "<bos>", "user:1+1?\nassistant:"), tok.convert_tokens_to_ids("2")]
    assert tokenize_example(tok, TWO_TURNS, max_length=21) is None
    assert tokenize_example(tok, TWO_TURNS, max_length=45, truncation="skip") is None
    assert tokenize_example(tok, TWO_TURNS, max_length=46, truncation="skip") == full


def test_eos_is_appended_when_the_template_does_not_write_it(tok):
    example = replace(TWO_TURNS, chat_template=TEMPLATE_WITHOUT_EOS)
    result = tokenize_example(tok, example, max_length=100)
    assert result.input_ids == ids(tok, "<bos>", "user:1+1?\nassistant:2\nuser:x2?\nassistant:4\n", "<eos>")
    assert result.labels == [
        *masked(tok, "<bos>", "user:1+1?\nassistant:"),
        *ids(tok, "2\n"),
        *masked(tok, "user:x2?\nassistant:"),
        *ids(tok, "4\n", "<eos>"),
    ]


def test_an_alpaca_example_becomes_a_user_and_an_assistant_message(tok):
    example = Example("Add.", "2 and 3", "#### 5", "5", chat_template=TEMPLATE)
    result = tokenize_example(tok, example, max_length=100)
    assert result.input_ids == ids(tok, "<bos>", "user:Add.\n\n2 and 3\nassistant:", "#### 5", "<eos>", "\n")
    assert result.labels == [
        *masked(tok, "<bos>", "user:Add.\n\n2 and 3\nassistant:"),
        *ids(tok, "#### 5", "<eos>", "\n"),
    ]
    no_input = tokenize_example(tok, replace(example, input=""), max_length=100)
    assert no_input.input_ids == ids(tok, "<bos>", "user:Add.\nassistant:", "#### 5", "<eos>", "\n")


def test_a_system_message_is_part_of_the_prompt(tok):
    example = Example(
        "Hi", "", "Yo", messages=(("system", "Be"), ("user", "Hi"), ("assistant", "Yo")), chat_template=TEMPLATE
    )
    result = tokenize_example(tok, example, max_length=100)
    assert result.labels == [*masked(tok, "<bos>", "system:Be\nuser:Hi\nassistant:"), *ids(tok, "Yo", "<eos>", "\n")]


def test_without_a_template_the_alpaca_prompt_is_unchanged(tok):
    example = Example("Add.", "2 and 3", "#### 5", "5")
    assert prompt_segments(tok, example) == [(format_prompt(example), False), ("#### 5", True)]
    result = tokenize_example(tok, example, max_length=100)
    assert result.input_ids == ids(tok, format_prompt(example), "#### 5", "<eos>")
    assert encode_prompt(tok, example) == ids(tok, format_prompt(example))


def test_a_conversation_without_a_template_is_refused(tok):
    with pytest.raises(DataFormatError) as error:
        tokenize_example(tok, replace(TWO_TURNS, chat_template=None), max_length=100)
    assert str(error.value) == (
        "a conversation (an example with messages) needs a chat template, but none is in use: "
        "chat_template='none', or 'auto' with a tokenizer whose chat_template is unset. Pass "
        "chat_template='auto' with a tokenizer that has one, or a Jinja template as chat_template"
    )


def test_a_template_that_is_not_prefix_consistent_is_refused(tok):
    counting = "{{ messages | length }}" + TEMPLATE  # the rendering starts with the number of messages
    example = Example("Hi", "", "Yo", messages=(("user", "Hi"), ("assistant", "Yo")), chat_template=counting)
    with pytest.raises(DataFormatError) as error:
        tokenize_example(tok, example, max_length=100)
    assert str(error.value) == (
        "the chat template is not prefix-consistent: its rendering of the messages up to message 1 (an assistant "
        "turn) is '2<bos>user:Hi\\nassistant:Yo<eos>\\n', which does not start with the rendering before it, "
        "'1<bos>user:Hi\\nassistant:'; the assistant's tokens cannot be told apart. Use a template whose rendering "
        "of a conversation extends the rendering of each shorter part of it, or chat_template='none' for the "
        "Alpaca prompt"
    )


def test_a_template_that_raises_is_reported(tok):
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}"
        "{% endif %}{% endfor %}"
    )
    messages = (("system", "Be"), ("user", "Hi"), ("assistant", "Yo"))
    example = Example("Hi", "", "Yo", messages=messages, chat_template=strict + TEMPLATE)
    with pytest.raises(DataFormatError) as error:
        tokenize_example(tok, example, max_length=100)
    assert str(error.value) == (
        "the chat template refused a conversation of 2 messages (roles: system, user): no system messages"
    )


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": "Hi"}], "a conversation must end with an assistant message, got user"),
        ([], "a conversation must end with an assistant message, got nothing"),
        (
            [{"role": "assistant", "content": "Yo"}],
            "a conversation must start with a system or user message, got assistant",
        ),
    ],
)
def test_a_conversation_must_have_a_prompt_and_end_with_the_assistant(tok, messages, message):
    with pytest.raises(DataFormatError) as error:
        chat_segments(tok, TEMPLATE, messages)
    assert str(error.value) == message


def test_the_evaluation_prompt_is_the_training_prefix(tok):
    training = tokenize_example(tok, TWO_TURNS, max_length=100)
    prompt = encode_prompt(tok, TWO_TURNS)
    assert prompt == training.input_ids[:43]
    assert prompt == ids(tok, "<bos>", "user:1+1?\nassistant:2", "<eos>", "\n", "user:x2?\nassistant:")
    rendered = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in TWO_TURNS.messages[:-1]],
        chat_template=TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == tok.encode(rendered, add_special_tokens=False)


def test_resolve_chat_template():
    plain = build_char_tokenizer()
    assert resolve_chat_template(plain, "auto") is None
    assert resolve_chat_template(plain, "none") is None
    assert resolve_chat_template(plain, TEMPLATE) == TEMPLATE
    plain.chat_template = TEMPLATE_WITHOUT_EOS
    assert resolve_chat_template(plain, "auto") == TEMPLATE_WITHOUT_EOS
    assert resolve_chat_template(plain, "none") is None
    assert resolve_chat_template(plain, TEMPLATE) == TEMPLATE
