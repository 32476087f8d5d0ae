"""Checks of user-given values: each raises ``ValueError`` naming the field, the value and what is allowed.

Strict on types, because Python's are loose: ``True`` is not an integer here, ``"no"`` is not a
boolean, numpy scalars are converted to Python ones (so they serialise to ``config.json``), and
floats must be finite.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Hashable
from typing import Any

REGEX_PREFIX = "re:"
MAX_INT = 2**31 - 1  # fields that become tensor sizes or seeds stay within int32


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not allowed; expected {allowed}")


def require_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "True or False")
    return value


def require_int(name: str, value: Any, minimum: int | None = None, maximum: int = MAX_INT) -> int:
    """An integer (numpy integers accepted and converted, bools refused) within ``[minimum, maximum]``."""
    allowed = f"an integer in [{minimum}, {maximum}]" if minimum is not None else f"an integer <= {maximum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(name, value, allowed)
    value = int(value)
    if (minimum is not None and value < minimum) or value > maximum:
        raise _fail(name, value, allowed)
    return value


def require_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                  high_open: bool = False) -> float:
    """A finite real number (ints accepted, bools and strings refused) in the given interval."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    allowed = "a finite number" if (low, high) == (-math.inf, math.inf) else f"a finite number in {interval}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, value, allowed)
    value = float(value)
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low) or (
            high_open and value == high):
        raise _fail(name, value, allowed)
    return value


def require_choice(name: str, value: Any, allowed: tuple[Any, ...] | list[Any]) -> Any:
    """One of ``allowed``; bools and unhashable values (lists, arrays: their ``==`` is no answer) are refused."""
    if isinstance(value, bool) or not isinstance(value, Hashable) or value not in allowed:
        raise _fail(name, value, f"one of {list(allowed)}")
    return value


def require_pattern(name: str, pattern: Any) -> str:
    """A non-empty module-name pattern; a ``re:`` pattern must compile."""
    if not isinstance(pattern, str) or not pattern or pattern == REGEX_PREFIX:
        raise _fail(name, pattern, "a non-empty module name pattern (dotted name or 're:<regex>')")
    if pattern.startswith(REGEX_PREFIX):
        try:
            re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as error:
            raise _fail(name, pattern, f"a valid regular expression after 're:' ({error})") from error
    return pattern
