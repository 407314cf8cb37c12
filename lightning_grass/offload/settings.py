"""The settings the strategies and :func:`~lightning_grass.estimate_memory` share, each checked in one place.

``GRASSStrategy``, ``GRASSDDPStrategy``, ``GRASSFSDPStrategy`` and ``estimate_memory`` take the same offload
settings; each builds them with :meth:`OffloadSettings.validated`, so a setting is refused with the same message
wherever it is given. The precisions they train in (:data:`PRECISIONS`, :data:`SHARDED_PRECISIONS`) are listed
here too, and ``grass_fsdp``'s are checked by :func:`check_sharded_precision` in the strategy and the estimate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lightning_grass.byte_size import parse_byte_size
from lightning_grass.errors import SettingValueError
from lightning_grass.offload.disk_tier import check_offload_dir
from lightning_grass.setting_checks import check_choice, check_flag

#: Accepted values of ``offload``.
OFFLOAD_TIERS = ("auto", "none", "cpu", "disk")

#: Lightning's precision flags GRASS trains in, and the dtype each gives the weights; ``None`` keeps the model's own.
PRECISIONS: dict[str, torch.dtype | None] = {
    "32-true": None,
    "32": None,
    "bf16-mixed": None,
    "16-mixed": None,
    "bf16-true": torch.bfloat16,
    "64-true": torch.float64,
}

#: The precisions ``grass_fsdp`` trains in.
SHARDED_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def check_sharded_precision(precision: object, shards: int | None = None) -> None:
    """Refuse a precision that ``grass_fsdp`` does not train in (``"32"``, Lightning's alias of ``"32-true"``, passes).

    Args:
        precision: Lightning's precision flag.
        shards: The ranks sharded over, named in the message when the estimate is asked for them.

    Raises:
        SettingValueError: For any other precision.
    """
    if precision not in (*SHARDED_PRECISIONS, "32"):
        over = "" if shards is None else f" (shards={shards})"
        raise SettingValueError(
            f"precision={precision!r} is not supported by grass_fsdp{over}; use one of {SHARDED_PRECISIONS}"
        )


@dataclass(frozen=True)
class OffloadSettings:
    """Validated offload settings; build them with :meth:`validated`.

    Attributes:
        offload: ``"auto"``, ``"none"``, ``"cpu"`` or ``"disk"``.
        offload_dir: Where the disk tier makes its folder; ``None`` is the system temp folder.
        max_resident_bytes: The byte budget on the device, in bytes; ``None`` bounds nothing.
        offload_always_on: Offload the embeddings', head's and final norm's states too.
        master_weights: Step half-precision parameters on fp32 masters.
        overlap: Overlap transfers with compute.
    """

    offload: str = "auto"
    offload_dir: str | os.PathLike | None = None
    max_resident_bytes: int | None = None
    offload_always_on: bool = False
    master_weights: bool = True
    overlap: bool = True

    @classmethod
    def validated(
        cls,
        offload: str = "auto",
        offload_dir: str | os.PathLike | None = None,
        max_resident_bytes: int | str | None = None,
        offload_always_on: bool = False,
        master_weights: bool = True,
        overlap: bool = True,
    ) -> OffloadSettings:
        """The settings as given, with ``max_resident_bytes`` parsed (``"512MiB"``), or an error naming the field.

        Raises:
            SettingValueError: For an unknown ``offload``, a budget that is not a byte size of at least one byte,
                or a budget with ``offload="none"``.
            SettingTypeError: For an ``offload_dir`` that is not a path, a budget of the wrong type, or a flag
                that is not a bool.
        """
        check_choice("offload", offload, OFFLOAD_TIERS)
        check_offload_dir(offload_dir)
        for name, value in (
            ("offload_always_on", offload_always_on),
            ("master_weights", master_weights),
            ("overlap", overlap),
        ):
            check_flag(name, value)
        budget = None if max_resident_bytes is None else parse_byte_size(max_resident_bytes, "max_resident_bytes")
        if budget is not None and offload == "none":
            raise SettingValueError(
                f"max_resident_bytes={max_resident_bytes!r} bounds the states an offload tier brings to the device, "
                "but offload='none' offloads nothing; use offload='cpu' or 'disk'"
            )
        return cls(offload, offload_dir, budget, offload_always_on, master_weights, overlap)
