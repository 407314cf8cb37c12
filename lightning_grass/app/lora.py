"""LoRA through ``peft``: the low-rank-adapter baseline that GRASS is compared against."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_grass.errors import SettingValueError


def apply_lora(model: nn.Module, settings: Mapping[str, Any]) -> nn.Module:
    """Wrap a causal LM in ``peft`` LoRA adapters; the base weights are frozen, the adapters train.

    Args:
        model: A Hugging Face causal LM.
        settings: Fields of ``peft.LoraConfig``, for example ``{"r": 8, "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"]}``. ``task_type`` is always ``"CAUSAL_LM"``.

    Returns:
        The ``peft`` model. Only the adapter parameters have ``requires_grad=True``.

    Raises:
        SettingValueError: For a setting that ``LoraConfig`` does not have, or a rank below 1.
    """
    from peft import LoraConfig, get_peft_model  # imported on use: importing peft takes seconds

    allowed = {field.name for field in dataclasses.fields(LoraConfig)} - {"task_type"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise SettingValueError(
            f"lora has unknown field(s) {unknown}; LoraConfig accepts e.g. r, lora_alpha, target_modules"
        )
    rank = settings.get("r", 8)
    if not isinstance(rank, int) or rank < 1:
        raise SettingValueError(f"lora.r={rank!r} must be an integer >= 1")
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
