"""Argument checks of the public boundaries (constructors, pipeline calls, hooks), in one wording everywhere.

Each accepts numpy and torch scalars where a Python number is meant, and raises a `TypeError` for the wrong kind of
value or a `ValueError` for a value out of range, naming the argument and the value given.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any


def as_int(name: str, value: Any, low: int | None = None) -> int:
    """`value` as a Python int (an int, or a numpy / torch integer scalar), at least `low` when given.

    A bool or a float is refused, never truncated.
    """
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an integer, got {value!r}.")
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be an integer, got {value!r}.") from None
    if low is not None and result < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    return result


def as_number(name: str, value: Any, low: float | None = None) -> float:
    """`value` as a finite Python float (an int, a float, or a numpy scalar), at least `low` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {value!r}.")
    if not math.isfinite(value) or (low is not None and value < low):
        raise ValueError(f"`{name}` must be a finite number{'' if low is None else f' >= {low:g}'}, got {value!r}.")
    return float(value)


def as_flag(name: str, value: Any) -> bool:
    """`value` as a Python bool (a bool, or a numpy / torch bool scalar); anything else is a `TypeError`, so that a
    string such as "no" is never read as true."""
    if isinstance(value, bool):
        return value
    if getattr(value, "dtype", None) is not None and str(value.dtype) in ("bool", "torch.bool") and value.ndim == 0:
        return bool(value)
    raise TypeError(f"`{name}` must be True or False, got {value!r}.")
