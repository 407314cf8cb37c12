"""``Example``: one instruction-tuning record in the Alpaca schema."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One instruction-tuning record in the Alpaca schema.

    Attributes:
        instruction: The task or question shown to the model.
        input: Optional context for the instruction; ``""`` when there is none.
        output: The full target text the model learns, e.g. a worked solution ending with ``#### 42``.
        answer: The final answer used for exact match, e.g. ``"42"`` or ``"B"``; ``None`` when the task has none.
    """

    instruction: str
    input: str
    output: str
    answer: str | None = None
