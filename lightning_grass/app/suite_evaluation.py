"""Scoring a model on one of the paper's suites, and writing the table in the paper's layout beside its JSON.

:class:`SuiteEvaluation` reads a suite's test sets (:func:`~lightning_grass.app.suites.load_suite`), completes
every prompt by batched greedy generation (:func:`~lightning_grass.app.evaluation.generate_answers`: left
padding, ``do_sample=False``), scores each response with its set's answer rule
(:mod:`lightning_grass.app.suite_answers`), and writes three files into the output folder:

- ``<suite>.md``: the paper's layout, one row with a column per set and then ``Avg.`` (accuracy in %, the mean
  of the sets' accuracies), then each set's correct and total;
- ``<suite>.json``: the suite, the model, the generation settings, the average, and per set ``correct``,
  ``total`` and ``accuracy_percent``;
- ``<suite>_predictions.jsonl``: one line per example (set, index, instruction, label, response, prediction,
  correct), to audit any score.

Both entry points use it: ``grass-evaluate`` (:mod:`lightning_grass.app.evaluate_cli`) on any saved model, and
``grass-train`` with an ``evaluate_suite`` setting (:meth:`SuiteEvaluation.from_config`) on the model it has just
saved, in memory (the weights of ``model/``; ``grass-evaluate`` on that folder writes the same predictions when it
runs on the same device and dtype with the same batch size). Prompts are LLM-Adapters' template
(:data:`~lightning_grass.app.suites.PROMPT_FORMAT`), whatever the model was trained with: train with
``data.prompt_format=alpaca data.chat_template=none``, as ``data=math_10k``, ``data=commonsense_170k`` and the
``paper_*`` presets do, or the scores measure a prompt the model has not seen.

Where this differs from LLM-Adapters' scripts (ours): they decode with 4-beam search and prompt with the
indentation their source code leaves inside the template; here decoding is greedy and batched, and the template
is Stanford Alpaca's as written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_grass.app.data import Example
from lightning_grass.app.evaluation import generate_answers
from lightning_grass.app.suite_answers import response_text
from lightning_grass.app.suites import SUITES, Benchmark, load_suite, seeded_subset
from lightning_grass.errors import SettingTypeError, SettingValueError
from lightning_grass.persistence.atomic_files import write_text_atomically
from lightning_grass.setting_checks import check_int

#: LLM-Adapters' ``max_new_tokens`` for each suite (``evaluate.py``, ``commonsense_evaluate.py``): the default.
MAX_NEW_TOKENS = {"arithmetic": 256, "commonsense": 32}

#: The settings an ``evaluate_suite`` config node may hold, with the defaults of those it may leave out
#: (``max_new_tokens=None``: the suite's :data:`MAX_NEW_TOKENS`).
CONFIG_DEFAULTS: dict[str, Any] = {
    "batch_size": 16,
    "max_new_tokens": None,
    "limit": None,
    "sets": None,
    "sample": None,
    "sample_seed": 0,
}

#: The settings an ``evaluate_suite`` config node must hold.
CONFIG_REQUIRED = ("name", "data_root")


@dataclass(frozen=True)
class BenchmarkScore:
    """How many examples of one set were answered right.

    Attributes:
        benchmark: The set.
        correct: Examples scored right.
        total: Examples scored, at least 1.
    """

    benchmark: Benchmark
    correct: int
    total: int

    @property
    def accuracy_percent(self) -> float:
        """``correct / total`` in percent."""
        return 100 * self.correct / self.total


@dataclass(frozen=True)
class SuiteResult:
    """A suite's scores and every example's prediction.

    Attributes:
        suite: The suite's name.
        scores: One score per set, in the order of :data:`~lightning_grass.app.suites.SUITES`.
        predictions: One record per example: ``set``, ``index`` (in the set's file, from 0), ``instruction``,
            ``label``, ``response``, ``prediction`` (``None`` when the response held none) and ``correct``.
    """

    suite: str
    scores: tuple[BenchmarkScore, ...]
    predictions: tuple[dict[str, Any], ...]

    @property
    def average_percent(self) -> float:
        """The mean of the sets' accuracies, in percent: the paper's ``Avg.``."""
        return sum(score.accuracy_percent for score in self.scores) / len(self.scores)

    def markdown(self, model_label: str) -> str:
        """The paper's table for this suite, then each set's counts.

        Args:
            model_label: The row's name, e.g. the model's directory.

        Returns:
            Markdown text.
        """
        titles = [score.benchmark.title for score in self.scores]
        cells = [f"{score.accuracy_percent:.2f}" for score in self.scores]
        lines = [
            f"| Model | {' | '.join(titles)} | Avg. |",
            "|" + "---|" * (len(titles) + 2),
            f"| {model_label} | {' | '.join(cells)} | {self.average_percent:.2f} |",
            "",
            "| set | correct | total | accuracy (%) |",
            "|---|---|---|---|",
        ]
        lines += [f"| {s.benchmark.title} | {s.correct} | {s.total} | {s.accuracy_percent:.2f} |" for s in self.scores]
        return "\n".join(lines) + "\n"

    def metrics(self) -> dict[str, Any]:
        """What ``grass-train`` adds to ``metrics.json``.

        Returns:
            ``suite`` (the name), ``suite_average_percent`` (the paper's ``Avg.``) and ``suite_accuracy_percent``
            (each set's accuracy, by the paper's name for it).
        """
        return {
            "suite": self.suite,
            "suite_average_percent": self.average_percent,
            "suite_accuracy_percent": {score.benchmark.title: score.accuracy_percent for score in self.scores},
        }


def score_suite(
    suite: str,
    sets: Mapping[Benchmark, Sequence[Example]],
    generate: Callable[[Sequence[Example]], Sequence[str]],
    indices: Mapping[Benchmark, Sequence[int]] | None = None,
) -> SuiteResult:
    """Score the completions ``generate`` gives for every example of every set.

    Args:
        suite: The suite's name.
        sets: Each set's examples, their ``answer`` the label.
        generate: Completes a list of examples: one text per example, the generation after the prompt.
        indices: Each example's index in its set's file, for the predictions; ``None``: their positions.

    Returns:
        The scores and predictions.
    """
    scores, predictions = [], []
    for benchmark, examples in sets.items():
        correct = 0
        positions = indices[benchmark] if indices is not None else range(len(examples))
        for index, example, completion in zip(positions, examples, generate(examples), strict=True):
            response = response_text(completion)
            prediction = benchmark.rule.extract(response)
            right = benchmark.rule.is_correct(prediction, example.answer)
            correct += right
            predictions.append(
                {
                    "set": benchmark.name,
                    "index": index,
                    "instruction": example.instruction,
                    "label": example.answer,
                    "response": response,
                    "prediction": prediction,
                    "correct": right,
                }
            )
        score = BenchmarkScore(benchmark, correct, len(examples))
        print(
            f"{suite} {benchmark.title}: {correct} of {len(examples)} right ({score.accuracy_percent:.2f}%)", flush=True
        )
        scores.append(score)
    return SuiteResult(suite, tuple(scores), tuple(predictions))


class SuiteEvaluation:
    """One suite's test sets, read and checked, and the generation settings to score a model on them.

    Reading happens here, so a missing set or a malformed record stops ``grass-train`` before it trains.

    Args:
        name: ``"arithmetic"`` or ``"commonsense"``.
        data_root: A checkout of LLM-Adapters or its ``dataset`` folder (see
            :func:`~lightning_grass.app.suites.load_suite`).
        batch_size: Prompts per ``generate`` call.
        max_new_tokens: Longest completion; ``None`` for LLM-Adapters' (:data:`MAX_NEW_TOKENS`).
        limit: Score only the first ``limit`` examples of each set; ``None`` for all.
        sets: LLM-Adapters' names of the suite's sets to score, e.g. ``["boolq", "ARC-Easy", "openbookqa"]``;
            ``None`` for all.
        sample: Score a fixed random subset of this many records of each set
            (:func:`~lightning_grass.app.suites.seeded_subset`), the same for every model; ``None`` for all.
        sample_seed: The subset's seed.

    Raises:
        SettingValueError, MissingPathError, DataFormatError: As :func:`~lightning_grass.app.suites.load_suite`.
        SettingValueError: For ``limit`` and ``sample`` given together.
    """

    def __init__(
        self,
        name: str,
        data_root: str | os.PathLike,
        batch_size: int = 16,
        max_new_tokens: int | None = None,
        limit: int | None = None,
        sets: Sequence[str] | None = None,
        sample: int | None = None,
        sample_seed: int = 0,
    ) -> None:
        if limit is not None and sample is not None:
            raise SettingValueError(
                f"limit={limit} and sample={sample} both choose the records to score; give one of them"
            )
        check_int("sample_seed", sample_seed, minimum=0)
        everything = load_suite(name, data_root, limit, sets)
        self.indices = {
            benchmark: seeded_subset(len(examples), sample, sample_seed, benchmark.name)
            if sample is not None
            else list(range(len(examples)))
            for benchmark, examples in everything.items()
        }
        self.sets = {benchmark: [everything[benchmark][i] for i in self.indices[benchmark]] for benchmark in everything}
        self.sample = sample
        self.sample_seed = sample_seed
        self.name = name
        self.data_root = Path(data_root)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[name]
        self.limit = limit

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> SuiteEvaluation | None:
        """The evaluation an ``evaluate_suite`` config node asks for, checked and read, or ``None`` for none.

        Args:
            node: ``None``, or a mapping (a ``DictConfig`` too) of ``name`` and ``data_root`` (required) and
                ``batch_size``, ``max_new_tokens``, ``limit``, ``sets``, ``sample`` and ``sample_seed`` (see
                :data:`CONFIG_DEFAULTS`).

        Returns:
            The evaluation, or ``None`` when ``node`` is ``None``.

        Raises:
            SettingValueError: For an unknown or missing setting, an unknown suite, or a count below 1.
            SettingTypeError: For a ``data_root`` that is not a string, or a count that is not an integer.
            MissingPathError, DataFormatError: As :func:`~lightning_grass.app.suites.load_suite`.
        """
        if node is None:
            return None
        if isinstance(node, DictConfig):  # a mandatory value left unset (???) reads as "???" and is refused below
            node = OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
        allowed = [*CONFIG_REQUIRED, *CONFIG_DEFAULTS]
        unknown = sorted(set(node) - set(allowed))
        if unknown:
            raise SettingValueError(f"evaluate_suite: unknown settings {unknown}; the settings are {allowed}")
        absent = [key for key in CONFIG_REQUIRED if node.get(key) in (None, "???")]
        if absent:
            raise SettingValueError(
                f"evaluate_suite needs {absent}: evaluate_suite.name (one of {list(SUITES)}) and "
                "evaluate_suite.data_root (a checkout of LLM-Adapters or its dataset folder)"
            )
        settings = {**CONFIG_DEFAULTS, **node}
        if settings["name"] not in SUITES:
            raise SettingValueError(
                f"evaluate_suite.name={settings['name']!r} is not a suite; use one of {list(SUITES)}"
            )
        if not isinstance(settings["data_root"], (str, os.PathLike)):
            raise SettingTypeError(f"evaluate_suite.data_root={settings['data_root']!r} must be a directory's path")
        for key in ("batch_size", "max_new_tokens", "limit", "sample"):
            if key == "batch_size" or settings[key] is not None:
                check_int(f"evaluate_suite.{key}", settings[key], minimum=1)
        return cls(**settings)

    def run(self, model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, model_label: str) -> SuiteResult:
        """Score ``model`` on every set and write ``<suite>.md``, ``<suite>.json`` and ``<suite>_predictions.jsonl``.

        Args:
            model: A Hugging Face causal LM, on the device it should generate on.
            tokenizer: Its tokenizer, with pad and eos tokens.
            out_dir: The folder to write into; created if needed.
            model_label: The model's name in the table and the JSON, e.g. its directory.

        Returns:
            The scores and predictions.
        """
        result = self.score(model, tokenizer)
        self.write(result, Path(out_dir), model_label)
        return result

    def score(self, model: nn.Module, tokenizer: Any) -> SuiteResult:
        """Score ``model`` on every set, writing nothing.

        Args:
            model: A Hugging Face causal LM, on the device it should generate on.
            tokenizer: Its tokenizer, with pad and eos tokens.

        Returns:
            The scores and predictions.
        """
        return score_suite(
            self.name,
            self.sets,
            lambda examples: generate_answers(model, tokenizer, examples, self.max_new_tokens, self.batch_size),
            self.indices,
        )

    def write(self, result: SuiteResult, out_dir: Path, model_label: str) -> None:
        """Write ``result``'s table, JSON and predictions into ``out_dir`` (created if needed; each file atomically).

        Args:
            result: The scores.
            out_dir: The folder.
            model_label: The model's name in the table and the JSON.
        """
        predictions_file = out_dir / f"{self.name}_predictions.jsonl"
        summary = {
            "suite": self.name,
            "model": model_label,
            "data_root": str(self.data_root),
            "decoding": "greedy",
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "limit": self.limit,
            "sample": self.sample,
            "sample_seed": self.sample_seed,
            "average_percent": result.average_percent,
            "sets": {
                score.benchmark.name: {
                    "title": score.benchmark.title,
                    "correct": score.correct,
                    "total": score.total,
                    "accuracy_percent": score.accuracy_percent,
                }
                for score in result.scores
            },
            "predictions": predictions_file.name,
        }
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in result.predictions)
        write_text_atomically(predictions_file, lines)
        write_text_atomically(out_dir / f"{self.name}.json", json.dumps(summary, indent=2) + "\n")
        write_text_atomically(out_dir / f"{self.name}.md", f"# {self.name} suite\n\n" + result.markdown(model_label))
