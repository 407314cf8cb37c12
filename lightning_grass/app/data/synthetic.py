"""Synthetic instruction tasks and a pretraining corpus, generated deterministically from a seed.

They stand in for GSM8K and a commonsense multiple-choice suite when there is no network: texts are short
enough for tiny models, and every answer can be re-derived from the question text.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence

from lightning_grass.app.data.example import Example
from lightning_grass.app.data.prompt import format_prompt
from lightning_grass.errors import SettingValueError

#: Names with their pronoun, shared by the tasks and the pretraining corpus.
PEOPLE = (
    ("Tom", "He"),
    ("Ann", "She"),
    ("Ben", "He"),
    ("Mia", "She"),
    ("Sam", "He"),
    ("Eva", "She"),
    ("Leo", "He"),
    ("Zoe", "She"),
    ("Max", "He"),
    ("Ivy", "She"),
)

#: Countable objects of the word problems.
OBJECTS = ("apples", "pens", "marbles", "coins", "books", "stickers", "cards", "shells", "eggs", "cookies")

#: Lowercase words for the alphabet questions; Python's ``<`` on them is alphabetical order.
WORDS = (
    "apple",
    "berry",
    "cherry",
    "date",
    "fig",
    "grape",
    "kiwi",
    "lemon",
    "lime",
    "mango",
    "melon",
    "olive",
    "peach",
    "pear",
    "plum",
)

#: Comparative adjective -> (superlative of the greatest, superlative of the least), for the logic questions.
RELATIONS = {"taller": ("tallest", "shortest"), "older": ("oldest", "youngest"), "faster": ("fastest", "slowest")}

_ADD_PHRASES = ("buys {n} more", "finds {n} more", "gets {n} more")
_SUBTRACT_PHRASES = ("gives away {n}", "loses {n}", "sells {n}")
_MULTIPLY_PHRASES = {2: "doubles them", 3: "triples them"}
_MAX_CHOICES = 6
#: The kinds of multiple-choice question: number comparison, alphabetical order, and ordering chains.
MULTIPLE_CHOICE_KINDS = ("compare", "alphabet", "logic")
_MAX_DOCUMENT_CHARS = 200


def _require_positive(name: str, value: int) -> None:
    """Raise for a count below 1.

    Args:
        name: The argument's name, for the message.
        value: The argument's value.

    Raises:
        SettingValueError: When ``value < 1``.
    """
    if value < 1:
        raise SettingValueError(f"{name}={value!r} must be >= 1")


def _arithmetic_example(rng: random.Random, min_steps: int, max_steps: int, max_value: int) -> Example:
    """One word problem of ``min_steps`` to ``max_steps`` operations, with its worked solution.

    Args:
        rng: The source of randomness.
        min_steps: Fewest operations after the starting amount.
        max_steps: Most operations after the starting amount.
        max_value: Largest starting amount and largest number added.

    Returns:
        The example; every intermediate result is at least 1.
    """
    name, pronoun = rng.choice(PEOPLE)
    objects = rng.choice(OBJECTS)
    value = rng.randint(2, max_value)
    sentences = [f"{name} has {value} {objects}."]
    lines = []
    for _ in range(rng.randint(min_steps, max_steps)):
        operations = ["add"]
        if value >= 2:
            operations.append("subtract")
        if value <= max_value:
            operations.append("multiply")
        operation = rng.choice(operations)
        if operation == "add":
            amount = rng.randint(1, max_value)
            sentences.append(f"{pronoun} {rng.choice(_ADD_PHRASES).format(n=amount)}.")
            lines.append(f"{value} + {amount} = {value + amount}")
            value += amount
        elif operation == "subtract":
            amount = rng.randint(1, value - 1)
            sentences.append(f"{pronoun} {rng.choice(_SUBTRACT_PHRASES).format(n=amount)}.")
            lines.append(f"{value} - {amount} = {value - amount}")
            value -= amount
        else:
            factor = rng.choice(tuple(_MULTIPLY_PHRASES))
            sentences.append(f"{pronoun} {_MULTIPLY_PHRASES[factor]}.")
            lines.append(f"{value} * {factor} = {value * factor}")
            value *= factor
    sentences.append(f"How many {objects} does {name} have now?")
    lines.append(f"#### {value}")
    return Example(instruction=" ".join(sentences), input="", output="\n".join(lines), answer=str(value))


def arithmetic_examples(
    num_examples: int, seed: int = 0, min_steps: int = 2, max_steps: int = 3, max_value: int = 20
) -> list[Example]:
    """GSM8K-style word problems of several steps, with a worked solution ending in ``#### <answer>``.

    A person starts with some objects, then buys, loses or doubles them; the question asks how many are left.
    The solution has one line per step, like ``"5 + 3 = 8"`` (``*`` for multiplication), then ``#### 8``.
    Intermediate results are never below 1, and only amounts up to ``max_value`` are doubled or tripled.

    Args:
        num_examples: How many examples, ``>= 1``.
        seed: Seed of the ``random.Random`` that draws everything; the same seed gives the same list.
        min_steps: Fewest operations per problem, ``>= 1``.
        max_steps: Most operations per problem, ``>= min_steps``.
        max_value: Largest starting amount and largest number added, ``>= 2``.

    Returns:
        The examples, with the question as ``instruction``, ``input == ""`` and the final number as ``answer``.

    Raises:
        SettingValueError: For an argument outside the ranges above.
    """
    _require_positive("num_examples", num_examples)
    _require_positive("min_steps", min_steps)
    if max_steps < min_steps:
        raise SettingValueError(f"max_steps={max_steps!r} must be >= min_steps={min_steps!r}")
    if max_value < 2:
        raise SettingValueError(f"max_value={max_value!r} must be >= 2")
    rng = random.Random(seed)
    return [_arithmetic_example(rng, min_steps, max_steps, max_value) for _ in range(num_examples)]


def _place(rng: random.Random, correct: str, others: list[str], position: int) -> list[str]:
    """Options in random order with the correct one at ``position``.

    Args:
        rng: The source of randomness.
        correct: The right option.
        others: The wrong options.
        position: Index of the right option in the result.

    Returns:
        All options.
    """
    options = list(others)
    rng.shuffle(options)
    options.insert(position, correct)
    return options


def _multiple_choice_question(
    rng: random.Random, num_choices: int, position: int, kinds: Sequence[str]
) -> tuple[str, list[str]]:
    """A comparison, alphabet or logic question whose right option sits at ``position``.

    Args:
        rng: The source of randomness.
        num_choices: How many options.
        position: Index of the right option.
        kinds: The kinds to draw from (see :data:`MULTIPLE_CHOICE_KINDS`).

    Returns:
        The question line and the options.
    """
    kind = rng.choice(tuple(kinds))
    if kind == "compare":
        numbers = rng.sample(range(1, 100), num_choices)
        largest = rng.random() < 0.5
        correct = max(numbers) if largest else min(numbers)
        others = [str(number) for number in numbers if number != correct]
        question = f"Which number is {'largest' if largest else 'smallest'}?"
        return question, _place(rng, str(correct), others, position)
    if kind == "alphabet":
        words = rng.sample(WORDS, num_choices)
        first = rng.random() < 0.5
        correct = min(words) if first else max(words)
        question = f"Which word comes {'first' if first else 'last'} in the alphabet?"
        return question, _place(rng, correct, [word for word in words if word != correct], position)
    relation = rng.choice(tuple(RELATIONS))
    ranked = [name for name, _ in rng.sample(PEOPLE, num_choices)]
    facts = [f"{ranked[i]} is {relation} than {ranked[i + 1]}." for i in range(num_choices - 1)]
    rng.shuffle(facts)
    greatest = rng.random() < 0.5
    correct = ranked[0] if greatest else ranked[-1]
    superlative = RELATIONS[relation][0 if greatest else 1]
    question = f"{' '.join(facts)} Who is {superlative}?"
    return question, _place(rng, correct, [name for name in ranked if name != correct], position)


def multiple_choice_examples(
    num_examples: int, seed: int = 0, num_choices: int = 4, kinds: Sequence[str] = MULTIPLE_CHOICE_KINDS
) -> list[Example]:
    r"""Questions answered by a letter, standing in for a commonsense multiple-choice suite.

    Three kinds, drawn at random from ``kinds``, each re-derivable from its text:

    - ``compare``: ``"Which number is largest?"`` / ``"smallest"`` over distinct numbers 1..99;
    - ``alphabet``: ``"Which word comes first in the alphabet?"`` / ``"last"`` over distinct lowercase
      :data:`WORDS`;
    - ``logic``: a chain such as ``"Ann is taller than Bob. Bob is taller than Cy. Who is shortest?"`` (facts
      shuffled) over distinct names, asking for one end of the chain, with every name as an option.

    The instruction is the question, then one line per option: ``"A) 12"``. The right letters are balanced
    in every prefix of the list: each run of ``num_choices`` examples uses every letter once, in random
    order. Texts stay under 200 characters up to 4 choices; 6-choice chains reach about 200.

    Args:
        num_examples: How many examples, ``>= 1``.
        seed: Seed of the ``random.Random`` that draws everything; the same seed gives the same list.
        num_choices: Options per question, 2 to 6.
        kinds: Which kinds of question to draw, a non-empty subset of :data:`MULTIPLE_CHOICE_KINDS`.

    Returns:
        The examples, with ``output == "The answer is B\n#### B"`` and ``answer == "B"`` for letter B.

    Raises:
        SettingValueError: For ``num_examples < 1``, ``num_choices`` outside 2..6, or unknown or no ``kinds``.
    """
    _require_positive("num_examples", num_examples)
    if not 2 <= num_choices <= _MAX_CHOICES:
        raise SettingValueError(f"num_choices={num_choices!r} must be between 2 and {_MAX_CHOICES}")
    kinds = list(kinds)
    if not kinds or not set(kinds) <= set(MULTIPLE_CHOICE_KINDS):
        raise SettingValueError(f"kinds={kinds!r} must be a non-empty subset of {list(MULTIPLE_CHOICE_KINDS)}")
    rng = random.Random(seed)
    examples = []
    block: list[int] = []
    for index in range(num_examples):
        if index % num_choices == 0:
            block = rng.sample(range(num_choices), num_choices)
        position = block[index % num_choices]
        question, options = _multiple_choice_question(rng, num_choices, position, kinds)
        lettered = "\n".join(f"{string.ascii_uppercase[i]}) {option}" for i, option in enumerate(options))
        letter = string.ascii_uppercase[position]
        examples.append(
            Example(
                instruction=f"{question}\n{lettered}",
                input="",
                output=f"The answer is {letter}\n#### {letter}",
                answer=letter,
            )
        )
    return examples


def _arithmetic_fact(rng: random.Random) -> str:
    """A fact such as ``"7 + 5 = 12."``, never negative.

    Args:
        rng: The source of randomness.

    Returns:
        The fact.
    """
    left, right = rng.randint(0, 20), rng.randint(0, 20)
    operator = rng.choice("+-*")
    if operator == "-":
        left, right = max(left, right), min(left, right)
        return f"{left} - {right} = {left - right}."
    if operator == "*":
        left, right = left % 10, right % 10
        return f"{left} * {right} = {left * right}."
    return f"{left} + {right} = {left + right}."


def _counting(rng: random.Random) -> str:
    """A counting sequence such as ``"Counting by 2: 4, 6, 8, 10."``.

    Args:
        rng: The source of randomness.

    Returns:
        The sequence.
    """
    step = rng.choice((1, 1, 2, 5, 10))
    start = rng.randint(0, 20) * step
    numbers = ", ".join(str(start + step * index) for index in range(rng.randint(4, 10)))
    return f"Count: {numbers}." if step == 1 else f"Counting by {step}: {numbers}."


def _comparison(rng: random.Random) -> str:
    """A true comparison of two numbers, two words or two people.

    Args:
        rng: The source of randomness.

    Returns:
        The sentence.
    """
    kind = rng.choice(("number", "word", "person"))
    if kind == "number":
        low, high = sorted(rng.sample(range(0, 100), 2))
        return f"{high} is larger than {low}." if rng.random() < 0.5 else f"{low} is smaller than {high}."
    if kind == "word":
        early, late = sorted(rng.sample(WORDS, 2))
        return f"{early} comes before {late}." if rng.random() < 0.5 else f"{late} comes after {early}."
    (first, _), (second, _) = rng.sample(PEOPLE, 2)
    return f"{first} is {rng.choice(tuple(RELATIONS))} than {second}."


def _story(rng: random.Random) -> str:
    """A one-step sentence about a person and their objects.

    Args:
        rng: The source of randomness.

    Returns:
        The sentence.
    """
    name, pronoun = rng.choice(PEOPLE)
    objects = rng.choice(OBJECTS)
    count = rng.randint(2, 20)
    phrase = rng.choice(_ADD_PHRASES + _SUBTRACT_PHRASES).format(n=rng.randint(1, count - 1))
    return f"{name} has {count} {objects}. {pronoun} {phrase}."


def _question_answer(rng: random.Random) -> str:
    r"""A one-step question and its answer in the fine-tuning prompt format.

    Args:
        rng: The source of randomness.

    Returns:
        The prompt followed by the response, e.g. ``"...### Response:\n7 + 5 = 12\n#### 12"``.
    """
    if rng.random() < 0.5:
        left, right = rng.randint(0, 20), rng.randint(0, 20)
        example = Example(f"What is {left} + {right}?", "", f"{left} + {right} = {left + right}\n#### {left + right}")
    else:
        first, second = rng.sample(range(0, 100), 2)
        larger = max(first, second)
        example = Example(f"Which number is larger, {first} or {second}?", "", f"#### {larger}")
    return format_prompt(example) + example.output


_SENTENCE_KINDS: tuple[Callable[[random.Random], str], ...] = (_arithmetic_fact, _counting, _comparison, _story)


def _document(rng: random.Random, lettered_kinds: Sequence[str], lettered_share: float) -> str:
    """One document: a prompt-format question one time in five, otherwise sentences of one kind.

    With ``lettered_kinds``, a share ``lettered_share`` of documents is first a lettered question instead.

    Args:
        rng: The source of randomness.
        lettered_kinds: Multiple-choice kinds to pretrain on, or none.
        lettered_share: The share of documents that are lettered questions when there are kinds.

    Returns:
        The document, shorter than 200 characters (a lettered question with options may be longer).
    """
    if lettered_kinds and rng.random() < lettered_share:
        (example,) = multiple_choice_examples(1, rng.randrange(2**31), rng.randint(2, 4), lettered_kinds)
        return format_prompt(example) + example.output
    if rng.random() < 0.2:
        return _question_answer(rng)
    kind = rng.choice(_SENTENCE_KINDS)
    document = kind(rng)
    for _ in range(rng.randint(0, 5)):
        sentence = kind(rng)
        if len(document) + 1 + len(sentence) >= _MAX_DOCUMENT_CHARS:
            break
        document = f"{document} {sentence}"
    return document


def pretraining_corpus(
    num_documents: int, seed: int = 0, lettered_kinds: Sequence[str] = (), lettered_share: float = 0.1
) -> list[str]:
    """Broad synthetic text for pretraining a tiny base model on the tasks' vocabulary.

    Documents are arithmetic facts (``"7 + 5 = 12."``), counting, true comparisons, one-step sentences
    about the tasks' people and objects, and one-step questions in the fine-tuning prompt format. There are
    no multi-step worked solutions, so fine-tuning on arithmetic still has to teach them. Lettered options
    appear only with ``lettered_kinds``: then a share ``lettered_share`` of documents are multiple-choice
    questions of those kinds (2 to 4 options), so that a base learns the answer-by-letter format.

    Args:
        num_documents: How many documents, ``>= 1``.
        seed: Seed of the ``random.Random`` that draws everything; the same seed gives the same list.
        lettered_kinds: Kinds of :func:`multiple_choice_examples` to include; none by default.
        lettered_share: The share of lettered questions when ``lettered_kinds`` is given, in ``[0, 1]``.

    Returns:
        The documents, each shorter than 200 characters.

    Raises:
        SettingValueError: For ``num_documents < 1`` or an unknown lettered kind.
    """
    _require_positive("num_documents", num_documents)
    rng = random.Random(seed)
    kinds = list(lettered_kinds)
    if not set(kinds) <= set(MULTIPLE_CHOICE_KINDS):
        raise SettingValueError(f"lettered_kinds={kinds!r} must be a subset of {list(MULTIPLE_CHOICE_KINDS)}")
    if not 0 <= lettered_share <= 1:
        raise SettingValueError(f"lettered_share={lettered_share!r} must be in [0, 1]")
    return [_document(rng, kinds, lettered_share) for _ in range(num_documents)]


#: About how many bytes of memory one generated example takes once it is tokenized and held for training: its
#: texts, and its token ids and labels as Python lists (measured: 3.5 KB for the default arithmetic problems, less
#: for the multiple-choice questions).
EXAMPLE_BYTES = 4_000

#: The most examples a run generates (training, validation and test splits together): about 4 GB of memory at
#: :data:`EXAMPLE_BYTES` each, and minutes to generate and tokenize. The tasks are small stand-ins for real data,
#: and a model that a million of them do not teach needs a real dataset, not more of these.
MAX_GENERATED_EXAMPLES = 1_000_000

#: Task name -> generator ``(num_examples, seed, **options) -> list[Example]``.
TASKS: dict[str, Callable[..., list[Example]]] = {
    "arithmetic": arithmetic_examples,
    "multiple_choice": multiple_choice_examples,
}
