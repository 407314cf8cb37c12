r"""LLM-Adapters' answer rules: how each test set of the paper's two suites reads an answer and scores it.

The rules follow LLM-Adapters (``AGI-Edgerunners/LLM-Adapters``, whose training data and test sets the GRASS
paper uses): ``evaluate.py`` for the arithmetic sets, ``commonsense_evaluate.py`` for the commonsense ones. Both
score the *response*, the generated text after the prompt's ``### Response:`` header, up to a further
``### Response:`` header the model may write, stripped (:func:`response_text`). There are two rules:

- :class:`LastNumber` (AddSub, MultiArith, SingleEq, GSM8K, SVAMP): commas are removed, the **last** number
  (``-?\d+\.?\d*``) is the prediction, and it is right when it is within ``1e-3`` of the label. A response
  without a number is wrong.
- :class:`FirstChoice` (AQuA's letters, every commonsense set's answer words): the **first** occurrence of any
  of the set's choices anywhere in the response, case-sensitive and without word boundaries, is the
  prediction, and it is right when it equals the label. A response without one is wrong. For AQuA that is
  the first capital ``A`` to ``E`` wherever it stands, in a word (``"Answer"``, ``"Each"``) too, as
  LLM-Adapters reads it.

Example::

    >>> LastNumber().extract("So 1,200 - 3 = 1197 apples. The answer is 1197.")
    1197.0
    >>> FirstChoice(("true", "false")).extract("false, not true")
    'false'
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

#: The header after which the response starts; a response is cut where the model writes it again.
RESPONSE_HEADER = "### Response:"

#: A number as LLM-Adapters reads one, once commas are removed: an optional minus, digits, an optional point
#: and more digits. ``"3."`` reads as 3 and ``".5"`` as 5.
_NUMBER = re.compile(r"-?\d+\.?\d*")


def response_text(completion: str) -> str:
    """The part of a generated completion that is scored: up to a repeated response header, stripped.

    LLM-Adapters decodes prompt and completion together and scores the text between the first and the
    second ``### Response:``; the completion starts after the first.

    Args:
        completion: The generated text after the prompt.

    Returns:
        ``completion`` up to its first ``### Response:`` (all of it when there is none), without surrounding
        whitespace.
    """
    return completion.split(RESPONSE_HEADER, 1)[0].strip()


class AnswerRule(Protocol):
    """How a test set reads the prediction from a response, checks a label, and scores the prediction."""

    def extract(self, response: str) -> float | str | None:
        """The prediction in ``response``, or ``None`` when it holds none."""

    def label_error(self, label: object) -> str | None:
        """Why ``label`` cannot be a label of this set (what is allowed), or ``None`` when it can."""

    def is_correct(self, prediction: float | str | None, label: object) -> bool:
        """Whether ``prediction`` scores as right against ``label``, a label :meth:`label_error` accepts."""


class _ScoredByMatch(ABC):
    """The scoring both rules share: no prediction is wrong, and a prediction is right when it matches the label."""

    def is_correct(self, prediction: float | str | None, label: object) -> bool:
        """Whether ``prediction`` scores as right against ``label`` under the rule (see the class).

        Args:
            prediction: What ``extract`` returned.
            label: The record's ``answer``.

        Returns:
            ``False`` for no prediction.
        """
        return prediction is not None and self._matches(prediction, label)

    @abstractmethod
    def _matches(self, prediction: float | str, label: object) -> bool:
        """Whether a prediction the rule extracted scores as right against ``label``."""


@dataclass(frozen=True)
class LastNumber(_ScoredByMatch):
    """The last number in the response, right when within ``tolerance`` of the label (LLM-Adapters' ``evaluate.py``).

    Attributes:
        tolerance: The largest absolute difference that still counts as right: LLM-Adapters' ``1e-3``, so
            ``"3.50"`` scores against ``3.5`` and ``"0.667"`` against ``0.6666666666666666``.
    """

    tolerance: float = 1e-3

    def extract(self, response: str) -> float | None:
        """The last number of ``response`` once its commas are removed (``"1,234"`` is 1234).

        Args:
            response: The scored text.

        Returns:
            The number as a float, or ``None`` when the response holds no digit.
        """
        numbers = _NUMBER.findall(response.replace(",", ""))
        return float(numbers[-1]) if numbers else None

    def label_error(self, label: object) -> str | None:
        """Why ``label`` is not a finite number or a string holding one, or ``None`` when it is.

        Args:
            label: The record's ``answer``.

        Returns:
            The reason, or ``None``.
        """
        if isinstance(label, bool) or not isinstance(label, (str, int, float)):
            return f"must be a number or a string holding one, got {type(label).__name__} {label!r}"
        try:
            value = float(label)
        except ValueError:
            return f"must be a number or a string holding one, got {label!r}"
        return None if math.isfinite(value) else f"must be a finite number, got {label!r}"

    def _matches(self, prediction: float | str, label: object) -> bool:
        """Whether ``prediction`` is a number within :attr:`tolerance` of ``float(label)``."""
        return isinstance(prediction, float) and abs(float(label) - prediction) <= self.tolerance


@dataclass(frozen=True)
class FirstChoice(_ScoredByMatch):
    """The first of ``choices`` found in the response, right when it equals the label (LLM-Adapters' rules).

    Attributes:
        choices: The answers the set's labels are, searched for together: at each position of the response,
            in this order, the earliest position winning.
    """

    choices: tuple[str, ...]

    def extract(self, response: str) -> str | None:
        """The choice that occurs first in ``response``, case-sensitive, inside a longer word too.

        Args:
            response: The scored text.

        Returns:
            The choice, or ``None`` when none occurs.
        """
        found = re.search("|".join(map(re.escape, self.choices)), response)
        return found.group(0) if found else None

    def label_error(self, label: object) -> str | None:
        """Why ``label`` is not one of :attr:`choices`, or ``None`` when it is.

        Args:
            label: The record's ``answer``.

        Returns:
            The reason, or ``None``.
        """
        return None if label in self.choices else f"must be one of {list(self.choices)}, got {label!r}"

    def _matches(self, prediction: float | str, label: object) -> bool:
        """Whether ``prediction`` equals ``label``."""
        return prediction == label
