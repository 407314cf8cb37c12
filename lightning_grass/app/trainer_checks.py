"""The Trainer settings Lightning accepts but cannot train with, refused before any work starts.

Lightning's ``Trainer`` takes ``gradient_clip_val=nan`` and ``accumulate_grad_batches=0`` without a word; the
first makes every clipped step NaN, the second divides by zero in the training loop. ``grass-train`` and
``grass-cli`` check the Trainer they built with :func:`check_trainer_settings`.
"""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_grass.setting_checks import check_int, check_number


def check_trainer_settings(trainer: pl.Trainer, field_prefix: str = "trainer") -> None:
    """Refuse a Trainer whose settings cannot train, naming the setting as the user wrote it.

    Args:
        trainer: The Trainer, as built.
        field_prefix: The name of the Trainer's settings: the config node in ``grass-train``, the argument
            group in ``grass-cli``.

    Raises:
        SettingTypeError: When ``accumulate_grad_batches`` is not an integer or ``gradient_clip_val`` not a number.
        SettingValueError: When ``gradient_clip_val`` is NaN, infinite or negative, or ``accumulate_grad_batches``
            is below 1.
    """
    if trainer.gradient_clip_val is not None:
        check_number(f"{field_prefix}.gradient_clip_val", trainer.gradient_clip_val, ">= 0", lambda v: v >= 0)
    check_int(f"{field_prefix}.accumulate_grad_batches", trainer.accumulate_grad_batches, minimum=1)
