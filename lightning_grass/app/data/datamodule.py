"""``InstructionDataModule``: a synthetic task or a local dataset, tokenized with the prompt masked out."""

from __future__ import annotations

import os
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler
from transformers import PreTrainedTokenizerBase

from lightning_grass.app.data.alpaca import SUFFIXES, load_alpaca
from lightning_grass.app.data.answers import DEFAULT_ANSWER_PATTERN
from lightning_grass.app.data.chat import CHAT_TEMPLATE_MODES, resolve_chat_template
from lightning_grass.app.data.collate import collate_batch
from lightning_grass.app.data.example import Example
from lightning_grass.app.data.hf_dataset import check_columns, load_hf_dataset
from lightning_grass.app.data.mixture import check_set_names, load_mixture
from lightning_grass.app.data.prompt import (
    PROMPT_FORMATS,
    TRUNCATION_POLICIES,
    TokenizedExample,
    check_special_tokens,
    tokenize_example,
)
from lightning_grass.app.data.synthetic import EXAMPLE_BYTES, MAX_GENERATED_EXAMPLES, TASKS
from lightning_grass.errors import DataFormatError, SettingTypeError, SettingValueError
from lightning_grass.setting_checks import check_int

#: What :meth:`InstructionDataModule.setup` fills in: a tokenized split or the kept examples.
_SetUp = TypeVar("_SetUp")


def _check_settings(counts: dict[str, tuple[object, int | None]], texts: dict[str, object]) -> None:
    """Check the types of the settings, and the range of the counts.

    Args:
        counts: Each integer setting's value and its minimum (``None``: any integer).
        texts: Each string setting's value.

    Raises:
        SettingTypeError: For a count that is not an integer (a bool, a float, ``nan`` or a string included),
            or a text that is not a string.
        SettingValueError: For a count below its minimum.
    """
    for name, (value, minimum) in counts.items():
        check_int(name, value, minimum)
    for name, value in texts.items():
        if not isinstance(value, str):
            raise SettingTypeError(f"{name}={value!r} must be a string, not {type(value).__name__}")


def _check_generated_counts(counts: dict[str, int]) -> None:
    """Refuse split sizes of a generated task that would not fit in memory, before anything is generated.

    Args:
        counts: ``num_train``, ``num_val`` and ``num_test``, each an integer >= 0.

    Raises:
        SettingValueError: When they add up to more than
            :data:`~lightning_grass.app.data.synthetic.MAX_GENERATED_EXAMPLES`; the message names the largest.
    """
    total = sum(counts.values())
    if total <= MAX_GENERATED_EXAMPLES:
        return
    name = max(counts, key=counts.__getitem__)
    raise SettingValueError(
        f"{name}={counts[name]} asks for more examples than a generated task holds in memory: num_train + num_val + "
        f"num_test may be at most {MAX_GENERATED_EXAMPLES:,} (about {EXAMPLE_BYTES // 1000} KB each once tokenized, "
        f"{MAX_GENERATED_EXAMPLES * EXAMPLE_BYTES / 1e9:.0f} GB in all) and is {total:,}; lower {name}, or train on a "
        "local dataset"
    )


def _after_setup(value: _SetUp | None, request: str) -> _SetUp:
    """``value``, which :meth:`InstructionDataModule.setup` fills in.

    Args:
        value: What ``setup`` stored, ``None`` before it ran.
        request: What asked for ``value``, for the message, e.g. ``"val_examples is read"``.

    Returns:
        ``value``.

    Raises:
        RuntimeError: When ``value`` is ``None``: ``setup`` has not run.
    """
    if value is None:
        raise RuntimeError(f"InstructionDataModule.setup() must run before {request}")
    return value


class InstructionDataModule(pl.LightningDataModule):
    r"""Train and validation batches of one instruction task, with the loss on the response only.

    ``task`` is either a name in :data:`~lightning_grass.app.data.TASKS` or the path of a local dataset:

    - a generated task draws ``num_train + num_val + num_test`` examples from its generator with ``seed``
      (and ``task_options`` as keyword arguments); the first ``num_train`` are the training split, the next
      ``num_val`` the validation split and the last ``num_test`` the test split; together they are at most
      :data:`~lightning_grass.app.data.synthetic.MAX_GENERATED_EXAMPLES` (a million, about 4 GB of memory);
    - a ``.json`` or ``.jsonl`` Alpaca file without ``columns`` is read with
      :func:`~lightning_grass.app.data.load_alpaca` (errors name the file and line); with ``columns``, and for
      a ``.csv`` or ``.parquet`` file or a ``save_to_disk`` folder (its ``split``), the data is read with
      :func:`~lightning_grass.app.data.load_hf_dataset`, Alpaca records or conversations as ``columns`` says
      (``None``: ``instruction``, optional ``input``, ``output``). Both use ``answer_pattern``. The last
      ``num_test`` records go to the test split, the ``num_val`` before them to validation and all the others
      to training. ``setup`` refuses, before tokenizing anything, a ``num_test`` that leaves fewer than two
      records, and a ``num_val`` above half of the records ``num_test`` leaves, so that at least as many
      remain for training. ``num_train`` is unused.

    With ``sets``, ``task`` is a checkout of LLM-Adapters or its ``dataset`` folder, and the data is the mixture
    of the named sets' training splits (``<set>/train.json``), shuffled together by ``seed``
    (:func:`~lightning_grass.app.data.mixture.load_mixture`), then split as a local file is. Their test splits are
    scored by ``evaluate_suite`` (:class:`~lightning_grass.app.suite_evaluation.SuiteEvaluation`).

    ``chat_template`` chooses how an example becomes text. ``"auto"`` uses the tokenizer's chat template when
    ``tokenizer.chat_template`` is set and the Alpaca prompt of :func:`~lightning_grass.app.data.format_prompt`
    otherwise; ``"none"`` always uses the Alpaca prompt; any other value is a Jinja template used instead of
    the tokenizer's. With a template, an Alpaca record is the conversation of a user message (``instruction``,
    then ``"\n\n"`` and ``input`` when there is one) and an assistant message (``output``), and the loss covers
    the tokens of every assistant turn (see :func:`~lightning_grass.app.data.tokenize_example`). Conversations
    need a template, like ``apply_chat_template``: without one, ``setup`` raises a ``DataFormatError``.
    ``setup`` stores the template in each example's ``chat_template``, so that evaluation prompts with it too.
    Without a template, ``prompt_format`` chooses the Alpaca prompt: ``"compact"`` (the ``### Instruction:``,
    ``### Input:`` and ``### Response:`` headers) or ``"alpaca"`` (the same after Stanford Alpaca's preamble, the
    template LLM-Adapters trains with); ``setup`` stores it in each example's ``prompt_format``.

    The test split is never trained on nor validated on: it is there to report a score after choosing
    settings (a learning rate, say) on validation. :attr:`test_examples` holds it.

    The tokenizer may be passed here or assigned to :attr:`tokenizer` any time before :meth:`setup`. Each
    example is tokenized by :func:`~lightning_grass.app.data.tokenize_example`; ``setup`` logs, once per split,
    how many examples were truncated or skipped and keeps the totals over both splits in
    :attr:`num_truncated` and :attr:`num_skipped`.

    Args:
        task: A name in ``TASKS``, the path of a ``.json``, ``.jsonl``, ``.csv`` or ``.parquet`` file, or of a
            folder written by ``save_to_disk``.
        tokenizer: A tokenizer with pad and eos tokens, or ``None`` to assign it later.
        num_train: Training examples of a generated task, ``>= 1``.
        num_val: Validation examples, ``>= 1``.
        num_test: Test examples, ``>= 0`` (default 0: no test split).
        seed: Seed of the task generator and of the training shuffle.
        max_length: The most tokens per example, ``>= 1``. The default, 192, fits every synthetic example
            generated with default task options.
        batch_size: Examples per batch, ``>= 1``.
        truncation: ``"truncate"`` cuts the end of long responses; ``"skip"`` drops long examples.
        answer_pattern: Pattern extracting the answer from a file record's ``output``; ``""`` for no answer.
            Typed ``str`` rather than optional so that the Lightning CLI keeps a value starting with ``#``
            (it parses optional strings as YAML, where ``#`` starts a comment).
        task_options: Keyword arguments of the task generator, e.g. ``{"max_steps": 4}``; generated tasks only.
        num_workers: Data loader worker processes, ``>= 0``.
        columns: Our fields mapped to the dataset's columns, ``{"instruction", "input", "output", "answer"}``
            (``input`` and ``answer`` optional or ``None``) or ``{"messages", "answer"}`` for conversations;
            local datasets only. ``None`` reads ``.json`` / ``.jsonl`` with ``load_alpaca``.
        split: The split of a ``DatasetDict`` folder.
        chat_template: ``"auto"``, ``"none"`` or a Jinja chat template, as described above.
        prompt_format: ``"compact"`` or ``"alpaca"``: the Alpaca prompt used without a chat template.
        sets: LLM-Adapters sets whose training splits are mixed, e.g. ``["boolq", "ARC-Easy", "openbookqa"]``;
            ``None`` reads ``task`` as one dataset.

    Raises:
        SettingTypeError: For a count or ``seed`` that is not an integer (a string, a bool, a float such as
            ``nan``), a ``task`` that is neither a string nor a path, or another text setting that is not a
            string.
        SettingValueError: For an unknown task that is not an existing file or folder, ``task_options`` or
            ``columns`` with a generated task, a ``split`` other than ``"train"`` for a task that is not a
            folder, ``columns`` that :func:`~lightning_grass.app.data.hf_dataset.check_columns` refuses, a
            ``chat_template`` that is neither a mode nor a Jinja template, an unknown ``truncation`` or
            ``prompt_format``, a count outside the ranges above, or split sizes of a generated task that add up
            to more than :data:`~lightning_grass.app.data.synthetic.MAX_GENERATED_EXAMPLES`.
    """

    def __init__(
        self,
        task: str = "arithmetic",
        tokenizer: PreTrainedTokenizerBase | None = None,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 0,
        seed: int = 0,
        max_length: int = 192,
        batch_size: int = 16,
        truncation: str = "truncate",
        answer_pattern: str = DEFAULT_ANSWER_PATTERN,
        task_options: dict[str, Any] | None = None,
        num_workers: int = 0,
        columns: dict[str, str | None] | None = None,
        split: str = "train",
        chat_template: str = "auto",
        prompt_format: str = "compact",
        sets: list[str] | None = None,
    ) -> None:
        super().__init__()
        _check_settings(
            counts={
                "num_train": (num_train, 1),
                "num_val": (num_val, 1),
                "num_test": (num_test, 0),
                "max_length": (max_length, 1),
                "batch_size": (batch_size, 1),
                "num_workers": (num_workers, 0),
                "seed": (seed, None),
            },
            texts={
                "truncation": truncation,
                "answer_pattern": answer_pattern,
                "split": split,
                "chat_template": chat_template,
                "prompt_format": prompt_format,
            },
        )
        if not isinstance(task, (str, os.PathLike)):
            raise SettingTypeError(
                f"task={task!r} must be a task name or the path of a data file or folder, not {type(task).__name__}"
            )
        if sets is not None:
            sets = list(check_set_names("sets", sets))
            if not Path(task).is_dir():
                raise SettingValueError(
                    f"task={task!r} must be a directory with sets={sets!r}: a checkout of LLM-Adapters or its "
                    "'dataset' folder, holding <set>/train.json for each set"
                )
            if columns is not None:
                raise SettingValueError(f"columns={columns!r} do not apply to sets={sets!r}, which are Alpaca records")
        if task not in TASKS and not Path(task).exists():
            raise SettingValueError(
                f"task={task!r} is neither a known task ({', '.join(sorted(TASKS))}) nor an existing data file "
                "(.json, .jsonl, .csv, .parquet) or save_to_disk folder"
            )
        if task in TASKS:
            _check_generated_counts({"num_train": num_train, "num_val": num_val, "num_test": num_test})
        if task_options and task not in TASKS:
            raise SettingValueError(
                f"task_options={task_options!r} apply only to generated tasks, not to file {task!r}"
            )
        if columns is not None and task in TASKS:
            raise SettingValueError(f"columns={columns!r} apply only to local datasets, not to generated task {task!r}")
        if columns is not None:
            check_columns(columns)
        if split != "train" and (sets is not None or not Path(task).is_dir()):
            raise SettingValueError(
                f"split={split!r} chooses a split of a DatasetDict folder written by save_to_disk; "
                f"task={task!r} is not a folder, so leave split='train'"
            )
        if chat_template not in CHAT_TEMPLATE_MODES and not ("{{" in chat_template or "{%" in chat_template):
            raise SettingValueError(
                f"chat_template={chat_template!r} is neither one of {CHAT_TEMPLATE_MODES} nor a Jinja template "
                "(it has no '{{' or '{%')"
            )
        if truncation not in TRUNCATION_POLICIES:
            raise SettingValueError(f"truncation={truncation!r} is not supported; use one of {TRUNCATION_POLICIES}")
        if prompt_format not in PROMPT_FORMATS:
            raise SettingValueError(f"prompt_format={prompt_format!r} is not supported; use one of {PROMPT_FORMATS}")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.task = task
        self.tokenizer = tokenizer
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test
        self.seed = seed
        self.max_length = max_length
        self.batch_size = batch_size
        self.truncation = truncation
        self.answer_pattern = answer_pattern
        self.task_options = dict(task_options or {})
        self.num_workers = num_workers
        self.columns = dict(columns) if columns is not None else None
        self.split = split
        self.chat_template = chat_template
        self.prompt_format = prompt_format
        self.sets = sets
        self.num_truncated = 0
        self.num_skipped = 0
        self._train: list[TokenizedExample] | None = None
        self._val: list[TokenizedExample] | None = None
        self._val_examples: list[Example] | None = None
        self._test_examples: list[Example] | None = None
        self._built_with: PreTrainedTokenizerBase | None = None

    def _splits(self) -> tuple[list[Example], list[Example], list[Example]]:
        """The raw training, validation and test examples.

        Returns:
            ``(train, val, test)``, split as described in the class docstring; training and validation hold
            at least one example each.

        Raises:
            DataFormatError: For a local dataset of fewer than two records, or one that cannot be read.
            SettingValueError: For a local dataset too small for ``num_test`` and ``num_val``.
        """
        if self.task in TASKS:
            total = self.num_train + self.num_val + self.num_test
            examples = TASKS[self.task](total, seed=self.seed, **self.task_options)
            first_test = self.num_train + self.num_val
            return examples[: self.num_train], examples[self.num_train : first_test], examples[first_test:]
        if self.sets is not None:
            examples = load_mixture(self.task, self.sets, self.seed, self.answer_pattern or None)
        elif self.columns is None and Path(self.task).suffix.lower() in SUFFIXES:
            examples = load_alpaca(self.task, self.answer_pattern or None)
        else:
            examples = load_hf_dataset(self.task, self.columns, self.split, self.answer_pattern or None)
        self._check_split_sizes(len(examples))
        first_val = len(examples) - self.num_test - self.num_val
        first_test = len(examples) - self.num_test
        return examples[:first_val], examples[first_val:first_test], examples[first_test:]

    def _check_split_sizes(self, total: int) -> None:
        """Check that a local dataset of ``total`` records holds ``num_test``, ``num_val`` and training records.

        Args:
            total: The number of records.

        Raises:
            DataFormatError: For fewer than two records.
            SettingValueError: When ``num_test`` leaves fewer than two records, or ``num_val`` is more than half
                of the records it leaves.
        """
        if total < 2:
            raise DataFormatError(
                f"task {self.task!r} holds {total} record; training and validation need at least one each, so "
                "it must hold at least 2"
            )
        left = total - self.num_test
        if left < 2:
            raise SettingValueError(
                f"num_test={self.num_test} leaves {max(left, 0)} of the {total} records of task {self.task!r} for "
                f"training and validation, which need at least one each; num_test must be at most {total - 2}"
            )
        if self.num_val > left // 2:
            raise SettingValueError(
                f"num_val={self.num_val} is more than half of the {left} records that task {self.task!r} has for "
                f"training and validation ({total} records, num_test={self.num_test}); at least as many must remain "
                f"for training, so num_val must be at most {left // 2}"
            )

    def _tokenize(self, examples: list[Example], split: str) -> tuple[list[TokenizedExample], list[Example]]:
        """Tokenize one split, count and log what was truncated or skipped.

        Args:
            examples: The raw examples of the split.
            split: ``"training"``, ``"validation"`` or ``"test"``, for messages.

        Returns:
            The tokenized examples and the raw examples they came from, in the same order.

        Raises:
            DataFormatError: When every example of the split was skipped.
        """
        tokenized, kept = [], []
        for example in examples:
            result = tokenize_example(self.tokenizer, example, self.max_length, self.truncation)
            if result is not None:
                tokenized.append(result)
                kept.append(example)
        num_truncated = sum(result.truncated for result in tokenized)
        num_skipped = len(examples) - len(tokenized)
        prefix = f"{{}} of {len(examples)} {split} examples were longer than max_length={self.max_length}"
        if num_truncated:
            rank_zero_info(f"{prefix.format(num_truncated)} and were truncated")
        if num_skipped:
            reason = " (their prompt alone fills max_length)" if self.truncation == "truncate" else ""
            rank_zero_info(f"{prefix.format(num_skipped)} and were skipped{reason}")
        if not tokenized:
            hint = (
                "raise max_length" if self.truncation == "truncate" else "raise max_length or use truncation='truncate'"
            )
            raise DataFormatError(
                f"the {split} split of task {self.task!r} contains no examples after skipping {num_skipped} "
                f"of {len(examples)} longer than max_length={self.max_length}; expected at least one, so {hint}"
            )
        self.num_truncated += num_truncated
        self.num_skipped += num_skipped
        return tokenized, kept

    def setup(self, stage: str | None = None) -> None:
        """Build and tokenize both splits; later calls with the same tokenizer do nothing.

        Args:
            stage: The Lightning stage; both splits are built whatever it is.

        Raises:
            SettingValueError: When :attr:`tokenizer` is ``None`` or lacks a pad or eos token, or a local
                dataset is too small for ``num_test`` and ``num_val``.
            DataFormatError: When a split is empty after skipping long examples, or for data that cannot be
                read or rendered.
        """
        if self.tokenizer is None:
            raise SettingValueError(
                "InstructionDataModule.tokenizer is None; pass tokenizer=... or set datamodule.tokenizer before setup()"
            )
        check_special_tokens(self.tokenizer)
        if self._built_with is self.tokenizer:
            return
        self.num_truncated = self.num_skipped = 0
        template = resolve_chat_template(self.tokenizer, self.chat_template)
        rendering = {"chat_template": template, "prompt_format": self.prompt_format}
        train, val, test = ([replace(e, **rendering) for e in split] for split in self._splits())
        self._train, _ = self._tokenize(train, "training")
        self._val, self._val_examples = self._tokenize(val, "validation")
        self._test_examples = self._tokenize(test, "test")[1] if test else []
        self._built_with = self.tokenizer

    def _loader(self, dataset: list[TokenizedExample] | None, shuffle: bool) -> StatefulDataLoader:
        """A resumable data loader over one tokenized split.

        The loader is torchdata's ``StatefulDataLoader``: Lightning saves its position in every checkpoint
        and restores it on resume, so a run resumed mid-epoch sees the same batches as one that never
        stopped. The shuffle has its own generator, seeded by ``seed``, which is part of that position.

        Args:
            dataset: The split, ``None`` before :meth:`setup`.
            shuffle: Whether to shuffle with a generator seeded by ``seed``.

        Returns:
            The data loader, collating with :func:`~lightning_grass.app.data.collate_batch`.

        Raises:
            RuntimeError: Before :meth:`setup`.
        """
        dataset = _after_setup(dataset, "a dataloader is requested")
        # The sampler owns the shuffle's generator. A generator shared with the loader would also feed the
        # loader's per-epoch base seed, which its saved state does not cover, and a resumed run would shuffle
        # the epochs after the one it stopped in differently.
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(self.seed)) if shuffle else None
        return StatefulDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=partial(collate_batch, pad_token_id=self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        """The training batches, shuffled by a generator seeded with ``seed``.

        Returns:
            A data loader of ``input_ids``, ``attention_mask`` and ``labels`` batches.
        """
        return self._loader(self._train, shuffle=True)

    def val_dataloader(self) -> StatefulDataLoader:
        """The validation batches, in order.

        Returns:
            A data loader of ``input_ids``, ``attention_mask`` and ``labels`` batches.
        """
        return self._loader(self._val, shuffle=False)

    @property
    def test_examples(self) -> list[Example]:
        """The raw test examples that were kept (empty without ``num_test``), for a score reported at the end.

        Raises:
            RuntimeError: Before :meth:`setup`.
        """
        return _after_setup(self._test_examples, "test_examples is read")

    @property
    def val_examples(self) -> list[Example]:
        """The raw validation examples that were kept, in the order of :meth:`val_dataloader`.

        Raises:
            RuntimeError: Before :meth:`setup`.
        """
        return _after_setup(self._val_examples, "val_examples is read")
