"""Byte sizes as people write them (``"512MiB"``, ``"2GB"``, ``1073741824``), parsed and printed."""

from __future__ import annotations

import re
from fractions import Fraction

from lightning_grass.errors import SettingTypeError, SettingValueError

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_byte_size(value: int | str, name: str) -> int:
    """A byte count from an int or a string with a unit: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB.

    Args:
        value: ``1073741824``, ``"1GiB"``, ``"512 MiB"`` or ``"1.5GB"``.
        name: The setting's name, for the error message.

    Returns:
        The number of bytes, at least 1.

    Raises:
        SettingTypeError: For a value that is neither an int nor a string (a float, ``nan`` included).
        SettingValueError: For a malformed string, an unknown unit, or a size below one byte.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SettingTypeError(f"{name}={value!r} must be a number of bytes or a string such as '512MiB'")
    if isinstance(value, int):
        size = value
    else:
        match = _PATTERN.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or (unit and unit not in _UNITS):
            raise SettingValueError(
                f"{name}={value!r} is not a byte size; write a number with one of the units "
                "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, for example '512MiB'"
            )
        size = int(Fraction(match.group(1)) * _UNITS[unit or "b"])  # exact: no rounding, no overflow
    if size < 1:
        raise SettingValueError(f"{name}={value!r} must be at least one byte")
    return size


def format_bytes(size: float) -> str:
    """``size`` in the largest binary unit that keeps it at least 1, with two decimals: ``"1.50 GiB"``."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= factor:
            return f"{size / factor:.2f} {unit}"
    return f"{size:.0f} B"
