"""LoRA through ``peft``: the low-rank-adapter baseline that GRASS is compared against."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_grass.errors import SettingTypeError, SettingValueError
from lightning_grass.setting_checks import check_int, check_number


def check_lora_settings(settings: object) -> None:
    """Refuse LoRA settings that ``peft`` would reject or that would train nothing, before a model is loaded.

    Args:
        settings: Fields of ``peft.LoraConfig``, as for :func:`apply_lora`.

    Raises:
        SettingTypeError: If ``settings`` is not a mapping, the rank is not an integer, or ``lora_alpha`` or
            ``lora_dropout`` is not a number.
        SettingValueError: For a field that ``LoraConfig`` does not have, a rank below 1, a ``lora_alpha`` that
            is not a finite number > 0, or a ``lora_dropout`` outside [0, 1).
    """
    from peft import LoraConfig  # imported on use: importing peft takes seconds

    if not isinstance(settings, Mapping):
        raise SettingTypeError(f"lora={settings!r} must be a dict of LoraConfig fields such as r and lora_alpha")
    allowed = {field.name for field in dataclasses.fields(LoraConfig)} - {"task_type"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise SettingValueError(
            f"lora has unknown field(s) {unknown}; LoraConfig accepts e.g. r, lora_alpha, target_modules"
        )
    check_int("lora.r", settings.get("r", 8), minimum=1)
    for name, allowed_range, accepts in (
        ("lora_alpha", "> 0", lambda value: value > 0),
        ("lora_dropout", "in [0, 1)", lambda value: 0 <= value < 1),
    ):
        if name in settings:
            check_number(f"lora.{name}", settings[name], allowed_range, accepts)


def apply_lora(model: nn.Module, settings: Mapping[str, Any]) -> nn.Module:
    """Wrap a causal LM in ``peft`` LoRA adapters; the base weights are frozen, the adapters train.

    Args:
        model: A Hugging Face causal LM.
        settings: Fields of ``peft.LoraConfig``, for example ``{"r": 8, "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"]}``. ``task_type`` is always ``"CAUSAL_LM"``.

    Returns:
        The ``peft`` model. Only the adapter parameters have ``requires_grad=True``.

    Raises:
        SettingTypeError, SettingValueError: For the settings :func:`check_lora_settings` refuses.
    """
    from peft import LoraConfig, get_peft_model  # imported on use: importing peft takes seconds

    check_lora_settings(settings)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))


def save_merged(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a ``peft`` model with its adapters merged into a copy of the base weights.

    The directory then holds a plain model that ``from_pretrained`` loads without ``peft``; ``model``
    itself keeps its adapters.

    Args:
        model: A ``peft`` model.
        directory: Where to write.

    Returns:
        ``directory`` as a ``Path``.
    """
    directory = Path(directory)
    copy.deepcopy(model).merge_and_unload().save_pretrained(directory)
    return directory
