"""Chat templates: rendering a conversation turn by turn, so that the loss can cover the assistant's tokens only."""

from __future__ import annotations

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from lightning_grass.app.data.example import Example
from lightning_grass.errors import DataFormatError

#: The ``chat_template`` settings that are not a template: the tokenizer's own (``"auto"``) or none at all.
CHAT_TEMPLATE_MODES = ("auto", "none")

#: The roles a chat message may have.
ROLES = ("system", "user", "assistant")


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str) -> str | None:
    """The Jinja template that ``chat_template`` stands for with ``tokenizer``.

    Args:
        tokenizer: The tokenizer whose own template ``"auto"`` uses.
        chat_template: ``"auto"``, ``"none"`` or a Jinja template.

    Returns:
        ``tokenizer.chat_template`` for ``"auto"`` (``None`` when the tokenizer has none), ``None`` for
        ``"none"``, and the template itself otherwise. ``None`` means the Alpaca prompt of
        :func:`~lightning_grass.app.data.format_prompt`.
    """
    if chat_template == "auto":
        return tokenizer.chat_template or None
    if chat_template == "none":
        return None
    return chat_template


def example_messages(example: Example) -> list[dict[str, str]]:
    r"""The conversation a chat template renders for ``example``.

    Args:
        example: A chat example (its ``messages``) or an Alpaca one.

    Returns:
        The chat example's messages as ``{"role", "content"}`` dicts; for an Alpaca example a user message
        holding ``instruction`` (then ``"\n\n"`` and ``input`` when ``input`` is non-empty) and an assistant
        message holding ``output``.
    """
    if example.messages:
        return [{"role": role, "content": content} for role, content in example.messages]
    user = f"{example.instruction}\n\n{example.input}" if example.input else example.instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": example.output}]


def _render(
    tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict[str, str]], add_generation_prompt: bool
) -> str:
    """The text ``template`` renders for ``messages``.

    Args:
        tokenizer: Provides the special tokens the template may use (``bos_token``, ``eos_token``).
        template: The Jinja chat template.
        messages: The conversation so far.
        add_generation_prompt: Whether to end with the header of an assistant turn.

    Returns:
        The rendered text.

    Raises:
        DataFormatError: When the template raises, e.g. through ``raise_exception`` for roles it refuses.
    """
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as error:
        roles = ", ".join(message["role"] for message in messages)
        raise DataFormatError(
            f"the chat template refused a conversation of {len(messages)} messages (roles: {roles}): {error}"
        ) from error


def chat_segments(
    tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict[str, str]]
) -> list[tuple[str, bool]]:
    """Cut the rendering of a conversation into the text before each assistant turn and the turn itself.

    For the assistant message at position ``i``, the template renders ``messages[:i]`` with the generation
    prompt (the prompt the model completes) and ``messages[: i + 1]`` without it. Each rendering must start
    with the one before it, so that the pieces in between are the assistant's own text: its content and
    whatever the template writes after it up to the next message (an end-of-turn token, a newline).

    Args:
        tokenizer: Provides the special tokens the template may use.
        template: The Jinja chat template.
        messages: ``{"role", "content"}`` dicts, the last from the assistant.

    Returns:
        ``(text, trained)`` pairs whose texts join into the rendering of the whole conversation: alternately
        the text before an assistant turn (``False``) and the turn (``True``), starting with the first.

    Raises:
        DataFormatError: When the first message is from the assistant (there is no prompt before it) or the
            last is not, the template refuses the conversation, or the template is not prefix-consistent.
    """
    if not messages or messages[-1]["role"] != "assistant":
        last = messages[-1]["role"] if messages else "nothing"
        raise DataFormatError(f"a conversation must end with an assistant message, got {last}")
    if messages[0]["role"] == "assistant":
        raise DataFormatError("a conversation must start with a system or user message, got assistant")
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, template, messages[:index], add_generation_prompt=True)
        turn = _render(tokenizer, template, messages[: index + 1], add_generation_prompt=False)
        for longer, shorter, what in (
            (prompt, rendered, f"the messages before message {index} with the generation prompt"),
            (turn, prompt, f"the messages up to message {index} (an assistant turn)"),
        ):
            if not longer.startswith(shorter):
                raise DataFormatError(
                    f"the chat template is not prefix-consistent: its rendering of {what} is {longer!r}, which "
                    f"does not start with the rendering before it, {shorter!r}; the assistant's tokens cannot be "
                    "told apart. Use a template whose rendering of a conversation extends the rendering of each "
                    "shorter part of it, or chat_template='none' for the Alpaca prompt"
                )
        segments += [(prompt[len(rendered) :], False), (turn[len(prompt) :], True)]
        rendered = turn
    return segments
