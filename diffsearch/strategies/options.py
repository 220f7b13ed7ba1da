"""Checks for strategy options as they arrive from job files (YAML/JSON values).

Each returns the value in its Python type or raises ``ValueError`` with one line naming the
option and what is allowed; the engine prefixes it with ``strategy:``. Booleans are refused
where numbers are expected (YAML reads ``yes`` as True, and True is an int in Python).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def integer(name: str, value: Any, *, minimum: int | None = None,
            maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def number(name: str, value: Any, *, low: float, high: float = math.inf,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite number in the interval low..high (open or closed at either end)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = (f"{'(' if low_open else '['}{low:g}, "
                    f"{high:g}{')' if high_open or math.isinf(high) else ']'}")
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


def integer_list(name: str, value: Any, *, minimum: int | None = None,
                 maximum: int | None = None) -> list[int]:
    """A non-empty list of integers, each checked like :func:`integer`."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{name} must be a non-empty list of integers, got {value!r}")
    return [integer(f"{name}[{i}]", item, minimum=minimum, maximum=maximum)
            for i, item in enumerate(value)]


def number_list(name: str, value: Any, length: int, **bounds: Any) -> list[float]:
    """One number per entry of a list of ``length``; a single number is used for every entry."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * length
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a number or a list of {length} numbers, got {value!r}")
    if len(value) != length:
        raise ValueError(f"{name} needs {length} value(s), one per step, got {len(value)}")
    return [number(f"{name}[{i}]", item, **bounds) for i, item in enumerate(value)]


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def strictly_increasing(name: str, steps: Sequence[int]) -> None:
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {list(steps)}")
