"""``OffloadSettings``: where optimizer states live and how many bytes of them the device holds, validated once.

``GRASSStrategy``, ``GRASSDDPStrategy``, ``GRASSFSDPStrategy`` and :func:`~lightning_grass.estimate_memory` take
the same offload settings; each builds them with :meth:`OffloadSettings.validated`, so a setting is refused with
the same message wherever it is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lightning_grass.byte_size import parse_byte_size
from lightning_grass.errors import SettingValueError
from lightning_grass.offload.disk_tier import check_offload_dir
from lightning_grass.setting_checks import check_choice, check_flag

#: Accepted values of ``offload``.
OFFLOAD_TIERS = ("auto", "none", "cpu", "disk")


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
