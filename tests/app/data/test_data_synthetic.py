from __future__ import annotations

import operator as op
import re
import string
from collections import Counter

import pytest

from lightning_grass.app.data import (
    TASKS,
    arithmetic_examples,
    extract_answer,
    format_prompt,
    multiple_choice_examples,
    pretraining_corpus,
)

_STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
_APPLY = {"+": op.add, "-": op.sub, "*": op.mul}


def test_tasks_registry():
    assert {"arithmetic": arithmetic_examples, "multiple_choice": multiple_choice_examples} == TASKS


@pytest.mark.parametrize("generate", [arithmetic_examples, multiple_choice_examples, pretraining_corpus])
def test_generators_are_deterministic(generate):
    assert generate(50, seed=3) == generate(50, seed=3)
    assert generate(50, seed=3) != generate(50, seed=4)
    assert generate(10, seed=3) == generate(50, seed=3)[:10]


@pytest.mark.parametrize(("min_steps", "max_steps", "max_value"), [(2, 3, 20), (1, 1, 5), (4, 5, 50)])
def test_arithmetic_solutions_are_correct(min_steps, max_steps, max_value):
    examples = arithmetic_examples(300, seed=1, min_steps=min_steps, max_steps=max_steps, max_value=max_value)
    step_counts = Counter()
    for example in examples:
        assert example.input == ""
        assert example.instruction.endswith("have now?")
        *steps, final = example.output.split("\n")
        assert final == f"#### {example.answer}"
        assert extract_answer(example.output) == example.answer
        start = int(re.match(r"\w+ has (\d+) \w+\.", example.instruction).group(1))
        assert 2 <= start <= max_value
        current = start
        for line in steps:
            left, operator, right, result = _STEP.fullmatch(line).groups()
            assert int(left) == current
            assert _APPLY[operator](int(left), int(right)) == int(result)
            if operator == "*":
                assert int(right) in (2, 3)
                assert int(left) <= max_value
            current = int(result)
            assert current >= 1
        assert str(current) == example.answer
        step_counts[len(steps)] += 1
        assert min_steps <= len(steps) <= max_steps
        assert len(example.instruction) == len(example.instruction.strip())
    assert set(step_counts) == set(range(min_steps, max_steps + 1))


def test_arithmetic_question_matches_solution():
    """Each sentence of the question states the number used by its solution line."""
    for example in arithmetic_examples(200, seed=2):
        sentences = example.instruction.split(". ")[1:-1]
        steps = example.output.split("\n")[:-1]
        assert len(sentences) == len(steps)
        for sentence, step in zip(sentences, steps, strict=True):
            _, operator, right, _ = _STEP.fullmatch(step).groups()
            if operator == "*":
                assert sentence.endswith({"2": "doubles them", "3": "triples them"}[right])
            else:
                assert re.search(rf"\b{right}\b", sentence)
                verbs = ("buys", "finds", "gets") if operator == "+" else ("gives away", "loses", "sells")
                assert any(verb in sentence for verb in verbs)


def test_arithmetic_varies_and_stays_short():
    examples = arithmetic_examples(400, seed=0)
    names = {example.instruction.split()[0] for example in examples}
    operators = {match[1] for example in examples for match in _STEP.findall(example.output)}
    assert len(names) >= 8
    assert operators == {"+", "-", "*"}
    assert max(len(e.instruction) + len(e.output) for e in examples) < 200


def _derive_mc_answer(instruction: str) -> tuple[str, list[str]]:
    """Re-derive the right option from the question text alone."""
    question, *option_lines = instruction.split("\n")
    letters = [line[0] for line in option_lines]
    assert letters == list(string.ascii_uppercase[: len(option_lines)])
    options = [line[3:] for line in option_lines]
    assert all(line[1:3] == ") " for line in option_lines)
    assert len(set(options)) == len(options)
    if match := re.fullmatch(r"Which number is (largest|smallest)\?", question):
        numbers = [int(option) for option in options]
        right = max(numbers) if match[1] == "largest" else min(numbers)
        return letters[numbers.index(right)], ["compare"]
    if match := re.fullmatch(r"Which word comes (first|last) in the alphabet\?", question):
        right = min(options) if match[1] == "first" else max(options)
        return letters[options.index(right)], ["alphabet"]
    facts = re.findall(r"(\w+) is (\w+) than (\w+)\.", question)
    superlative = re.search(r"Who is (\w+)\?$", question)[1]
    assert len(facts) == len(options) - 1
    assert len({relation for _, relation, _ in facts}) == 1
    greater = {left for left, _, _ in facts}
    lesser = {right for _, _, right in facts}
    assert greater | lesser == set(options)
    ends = {
        "tallest": greater - lesser,
        "oldest": greater - lesser,
        "fastest": greater - lesser,
        "shortest": lesser - greater,
        "youngest": lesser - greater,
        "slowest": lesser - greater,
    }[superlative]
    (right,) = ends
    return letters[options.index(right)], ["logic"]


@pytest.mark.parametrize("num_choices", [2, 4, 6])
def test_multiple_choice_answers_are_correct(num_choices):
    kinds = Counter()
    for example in multiple_choice_examples(300, seed=5, num_choices=num_choices):
        letter, (kind,) = _derive_mc_answer(example.instruction)
        assert example.answer == letter
        assert example.output == f"The answer is {letter}\n#### {letter}"
        assert extract_answer(example.output) == letter
        assert example.input == ""
        assert len(example.instruction.split("\n")) == num_choices + 1
        assert len(example.instruction) + len(example.output) < (200 if num_choices <= 4 else 220)
        kinds[kind] += 1
    assert set(kinds) == {"compare", "alphabet", "logic"}
    assert min(kinds.values()) > 50


@pytest.mark.parametrize("kinds", [["compare"], ["alphabet", "logic"]])
def test_multiple_choice_draws_only_the_chosen_kinds(kinds):
    drawn = Counter()
    for example in multiple_choice_examples(120, seed=3, num_choices=3, kinds=kinds):
        letter, (kind,) = _derive_mc_answer(example.instruction)
        assert example.answer == letter
        drawn[kind] += 1
    assert set(drawn) == set(kinds)


def test_all_kinds_by_default_draw_the_same_examples_as_naming_them():
    named = multiple_choice_examples(50, seed=4, kinds=("compare", "alphabet", "logic"))
    assert named == multiple_choice_examples(50, seed=4)


def test_multiple_choice_letters_are_balanced():
    counts = Counter(example.answer for example in multiple_choice_examples(400, seed=0))
    assert counts == {"A": 100, "B": 100, "C": 100, "D": 100}
    odd = Counter(example.answer for example in multiple_choice_examples(403, seed=1, num_choices=3))
    assert sorted(odd.values()) == [134, 134, 135]
    for prefix in (5, 17, 99):
        counts = Counter(example.answer for example in multiple_choice_examples(prefix, seed=2))
        assert max(counts.values()) - min(counts.values()) <= 1
    first_letters = [example.answer for example in multiple_choice_examples(40, seed=0)]
    assert first_letters != sorted(first_letters)


def test_pretraining_corpus_content():
    documents = pretraining_corpus(500, seed=0)
    assert all(0 < len(document) < 200 for document in documents)
    assert len(set(documents)) > 450
    facts = [fact for document in documents for fact in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", document)]
    assert len(facts) > 100
    for left, operator, right, result in facts:
        assert _APPLY[operator](int(left), int(right)) == int(result)
    for larger, smaller in re.findall(r"(\d+) is larger than (\d+)", " ".join(documents)):
        assert int(larger) > int(smaller)
    for early, late in re.findall(r"(\w+) comes before (\w+)", " ".join(documents)):
        assert early < late
    prompts = [document for document in documents if document.startswith("### Instruction:\n")]
    assert 50 < len(prompts) < 200
    header = format_prompt(arithmetic_examples(1)[0]).split("\n")[0]
    assert all(prompt.startswith(header) and "\n\n### Response:\n" in prompt for prompt in prompts)
    assert any("Count" in document for document in documents)
    assert any(" has " in document for document in documents)


def test_pretraining_corpus_holds_no_task_solutions():
    documents = pretraining_corpus(2000, seed=0)
    assert not any("How many" in document for document in documents)
    assert not any(re.search(r"^[A-F]\) ", document, re.MULTILINE) for document in documents)
    for document in documents:
        response = document.partition("### Response:\n")[2]
        assert response.count("=") <= 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: arithmetic_examples(0), "num_examples=0 must be >= 1"),
        (lambda: arithmetic_examples(5, min_steps=0), "min_steps=0 must be >= 1"),
        (lambda: arithmetic_examples(5, min_steps=3, max_steps=2), "max_steps=2 must be >= min_steps=3"),
        (lambda: arithmetic_examples(5, max_value=1), "max_value=1 must be >= 2"),
        (lambda: multiple_choice_examples(-1), "num_examples=-1 must be >= 1"),
        (lambda: multiple_choice_examples(5, num_choices=1), "num_choices=1 must be between 2 and 6"),
        (lambda: multiple_choice_examples(5, num_choices=7), "num_choices=7 must be between 2 and 6"),
        (lambda: multiple_choice_examples(5, kinds=[]), "kinds=[] must be a non-empty subset of"),
        (lambda: multiple_choice_examples(5, kinds=["riddle"]), "kinds=['riddle'] must be a non-empty subset of"),
        (lambda: pretraining_corpus(0), "num_documents=0 must be >= 1"),
    ],
)
def test_invalid_arguments(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_lettered_kinds_add_multiple_choice_questions_of_those_kinds_only():
    plain = pretraining_corpus(300, seed=4)
    lettered = pretraining_corpus(300, seed=4, lettered_kinds=["alphabet"])
    assert not any("\nA) " in document for document in plain)
    questions = [document for document in lettered if "\nA) " in document]
    assert 10 <= len(questions) <= 60, "about one document in ten"
    assert all("in the alphabet?" in question and "#### " in question for question in questions)
    with pytest.raises(ValueError, match=r"lettered_kinds=\['riddles'\] must be a subset of"):
        pretraining_corpus(3, lettered_kinds=["riddles"])
