"""Optuna parameter names of a search space, and configurations to and from parameter dicts.

A layer's bit-width is the parameter ``bits:<layer>``, a width group's ratio ``width:<group>``.
A space's *choices* map every parameter name (searched or not) to the values pruning kept; the
searched parameters are those with more than one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optuna_ctpe._validation import check_ratio
from optuna_ctpe.space.records import check_bit
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import SpaceSpec


BITS_PREFIX = "bits:"
WIDTH_PREFIX = "width:"

Choices = Mapping[str, tuple[Any, ...]]


def bits_param(layer: str) -> str:
    """The parameter name of ``layer``'s bit-width."""
    return BITS_PREFIX + layer


def width_param(group: str) -> str:
    """The parameter name of ``group``'s width ratio."""
    return WIDTH_PREFIX + group


def searched(choices: Choices) -> list[str]:
    """The parameters left with more than one choice, in ``choices`` order."""
    return [name for name, c in choices.items() if len(c) > 1]


def config_from_params(choices: Choices, params: Mapping[str, Any]) -> QuantConfig:
    """The configuration of a parameter dict, e.g. ``study.best_params``.

    Unsearched parameters take their single choice; parameters of other names are ignored, so
    ``params`` may hold a user's own parameters too.

    Args:
        choices: Parameter name -> the choices pruning kept, for every parameter of the space.
        params: Parameter name -> value.

    Raises:
        ValueError: If a searched parameter is missing or has a value outside its choices.
    """
    bits: dict[str, int] = {}
    widths: dict[str, float] = {}
    for name, options in choices.items():
        if len(options) == 1 and name not in params:
            value = options[0]
        elif name not in params:
            raise ValueError(f"params lacks the searched parameter {name!r}.")
        else:
            value = params[name]
            if value not in options:
                raise ValueError(
                    f"params[{name!r}]={value!r} is not one of its choices {list(options)}."
                )
        if name.startswith(BITS_PREFIX):
            bits[name[len(BITS_PREFIX) :]] = int(value)
        else:
            widths[name[len(WIDTH_PREFIX) :]] = float(value)
    return QuantConfig(bits, widths)


def config_value(config: QuantConfig, param: str) -> Any:
    """The value ``config`` gives the parameter ``param`` (a bit-width or a width ratio)."""
    if param.startswith(BITS_PREFIX):
        return config.bits[param[len(BITS_PREFIX) :]]
    return config.widths[param[len(WIDTH_PREFIX) :]]


def to_params(choices: Choices, config: QuantConfig) -> dict[str, Any]:
    """The searched parameters of ``config``, e.g. for :meth:`optuna.Study.enqueue_trial`."""
    return {name: config_value(config, name) for name in searched(choices)}


def extreme_config(choices: Choices, pick: Any) -> QuantConfig:
    """The configuration taking ``pick(choices)`` (``min`` or ``max``) of every parameter.

    Size grows with every bit-width and ratio, so ``min`` gives the smallest configuration of
    the space and ``max`` the safest.
    """
    return config_from_params(choices, {name: pick(c) for name, c in choices.items()})


def uniform_config(spec: SpaceSpec, bits: Any, width: Any = 1.0) -> QuantConfig:
    """Every searched layer of ``spec`` at ``bits`` and every group at ``width``; fixed layers
    keep their fixed bit-width. The result need not lie in the pruned space.

    Raises:
        ValueError: If ``bits`` is not a bit-width in [2, 16] or ``width`` not a ratio in (0, 1].
    """
    bits = check_bit(bits, "bits")
    width = check_ratio(width, "width")
    return QuantConfig(
        {n: spec.fixed_bits.get(n, bits) for n in spec.layers},
        dict.fromkeys(spec.groups, width),
    )
