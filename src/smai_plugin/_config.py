"""Validation helpers for configuration values: each module checks the values it owns with them."""

from enum import Enum
from typing import TypeVar

from .errors import SmaiInputError

EnumT = TypeVar("EnumT", bound=Enum)


def check_int(value: object, name: str, minimum: int = 1, multiple_of: int = 1) -> int:
    """Refuse anything but a whole number of at least ``minimum`` (and a multiple of ``multiple_of``).

    Example:
        >>> check_int(64, "window_size", minimum=64, multiple_of=64)
        64
        >>> check_int(2.5, "n_superpixels")
        Traceback (most recent call last):
        ...
        smai_plugin.errors.SmaiInputError: n_superpixels must be a whole number of at least 1, got 2.5.

    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value % multiple_of:
        multiple = f", a multiple of {multiple_of}" if multiple_of > 1 else ""
        msg = f"{name} must be a whole number of at least {minimum}{multiple}, got {value!r}."
        raise SmaiInputError(msg)
    return value


def check_odd(value: object, name: str) -> int:
    """Refuse anything but a positive odd whole number: the side of a window centred on each position.

    Example:
        >>> check_odd(3, "memory_dilation")
        3
        >>> check_odd(2, "memory_neighbourhood")
        Traceback (most recent call last):
        ...
        smai_plugin.errors.SmaiInputError: memory_neighbourhood must be odd (a window centred on each position), got 2.

    """
    if check_int(value, name) % 2 == 0:
        msg = f"{name} must be odd (a window centred on each position), got {value}."
        raise SmaiInputError(msg)
    return value


def parse_enum(enum: type[EnumT], value: EnumT | str, name: str) -> EnumT:
    """Convert a config value to ``enum``, with an error message that lists the choices.

    Example:
        >>> from smai_plugin.anomaly_map import ScoreMeasure
        >>> parse_enum(ScoreMeasure, "l2", "score_measure")
        <ScoreMeasure.L2: 'l2'>

    """
    try:
        return enum(value)
    except ValueError:
        msg = f"Unknown {name} {value!r}; choose one of {[member.value for member in enum]}."
        raise SmaiInputError(msg) from None
