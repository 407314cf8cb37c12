r"""``grass-evaluate``: score any saved model directory on one of the paper's two suites, nothing else.

The model is any Hugging Face causal LM saved with ``save_pretrained`` with its tokenizer: the ``model/`` folder
``grass-train`` writes, or one fine-tuned with another tool. It is loaded with ``local_files_only=True`` (nothing
is downloaded), on the GPU when there is one. The test sets are read from LLM-Adapters' layout
(:func:`~lightning_grass.app.suites.load_suite`) before the model is loaded, so a missing set or a malformed
record is reported at once::

    grass-evaluate --model outputs/paper_arithmetic/<time>/model --suite arithmetic \
        --data-root /path/to/LLM-Adapters --out results/arithmetic

It writes ``<suite>.md``, ``<suite>.json`` and ``<suite>_predictions.jsonl`` into ``--out`` (see
:mod:`lightning_grass.app.suite_evaluation`) and prints the table. A tokenizer without a pad token pads with its
eos token, as in ``grass-train`` (prompts are left-padded under an attention mask). Bad input (a
missing directory or set, a malformed record, an unknown suite, an ``--out`` that cannot be written, a malformed
command line) stops it with one line, ``error: <message>``, and exit status 2, as for ``grass-train``, before the
model is loaded. SIGINT (Ctrl+C) or SIGTERM while the model loads or the suite is scored stops it with one line,
and exit status 130 or 143; no results are written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch
from typing_extensions import override

from lightning_grass.app.data.prompt import check_special_tokens
from lightning_grass.app.input_errors import report_input_errors
from lightning_grass.app.lm import DTYPES, TOKENIZER_FILES, CausalLMModule
from lightning_grass.app.run_directory import check_output_dir
from lightning_grass.app.stop_signals import StopRequested, stop_signals_raise
from lightning_grass.app.suite_evaluation import SuiteEvaluation
from lightning_grass.app.suites import SUITES
from lightning_grass.errors import MissingPathError, SettingValueError


class _Parser(argparse.ArgumentParser):
    """An argument parser whose refusals are bad input (one ``error:`` line) rather than a usage text."""

    @override
    def error(self, message: str) -> NoReturn:
        """Raise the parser's message as a :class:`~lightning_grass.errors.SettingValueError`."""
        raise SettingValueError(f"{message} (see {self.prog} --help)")


def _count(text: str) -> int:
    """An integer of at least 1, from the command line."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _parser() -> _Parser:
    parser = _Parser(prog="grass-evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a directory written by save_pretrained")
    parser.add_argument("--suite", required=True, choices=list(SUITES), help="which of the paper's suites")
    parser.add_argument(
        "--data-root",
        required=True,
        type=Path,
        help="LLM-Adapters' checkout (<root>/dataset/<set>/test.json) or its dataset folder (<root>/<set>/test.json)",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="the folder to write the table, JSON and predictions to"
    )
    parser.add_argument("--batch-size", type=_count, default=16, help="prompts per generate call (default 16)")
    parser.add_argument(
        "--max-new-tokens",
        type=_count,
        default=None,
        help="longest completion (default: LLM-Adapters', 256 for arithmetic and 32 for commonsense)",
    )
    parser.add_argument("--limit", type=_count, default=None, help="score only the first N examples of each set")
    parser.add_argument(
        "--sets",
        type=lambda text: [name for name in text.split(",") if name],
        default=None,
        help="comma-separated sets of the suite to score, e.g. boolq,ARC-Easy,openbookqa (default: all)",
    )
    parser.add_argument(
        "--sample", type=_count, default=None, help="score a fixed random subset of N records of each set"
    )
    parser.add_argument("--sample-seed", type=int, default=0, help="the subset's seed (default 0)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="load the weights in this dtype (default: the checkpoint's)",
    )
    return parser


def _load(model_dir: Path, dtype: str | None) -> CausalLMModule:
    """The saved model and its tokenizer, on the GPU when there is one, in eval mode."""
    if not model_dir.is_dir():
        raise MissingPathError(
            f"--model {str(model_dir)!r} is not a directory: give a directory written by save_pretrained"
        )
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise MissingPathError(
            f"--model {str(model_dir)!r} holds no tokenizer (none of {list(TOKENIZER_FILES)}): save the tokenizer "
            "with the model (tokenizer.save_pretrained into the same directory)"
        )
    module = CausalLMModule(pretrained_path=model_dir, dtype=dtype)
    check_special_tokens(module.tokenizer)
    return module.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: parse the command line, read the suite, load the model, score it and print the table.

    Args:
        argv: The arguments; ``None`` reads ``sys.argv``.

    Raises:
        SystemExit: With status 2 for bad input, or ``128 + signal`` when SIGINT or SIGTERM stopped it.
    """
    with report_input_errors():
        args = _parser().parse_args(argv)
        evaluation = SuiteEvaluation(
            args.suite,
            args.data_root,
            args.batch_size,
            args.max_new_tokens,
            args.limit,
            args.sets,
            args.sample,
            args.sample_seed,
        )
        check_output_dir(args.out, setting="--out")
        try:
            with stop_signals_raise():
                module = _load(args.model, args.dtype)
                result = evaluation.score(module.model, module.tokenizer)
        except StopRequested as stop:
            print(
                f"stopped by {stop.signal_name} before scoring ended; no results were written to {args.out}",
                file=sys.stderr,
            )
            raise SystemExit(stop.exit_status) from None
        evaluation.write(result, args.out, str(args.model))
    print(result.markdown(str(args.model)), end="")
    print(f"written to {args.out}: {args.suite}.md, {args.suite}.json, {args.suite}_predictions.jsonl")


if __name__ == "__main__":
    main()
