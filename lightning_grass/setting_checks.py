"""The checks every setting goes through: an integer, a finite number, one of a few choices, a flag, a module path.

Each raises :class:`~lightning_grass.errors.SettingTypeError` for a value of the wrong type (a bool is not a
number here, and a string never is) and :class:`~lightning_grass.errors.SettingValueError` for one out of range,
with a message that names the setting, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lightning_grass.errors import SettingTypeError, SettingValueError


def is_number(value: object) -> bool:
    """Whether ``value`` is an int or a float; a bool is neither here."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int | None = None, *, or_word: str | None = None) -> None:
    """Refuse ``value`` unless it is an int (not a bool, a float, NaN or a string) of at least ``minimum``.

    Args:
        name: The setting, as the user writes it.
        value: Its value.
        minimum: The smallest value allowed; ``None`` allows any integer.
        or_word: A word accepted instead of an integer, such as ``"auto"``; ``None`` accepts integers only.

    Raises:
        SettingTypeError: If ``value`` is neither an int nor ``or_word``.
        SettingValueError: If it is below ``minimum``.
    """
    allowed = "an integer" if minimum is None else f"an integer >= {minimum}"
    if or_word is not None:
        if isinstance(value, str) and value == or_word:
            return
        allowed += f" or {or_word!r}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingTypeError(f"{name}={value!r} must be {allowed}")
    if minimum is not None and value < minimum:
        raise SettingValueError(f"{name}={value!r} must be {allowed}")


def check_number(name: str, value: object, allowed: str, accepts: Callable[[float], bool] = lambda _: True) -> None:
    """Refuse ``value`` unless it is a finite number that ``accepts``.

    Args:
        name: The setting, as the user writes it.
        value: Its value.
        allowed: The range in words, e.g. ``"> 0"`` or ``"in (0, 1]"``.
        accepts: Whether a finite number is in the range.

    Raises:
        SettingTypeError: If ``value`` is not an int or a float.
        SettingValueError: If it is NaN, infinite, or outside the range.
    """
    if not is_number(value):
        raise SettingTypeError(f"{name}={value!r} must be a finite number {allowed}")
    if not (math.isfinite(value) and accepts(value)):
        raise SettingValueError(f"{name}={value!r} must be a finite number {allowed}")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Refuse ``value`` unless it is one of ``allowed``.

    Raises:
        SettingValueError: If it is not.
    """
    if value not in allowed:
        raise SettingValueError(f"{name}={value!r} is not supported; use one of {allowed}")


def check_module_path(name: str, value: object) -> None:
    """Refuse ``value`` unless it is ``None`` or a dotted module path (several may be joined by commas).

    Whether the path resolves on the model is checked where the model is known
    (:func:`~lightning_grass.discover_layers`).

    Raises:
        SettingTypeError: If it is neither ``None`` nor a string.
        SettingValueError: If it is an empty or blank string.
    """
    if value is None:
        return
    message = f"{name}={value!r} must be a dotted module path such as 'model.model.layers', or None"
    if not isinstance(value, str):
        raise SettingTypeError(message)
    if not value.strip():
        raise SettingValueError(message)


def check_flag(name: str, value: object) -> None:
    """Refuse ``value`` unless it is ``True`` or ``False``.

    Raises:
        SettingTypeError: If it is anything else (``1`` and ``"yes"`` included).
    """
    if not isinstance(value, bool):
        raise SettingTypeError(f"{name}={value!r} must be True or False")


#: The largest seed ``lightning.seed_everything`` (and NumPy's generator) accepts: seeds are unsigned 32-bit.
MAX_SEED = 2**32 - 1


def check_seed(name: str, value: object) -> None:
    """Refuse ``value`` unless it is an integer seed in ``[0, 2**32 - 1]``, the range every generator accepts.

    Args:
        name: The setting, as the user writes it (``seed``, ``--seed_everything``).
        value: Its value.

    Raises:
        SettingTypeError: If ``value`` is not an int (a string, a float or a bool).
        SettingValueError: If it is negative or above ``2**32 - 1``.
    """
    allowed = f"an integer in [0, {MAX_SEED}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingTypeError(f"{name}={value!r} must be {allowed}")
    if not 0 <= value <= MAX_SEED:
        raise SettingValueError(f"{name}={value!r} must be {allowed}")
