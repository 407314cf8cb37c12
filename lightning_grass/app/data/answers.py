"""Extracting the final answer from a generated text, and comparing answers by exact match."""

from __future__ import annotations

import re

#: Matches ``#### 42`` and captures ``42``: the GSM8K convention for the final answer.
DEFAULT_ANSWER_PATTERN = r"####\s*(\S+)"

_NUMBER = re.compile(r"(?P<sign>[-+]?)(?P<integer>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<fraction>\d*))?")


def _normalize(answer: str) -> str:
    """Canonical form of an answer: stripped, without a trailing ``.``, numbers without commas or ``.0``.

    Args:
        answer: The raw answer text.

    Returns:
        The canonical answer, e.g. ``"1,000.50."`` becomes ``"1000.5"`` and ``"B."`` becomes ``"B"``.
    """
    text = answer.strip()
    if len(text) > 1 and text.endswith("."):
        text = text.rstrip(".") or text
    number = _NUMBER.fullmatch(text)
    if number is None:
        return text
    integer = str(int(number["integer"].replace(",", "")))
    fraction = (number["fraction"] or "").rstrip("0")
    sign = "-" if number["sign"] == "-" and (integer != "0" or fraction) else ""
    return f"{sign}{integer}.{fraction}" if fraction else f"{sign}{integer}"


def extract_answer(text: str, pattern: str = DEFAULT_ANSWER_PATTERN) -> str | None:
    """The final answer in ``text``: the first capture group of the last match of ``pattern``, normalised.

    Normalisation strips whitespace and a trailing ``.``, and writes numbers canonically: thousands commas
    are removed and a zero fraction is dropped, so ``"1,234.0"`` becomes ``"1234"``.

    Args:
        text: The text to search, e.g. a generated worked solution ending with ``#### 42``.
        pattern: A regular expression; its first capture group is the answer. A pattern without groups
            uses the whole match.

    Returns:
        The normalised answer, or ``None`` when the pattern does not match or captures only whitespace.
    """
    compiled = re.compile(pattern)
    matches = list(compiled.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    captured = last.group(1) if compiled.groups else last.group(0)
    if captured is None or not captured.strip():
        return None
    return _normalize(captured)


def answers_match(predicted: str | None, expected: str | None) -> bool:
    """Exact match of two answers after the normalisation of :func:`extract_answer`.

    Args:
        predicted: The answer extracted from the model's output, or ``None`` when none was found.
        expected: The reference answer, or ``None`` when the example has none.

    Returns:
        ``True`` when both are strings with the same normalised form; ``None`` never matches.
    """
    if predicted is None or expected is None:
        return False
    return _normalize(predicted) == _normalize(expected)
