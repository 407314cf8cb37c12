"""``Example``: one instruction-tuning record in the Alpaca schema, or one conversation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One instruction-tuning record in the Alpaca schema, or one conversation.

    Attributes:
        instruction: The task or question shown to the model. For a conversation, the content of the last
            user message (``""`` when there is none), for display only: the prompt comes from ``messages``.
        input: Optional context for the instruction; ``""`` when there is none (always for a conversation).
        output: The full target text the model learns, e.g. a worked solution ending with ``#### 42``. For a
            conversation, the content of its last message, an assistant turn.
        answer: The final answer used for exact match, e.g. ``"42"`` or ``"B"``; ``None`` when the task has none.
        messages: A conversation's ``(role, content)`` pairs in order, roles ``"system"``, ``"user"`` or
            ``"assistant"``, the last from the assistant; ``()`` for an Alpaca record.
        chat_template: The Jinja chat template the example is rendered with, or ``None`` for the Alpaca prompt
            of :func:`~lightning_grass.app.data.format_prompt`. :class:`~lightning_grass.app.data.InstructionDataModule`
            sets it at ``setup`` from its ``chat_template`` setting, so that evaluation renders the prompt the
            model was trained on.
        prompt_format: Which Alpaca prompt :func:`~lightning_grass.app.data.format_prompt` writes when there is
            no chat template: ``"compact"`` (the headers only) or ``"alpaca"`` (Stanford Alpaca's, the headers after
            its one-sentence preamble, as LLM-Adapters trains and evaluates). The datamodule sets it at ``setup``
            from its ``prompt_format`` setting.
    """

    instruction: str
    input: str
    output: str
    answer: str | None = None
    messages: tuple[tuple[str, str], ...] = ()
    chat_template: str | None = field(default=None, repr=False)
    prompt_format: str = "compact"
