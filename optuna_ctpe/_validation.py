"""Argument validation: one helper per rule, used by every wing of the package.

Each ``check_*`` helper returns the value converted to a plain Python type, or raises
:class:`ValueError` naming the argument and the bad value (scikit-learn's habit). "An integer"
means one thing everywhere: a :class:`numbers.Integral` that is not a :class:`bool`, so numpy
integers are accepted and ``True`` is not. "A real" is a :class:`numbers.Real` that is not a
:class:`bool` (numpy floats and integers included).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import math
import numbers
from typing import Any
from typing import TypeVar


#: The bit-widths the package quantizes to: below 2 bits a symmetric grid has no levels left,
#: and above 16 fake quantization is indistinguishable from float32 for the layers we measure.
MIN_BITS = 2
MAX_BITS = 16

_T = TypeVar("_T")


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer (numpy integers included, booleans excluded)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number (numpy numbers included, booleans excluded)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer_requirement(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer in [{minimum}, {maximum}]"
    if minimum == 0:
        return "a non-negative integer"
    if minimum == 1:
        return "a positive integer"
    if minimum is not None:
        return f"an integer >= {minimum}"
    if maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"


def check_integer(
    value: Any,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    extra: str = "",
) -> int:
    """``value`` as an ``int``, if it is an integer in ``[minimum, maximum]``.

    Args:
        value: The argument to check.
        name: The argument's name, as the message shows it.
        minimum: The smallest value allowed, or ``None`` for no bound.
        maximum: The largest value allowed, or ``None`` for no bound.
        extra: Words appended to the requirement in the message (e.g. ``"or None"``).

    Raises:
        ValueError: ``"<name> must be <requirement>, got <value>."``
    """
    if (
        not is_integer(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        requirement = _integer_requirement(minimum, maximum)
        suffix = f" {extra}" if extra else ""
        raise ValueError(f"{name} must be {requirement}{suffix}, got {value!r}.")
    return int(value)


def check_real(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    open_minimum: bool = False,
) -> float:
    """``value`` as a finite ``float`` with ``minimum <= value <= maximum``.

    Args:
        value: The argument to check.
        name: The argument's name, as the message shows it.
        minimum: The lower bound, or ``None`` for none.
        maximum: The upper bound, or ``None`` for none.
        open_minimum: Exclude ``minimum`` itself (``value > minimum``).

    Raises:
        ValueError: If ``value`` is not a real number, is NaN or infinite, or is out of bounds.
    """
    if is_real(value):
        number = float(value)
        below = minimum is not None and (number <= minimum if open_minimum else number < minimum)
        above = maximum is not None and number > maximum
        if math.isfinite(number) and not below and not above:
            return number
    raise ValueError(
        f"{name} must be {_real_requirement(minimum, maximum, open_minimum)}, got {value!r}."
    )


def _real_requirement(minimum: float | None, maximum: float | None, open_minimum: bool) -> str:
    if minimum is not None and maximum is not None:
        left = "(" if open_minimum else "["
        return f"a number in {left}{minimum:g}, {maximum:g}]"
    if minimum == 0 and not open_minimum:
        return "a finite non-negative number"
    if minimum is not None:
        return f"a number {'>' if open_minimum else '>='} {minimum:g}"
    if maximum is not None:
        return f"a number <= {maximum:g}"
    return "a finite number"


def check_ratio(value: Any, name: str) -> float:
    """``value`` as a ``float`` in ``(0, 1]``: a width ratio or a size fraction."""
    return check_real(value, name, minimum=0.0, maximum=1.0, open_minimum=True)


def check_bits(value: Any, name: str, *, maximum: int = MAX_BITS) -> int:
    """``value`` as an ``int`` bit-width in ``[MIN_BITS, maximum]``."""
    if not is_integer(value) or not MIN_BITS <= value <= maximum:
        raise ValueError(
            f"{name} must be an integer bit-width in [{MIN_BITS}, {maximum}], got {value!r}."
        )
    return int(value)


def check_grid(values: Any, name: str, check_one: Callable[[Any, str], _T]) -> tuple[_T, ...]:
    """A non-empty, repeat-free sequence, each item checked by ``check_one``; sorted.

    Args:
        values: The grid the user gave (a list or tuple; not a string or a mapping).
        name: The argument's name, as the message shows it.
        check_one: A ``check_*`` helper applied to each item with ``name``.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty sequence, got {values!r}.")
    checked = [check_one(v, name) for v in values]
    if len(set(checked)) != len(checked):
        raise ValueError(f"{name} must not repeat a value, got {list(values)!r}.")
    return tuple(sorted(checked))  # type: ignore[type-var]
