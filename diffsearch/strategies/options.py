"""Checks for strategy options as they arrive from job files (YAML/JSON values).

Each check returns the value in its Python type or raises :class:`OptionError`, which names the
option and says what is allowed; a job reports it as ``strategy.<option>: <reason>`` (the
``field.path: message`` form of every job error). Booleans are refused where numbers are
expected (YAML reads ``yes`` as True, and True is an int in Python).

A strategy declares one :func:`rule` per constructor option in ``Strategy.option_checks``; the
job checks them without the model (:meth:`diffsearch.strategies.base.Strategy.check_options`).
What needs the model or the budget (a step below ``num_steps``, a population the budget pays
for) is checked when the strategy is built, with the same helpers and errors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Check = Callable[[str, Any], Any]
"""One option's check: ``check(name, value)`` returns the value to use or raises OptionError."""


class OptionError(ValueError):
    """A strategy option the strategy refuses: ``option`` names it (``schedule.1`` for an item
    of a list), ``reason`` says what is allowed."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option = option
        self.reason = reason


def rule(check: Callable[..., Any], /, *, allow_none: bool = False, **bounds: Any) -> Check:
    """``check`` with its ``bounds`` fixed, as a :data:`Check`; with ``allow_none`` a None
    (the option's "not set": the strategy then picks, e.g. from the budget) passes as None."""

    def checked(name: str, value: Any) -> Any:
        if value is None and allow_none:
            return None
        return check(name, value, **bounds)

    return checked


def integer(name: str, value: Any, *, minimum: int | None = None,
            maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(name, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise OptionError(name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise OptionError(name, f"must be <= {maximum}, got {value}")
    return value


def number(name: str, value: Any, *, low: float, high: float = math.inf,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite number in the interval low..high (open or closed at either end)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(name, f"must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = (f"{'(' if low_open else '['}{low:g}, "
                    f"{high:g}{')' if high_open or math.isinf(high) else ']'}")
        raise OptionError(name, f"must be in {interval}, got {value}")
    return float(value)


def _items(name: str, value: Any, what: str, alternative: str = "") -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise OptionError(name, f"must be {alternative}a non-empty list of {what}, "
                                f"got {value!r}")
    return value


def integer_list(name: str, value: Any, *, minimum: int | None = None,
                 maximum: int | None = None, order: str | None = None) -> list[int]:
    """A non-empty list of integers, each checked like :func:`integer`; ``order``
    "non-decreasing" or "increasing" (strictly) checks their order too."""
    items = [integer(f"{name}.{i}", item, minimum=minimum, maximum=maximum)
             for i, item in enumerate(_items(name, value, "integers"))]
    pairs = list(zip(items, items[1:]))
    if order == "increasing" and any(b <= a for a, b in pairs):
        raise OptionError(name, f"must be strictly increasing, got {items}")
    if order == "non-decreasing" and any(b < a for a, b in pairs):
        raise OptionError(name, f"must be non-decreasing, got {items}")
    return items


def number_or_list(name: str, value: Any, **bounds: Any) -> float | list[float]:
    """A number, or a non-empty list of numbers, each checked like :func:`number` (how many
    the list needs is the strategy's to check once it knows, see :func:`number_list`)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return number(name, value, **bounds)
    return [number(f"{name}.{i}", item, **bounds)
            for i, item in enumerate(_items(name, value, "numbers", "a number or "))]


def number_list(name: str, value: float | Sequence[float], length: int) -> list[float]:
    """One number per entry of a list of ``length`` from a checked :func:`number_or_list`
    value; a single number is used for every entry."""
    if isinstance(value, (int, float)):
        return [float(value)] * length
    if len(value) != length:
        raise OptionError(name, f"needs {length} value(s), one per step, got {len(value)}")
    return list(value)


def choice(name: str, value: Any, *, choices: Sequence[str]) -> str:
    if value not in choices:
        raise OptionError(name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def text(name: str, value: Any) -> str:
    """A non-empty string (a name, e.g. of a verifier)."""
    if not isinstance(value, str) or not value.strip():
        raise OptionError(name, f"must be a name, got {value!r}")
    return value


def text_list(name: str, value: Any) -> list[str]:
    """A non-empty list of names, each checked like :func:`text`, none repeated."""
    items = [text(f"{name}.{i}", item) for i, item in enumerate(_items(name, value, "names"))]
    if len(set(items)) != len(items):
        raise OptionError(name, f"repeats a name: {items}")
    return items


def step_mapping(name: str, value: Any) -> dict[int, str] | str | os.PathLike[str]:
    """A mapping of denoising step (an integer >= 1, or its digits as a JSON key) to a name, or
    a folder (a string or path) the strategy reads the mapping from when it is built."""
    if isinstance(value, (str, os.PathLike)):
        if not str(value).strip():
            raise OptionError(name, "must name a folder or map steps to names, got ''")
        return value
    if not isinstance(value, Mapping):
        raise OptionError(name, f"must be a mapping of step to name or a folder, got {value!r}")
    checked = {}
    for key, item in value.items():
        step = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise OptionError(f"{name}.{key}", f"keys must be steps (integers >= 1), got {key!r}")
        checked[step] = text(f"{name}.{key}", item)
    return checked
