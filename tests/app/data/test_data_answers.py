from __future__ import annotations

import pytest

from lightning_grass.app.data import DEFAULT_ANSWER_PATTERN, answers_match, extract_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5 + 3 = 8\n#### 8", "8"),
        ("#### 1,234", "1234"),
        ("#### 12.", "12"),
        ("#### 5.0", "5"),
        ("#### 2.50", "2.5"),
        ("#### -0.0", "0"),
        ("#### -7", "-7"),
        ("The answer is B\n#### B", "B"),
        ("#### 3 then later ####  42 ", "42"),
        ("####\n\n7", "7"),
        ("no marker here", None),
        ("", None),
        ("####", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_custom_patterns():
    assert extract_answer("The answer is C. Sure, the answer is D.", r"answer is ([A-Z])") == "D"
    assert extract_answer("values 3 and 17", r"\d+") == "17"
    assert extract_answer("nothing", r"answer is ([A-Z])") is None
    assert DEFAULT_ANSWER_PATTERN == r"####\s*(\S+)"


def test_answers_match():
    assert answers_match("42", "42")
    assert answers_match("1,000", "1000")
    assert answers_match("5.0", "5")
    assert answers_match(" B ", "B")
    assert not answers_match("41", "42")
    assert not answers_match("b", "B")
    assert not answers_match(None, "42")
    assert not answers_match("42", None)
    assert not answers_match(None, None)
