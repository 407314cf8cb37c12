"""``grass-cli``: the Lightning CLI for fine-tuning with GRASS, configured by YAML with ``class_path``/``init_args``.

grass-cli fit --config conf/cli/grass.yaml
grass-cli fit --config conf/cli/grass.yaml --trainer.strategy=grass --print_config

Bad input stops it with one line, ``error: <message>``, and exit status 2, as for ``grass-train`` (see
:mod:`lightning_grass.app.input_errors`): a setting that a class refuses (``GRASSStrategy``, ``GRASSCallback``,
the model, the data), a setting that Lightning's ``Trainer`` refuses (``error: trainer: ...``), a seed out of
range, a ``--ckpt_path`` that training cannot resume from (checked as ``grass-train`` checks it), and a malformed
command line, reported in jsonargparse's own words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import lightning_grass  # noqa: F401  (registers strategy="grass" and its presets)
from lightning_grass.app.checkpoints import check_resume_checkpoint
from lightning_grass.app.data import InstructionDataModule, build_char_tokenizer
from lightning_grass.app.input_errors import find_input_error, report_input_errors, trainer_settings
from lightning_grass.app.lm import CausalLMModule
from lightning_grass.app.trainer_checks import check_trainer_settings
from lightning_grass.errors import InputError
from lightning_grass.persistence.atomic_checkpoint_io import read_checkpoint
from lightning_grass.setting_checks import check_seed


class GRASSCLI(LightningCLI):
    """``LightningCLI`` over :class:`~lightning_grass.app.lm.CausalLMModule` and ``InstructionDataModule``.

    The model's answer pattern is the data's (``--data.answer_pattern``), so exact match reads answers the
    way the data writes them, and the datamodule gets the model's tokenizer (or the built-in character
    tokenizer) before fitting.
    """

    @override
    def add_arguments_to_parser(self, parser: Any) -> None:
        """Derive ``model.answer_pattern`` from ``data.answer_pattern``."""
        parser.link_arguments("data.answer_pattern", "model.answer_pattern")

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as ``LightningCLI`` does, then check the seed and the checkpoint, which Lightning reads next.

        Lightning seeds with ``--seed_everything`` and reads the hyperparameters of ``--ckpt_path`` with a bare
        ``torch.load`` right after parsing; a seed out of range or a damaged file would stop it with a traceback.

        Raises:
            SettingTypeError, SettingValueError: For a seed that is not an integer in ``[0, 2**32 - 1]`` (``true``,
                ``false`` and ``null`` keep their meaning in Lightning).
            CheckpointError: For a ``--ckpt_path`` file that is not a whole Lightning checkpoint.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        seed = config.get("seed_everything")
        if seed is not None and not isinstance(seed, bool):
            check_seed("seed_everything", seed)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            read_checkpoint(ckpt_path, map_location="cpu", mmap=True)

    @override
    def instantiate_classes(self) -> None:
        """Instantiate as ``LightningCLI`` does; a class's refusal of its settings is raised as itself.

        jsonargparse tries each type of a union in turn (``trainer.strategy`` is ``str | Strategy``) and, when
        all fail, raises one ``ValueError`` whose message quotes every refusal but which is raised from the
        first only: the ``str`` one. ``GRASSStrategy``'s bad-input error would then be lost inside that message.
        A recording instantiator keeps each bad-input error a class raised, and the one the message quotes is
        raised instead.
        """
        recorder = _RefusalRecorder()
        self.parser.add_instantiator(recorder, object)  # after LightningCLI's own for the model and the data
        try:
            super().instantiate_classes()
        except Exception as error:
            refusal = None if find_input_error(error) is not None else recorder.quoted_by(error)
            if refusal is None:
                raise
            raise refusal  # noqa: B904  (the union error stays attached as its context)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Build the Trainer; a setting it refuses, or cannot train with, stops the run with one ``error:`` line."""
        with trainer_settings("trainer"):
            trainer = super().instantiate_trainer(**kwargs)
        check_trainer_settings(trainer)
        return trainer

    @override
    def before_fit(self) -> None:
        """Hand the model's tokenizer to the datamodule, and check ``--ckpt_path`` as ``grass-train`` does.

        Raises:
            CheckpointError: When training cannot resume from ``--ckpt_path`` with this model and strategy (weights
                only, another model, a single-process data position under ``grass_ddp``).
        """
        if self.model.tokenizer is None:
            self.model.tokenizer = build_char_tokenizer()
        self.datamodule.tokenizer = self.model.tokenizer
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            check_resume_checkpoint(ckpt_path, self.model, self.trainer.strategy)


class _RefusalRecorder:
    """A jsonargparse instantiator: builds a class as the default one does, and keeps the bad input it refused."""

    def __init__(self) -> None:
        self.refusals: list[InputError] = []

    def __call__(self, class_type: type, *args: Any, **kwargs: Any) -> Any:
        try:
            return class_type(*args, **kwargs)
        except InputError as refusal:
            self.refusals.append(refusal)
            raise

    def quoted_by(self, error: BaseException) -> InputError | None:
        """The first kept refusal whose message is part of ``error``'s, or ``None``."""
        return next((refusal for refusal in self.refusals if str(refusal) in str(error)), None)


def main(args: list[str] | None = None) -> None:
    """Console entry point of ``grass-cli``.

    Args:
        args: The command line after ``grass-cli``; ``None`` reads ``sys.argv``.
    """
    with report_input_errors():
        GRASSCLI(
            CausalLMModule,
            InstructionDataModule,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            args=args,
        )


if __name__ == "__main__":
    main()
