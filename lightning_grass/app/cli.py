"""``grass-cli``: the Lightning CLI for fine-tuning with GRASS, configured by YAML with ``class_path``/``init_args``.

grass-cli fit --config conf/cli/grass.yaml
grass-cli fit --config conf/cli/grass.yaml --trainer.strategy=grass --print_config

Bad input stops it with one line, ``error: <message>``, and exit status 2, as jsonargparse does for a
malformed argument (see :mod:`lightning_grass.app.input_errors`).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

import lightning_grass  # noqa: F401  (registers strategy="grass" and its presets)
from lightning_grass.app.data import InstructionDataModule, build_char_tokenizer
from lightning_grass.app.input_errors import report_input_errors
from lightning_grass.app.lm import CausalLMModule


class GRASSCLI(LightningCLI):
    """``LightningCLI`` over :class:`~lightning_grass.app.lm.CausalLMModule` and ``InstructionDataModule``.

    The model's answer pattern is the data's (``--data.answer_pattern``), so exact match reads answers the
    way the data writes them, and the datamodule gets the model's tokenizer (or the built-in character
    tokenizer) before fitting.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Derive ``model.answer_pattern`` from ``data.answer_pattern``."""
        parser.link_arguments("data.answer_pattern", "model.answer_pattern")

    def before_fit(self) -> None:
        """Hand the model's tokenizer to the datamodule."""
        if self.model.tokenizer is None:
            self.model.tokenizer = build_char_tokenizer()
        self.datamodule.tokenizer = self.model.tokenizer


def main() -> None:
    """Console entry point of ``grass-cli``."""
    with report_input_errors():
        GRASSCLI(CausalLMModule, InstructionDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
