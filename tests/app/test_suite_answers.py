"""LLM-Adapters' answer rules, on responses whose scores are worked out by hand."""

import pytest

from lightning_grass.app.suite_answers import FirstChoice, LastNumber, response_text

NUMBER = LastNumber()
BOOLQ = FirstChoice(("true", "false"))
AQUA = FirstChoice(("A", "B", "C", "D", "E"))
ANSWERS = FirstChoice(tuple(f"answer{i}" for i in range(1, 6)))


def test_the_response_ends_where_the_model_writes_a_second_header():
    assert response_text("  The answer is 4.\n\n### Response:\nThe answer is 5.") == "The answer is 4."
    assert response_text("\n no header \n") == "no header"


@pytest.mark.parametrize(
    ("response", "number"),
    [
        ("There are 1,234 apples.", 1234.0),  # thousands separator removed
        ("1,234,567 grains", 1234567.0),
        ("It fell to -5 degrees.", -5.0),  # negative
        ("Each costs $3.50.", 3.5),  # decimal
        ("5 - 3 = 2, so 2 left", 2.0),  # the last number, not the first; "- 3" is not negative (a space)
        ("So 7-3=4.", 4.0),  # "7-3" reads as 7 then -3 then 4: the last is 4
        ("It takes .5 hours", 5.0),  # no digit before the point: LLM-Adapters reads 5
        ("The answer is 12.", 12.0),  # a sentence's full stop after the number
        ("no number at all", None),
        ("", None),
    ],
)
def test_the_last_number_commas_removed(response, number):
    assert NUMBER.extract(response) == number


@pytest.mark.parametrize(
    ("response", "label", "right"),
    [
        ("The answer is 3.50", "3.5", True),  # 3.50 == 3.5
        ("The answer is 1,234.", "1234.0", True),
        ("0.667", "0.6666666666666666", True),  # within 1e-3
        ("0.67", "0.6666666666666666", False),  # 3.3e-3 off
        ("It is -5.", "5", False),
        ("It is -5.", "-5.0", True),
        ("4 then 5", "4", False),  # the last number counts
        ("I do not know", "0", False),  # no number is wrong, even against 0
        ("12", 12, True),  # a JSON number as label
    ],
)
def test_numbers_score_within_the_tolerance(response, label, right):
    assert NUMBER.is_correct(NUMBER.extract(response), label) is right


@pytest.mark.parametrize(
    ("rule", "response", "prediction"),
    [
        (BOOLQ, "the correct answer is false", "false"),
        (BOOLQ, "false, not true", "false"),  # the first of the words, wherever it stands
        (BOOLQ, "true ... false ... true", "true"),
        (BOOLQ, "True", None),  # case-sensitive
        (BOOLQ, "that is untrue", "true"),  # no word boundaries
        (ANSWERS, "answer2, or answer1? answer2", "answer2"),  # an answer word repeated: the first one
        (ANSWERS, "the correct answer is answer5", "answer5"),
        (ANSWERS, "I cannot tell", None),
        (AQUA, "The answer is (B).", "B"),
        (AQUA, "Answer: (C)", "A"),  # the first capital A to E, inside "Answer" too, as LLM-Adapters reads it
        (AQUA, "Each option is wrong", "E"),
        (AQUA, "the answer is (d)", None),  # lower case is no letter
    ],
)
def test_the_first_choice(rule, response, prediction):
    assert rule.extract(response) == prediction


def test_a_choice_scores_when_it_equals_the_label():
    assert BOOLQ.is_correct("false", "false") and not BOOLQ.is_correct("true", "false")
    assert not BOOLQ.is_correct(None, "false")
    assert AQUA.is_correct(AQUA.extract("Rationale: x = 2. The answer is (B)."), "B")  # "R" and "T" are no option
    assert not AQUA.is_correct(AQUA.extract("Rationale: Alice pays. The answer is (B)."), "B")  # "Alice" comes first


def test_labels_each_rule_cannot_score():
    assert NUMBER.label_error("4.0") is None and NUMBER.label_error(4) is None
    assert NUMBER.label_error("four") == "must be a number or a string holding one, got 'four'"
    assert NUMBER.label_error(None) == "must be a number or a string holding one, got NoneType None"
    assert NUMBER.label_error(True) == "must be a number or a string holding one, got bool True"
    assert NUMBER.label_error("nan") == "must be a finite number, got 'nan'"
    assert BOOLQ.label_error("false") is None
    assert BOOLQ.label_error("yes") == "must be one of ['true', 'false'], got 'yes'"
