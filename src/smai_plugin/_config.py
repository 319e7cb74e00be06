"""Validation helpers for configuration values."""

from enum import Enum
from typing import TypeVar

EnumT = TypeVar("EnumT", bound=Enum)


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
        raise ValueError(msg) from None
