"""Optuna parameter names of a search space, and configurations to and from parameter dicts.

A layer's bit-width is the parameter ``bits:<layer>``, a width group's ratio ``width:<group>``.
In a format space a layer's format is the parameter ``format:<layer>``, whose choices are format
names (strings, so optuna-dashboard and reports show ``int3-g128-asym-gptq``); a bit-width
space keeps integer choices under ``bits:``, as always. A space's *choices* map every parameter
name (searched or not) to the values pruning kept, smallest first; the searched parameters are
those with more than one.

A tie (:attr:`~optuna_ctpe.space.records.SpaceSpec.ties`) is one parameter, that of its first
layer (the leader); its other layers (the followers) have none, and a configuration gives them
the leader's value (:func:`config_from_params` with ``ties``).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

from optuna_ctpe._validation import check_ratio
from optuna_ctpe.space.checks import check_bit
from optuna_ctpe.space.formats import as_format
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import SpaceSpec


BITS_PREFIX = "bits:"
FORMAT_PREFIX = "format:"
WIDTH_PREFIX = "width:"

Choices = Mapping[str, tuple[Any, ...]]


def bits_param(layer: str) -> str:
    """The parameter name of ``layer``'s bit-width."""
    return BITS_PREFIX + layer


def format_param(layer: str) -> str:
    """The parameter name of ``layer``'s weight format (in a format space)."""
    return FORMAT_PREFIX + layer


def layer_param(spec: SpaceSpec, layer: str) -> str:
    """The parameter name of ``layer``'s choice in ``spec``: its format in a format space, else
    its bit-width."""
    return format_param(layer) if spec.formats else bits_param(layer)


def tied_param(spec: SpaceSpec, layer: str) -> str:
    """The parameter that carries ``layer``'s choice in ``spec``: its tie leader's
    (:func:`layer_param` of :meth:`~optuna_ctpe.space.records.SpaceSpec.leader`)."""
    return layer_param(spec, spec.leader(layer))


def width_param(group: str) -> str:
    """The parameter name of ``group``'s width ratio."""
    return WIDTH_PREFIX + group


def searched(choices: Choices) -> list[str]:
    """The parameters left with more than one choice, in ``choices`` order."""
    return [name for name, c in choices.items() if len(c) > 1]


def config_from_params(
    choices: Choices, params: Mapping[str, Any], ties: Sequence[Sequence[str]] = ()
) -> QuantConfig:
    """The configuration of a parameter dict, e.g. ``study.best_params``.

    Unsearched parameters take their single choice; parameters of other names are ignored, so
    ``params`` may hold a user's own parameters too.

    Args:
        choices: Parameter name -> the choices pruning kept, for every parameter of the space.
        params: Parameter name -> value.
        ties: The space's ties (:attr:`~optuna_ctpe.space.records.SpaceSpec.ties`): each
            follower takes its leader's value (the parameter of a follower, if ``params`` holds
            one, is ignored).

    Raises:
        ValueError: If a searched parameter is missing or has a value outside its choices.
    """
    bits: dict[str, int] = {}
    formats: dict[str, str] = {}
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
        elif name.startswith(FORMAT_PREFIX):
            formats[name[len(FORMAT_PREFIX) :]] = str(value)
        else:
            widths[name[len(WIDTH_PREFIX) :]] = float(value)
    for tie in ties:
        for values in (bits, formats):
            if tie[0] in values:
                values.update(dict.fromkeys(tie[1:], values[tie[0]]))
    return QuantConfig(bits, widths, formats)


def config_value(config: QuantConfig, param: str) -> Any:
    """The value ``config`` gives the parameter ``param`` (a bit-width, a format name or a width
    ratio)."""
    if param.startswith(BITS_PREFIX):
        return config.bits[param[len(BITS_PREFIX) :]]
    if param.startswith(FORMAT_PREFIX):
        return config.formats[param[len(FORMAT_PREFIX) :]]
    return config.widths[param[len(WIDTH_PREFIX) :]]


def to_params(choices: Choices, config: QuantConfig) -> dict[str, Any]:
    """The searched parameters of ``config``, e.g. for :meth:`optuna.Study.enqueue_trial`."""
    return {name: config_value(config, name) for name in searched(choices)}


def extreme_config(
    choices: Choices, largest: bool, ties: Sequence[Sequence[str]] = ()
) -> QuantConfig:
    """The configuration taking every parameter's largest choice, or every smallest one.

    Choices are kept smallest first (bit-widths and ratios ascending, a layer's formats by its
    stored size), so the smallest gives the smallest configuration of the space and the
    largest the safest.
    """
    return config_from_params(
        choices, {name: c[-1] if largest else c[0] for name, c in choices.items()}, ties
    )


def make_config(
    spec: SpaceSpec, layers: Mapping[str, Any], widths: Mapping[str, float]
) -> QuantConfig:
    """The configuration of ``spec`` giving each layer its choice in ``layers`` (a format name
    in a format space, else a bit-width) and each group its ratio in ``widths``."""
    if spec.formats:
        return QuantConfig({}, widths, layers)
    return QuantConfig(layers, widths)


def uniform_config(spec: SpaceSpec, bits: Any, width: Any = 1.0) -> QuantConfig:
    """Every searched layer of ``spec`` at ``bits`` and every group at ``width``; fixed layers
    keep their fixed bit-width. The result need not lie in the pruned space.

    In a format space ``bits`` is a format (a name, a record, or a bit-width meaning its legacy
    format), and fixed layers keep their fixed bit-width's legacy format.

    Raises:
        ValueError: If ``bits`` is not a bit-width in [2, 16] (a format, in a format space) or
            ``width`` not a ratio in (0, 1].
    """
    width = check_ratio(width, "width")
    widths = dict.fromkeys(spec.groups, width)
    if spec.formats:
        name = as_format(bits, "bits").name
        return make_config(
            spec,
            {n: spec.fixed_choice(n) if n in spec.fixed_bits else name for n in spec.layers},
            widths,
        )
    bits = check_bit(bits, "bits")
    return QuantConfig({n: spec.fixed_bits.get(n, bits) for n in spec.layers}, widths)
