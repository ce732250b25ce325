"""The validation of a Hessian search space's records: one helper per rule.

:func:`make_spec` checks every field of the records (:mod:`optuna_ctpe.space.records`) and
builds the :class:`~optuna_ctpe.space.records.SpaceSpec` that every function of
:mod:`optuna_ctpe.space` works on; :func:`check_config` checks one configuration against it.
Each rule fails with a ``ValueError`` naming the field and the bad value. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import math
from typing import Any
from typing import TypeVar

from optuna_ctpe._validation import check_bits
from optuna_ctpe._validation import check_grid
from optuna_ctpe._validation import check_integer
from optuna_ctpe._validation import check_ratio
from optuna_ctpe._validation import check_real
from optuna_ctpe._validation import is_real
from optuna_ctpe._validation import MAX_BITS
from optuna_ctpe._validation import MIN_BITS
from optuna_ctpe.space.formats import as_format
from optuna_ctpe.space.formats import format_bits
from optuna_ctpe.space.formats import parse_format
from optuna_ctpe.space.records import as_group
from optuna_ctpe.space.records import as_layer
from optuna_ctpe.space.records import as_tensor
from optuna_ctpe.space.records import DEFAULT_TRACE_Z
from optuna_ctpe.space.records import LayerSensitivity
from optuna_ctpe.space.records import ParamTensor
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import SpaceSpec
from optuna_ctpe.space.records import WidthGroupSensitivity


_T = TypeVar("_T")
_R = TypeVar("_R")


def _reworded(check: Callable[[Any, str], _T], requirement: str) -> Callable[[Any, str], _T]:
    """``check``, failing with ``"<name> must hold <requirement>, got <value>."`` instead.

    The grids have always said "must hold", and saved error matching (the tests, user scripts)
    relies on it; the rule itself is the shared one of :mod:`optuna_ctpe._validation`.
    """

    def check_one(value: Any, name: str) -> _T:
        try:
            return check(value, name)
        except ValueError:
            raise ValueError(f"{name} must hold {requirement}, got {value!r}.") from None

    return check_one


#: One bit-width of a grid or a configuration, in [MIN_BITS, MAX_BITS].
check_bit = _reworded(check_bits, f"integers in [{MIN_BITS}, {MAX_BITS}]")
#: One width ratio of a grid, in (0, 1].
check_width = _reworded(check_ratio, "ratios in (0, 1]")


def check_bits_grid(bits: Any, name: str = "bits") -> tuple[int, ...]:
    """A bit-width grid: a non-empty, repeat-free sequence of bit-widths, sorted."""
    return check_grid(bits, name, check_bit)


def check_widths_grid(widths: Any, name: str = "widths") -> tuple[float, ...]:
    """A width-ratio grid: a non-empty, repeat-free sequence of ratios in (0, 1], sorted."""
    return check_grid(widths, name, check_width)


def check_budget(budget: Any) -> float:
    """A pruning budget: a number > 0; ``math.inf`` (keep every choice) is allowed."""
    if not is_real(budget) or not budget > 0:
        raise ValueError(f"budget must be a number > 0 (math.inf keeps all), got {budget!r}.")
    return float(budget)


def check_nonnegative(value: Any, what: str) -> float:
    """A finite number >= 0 of a record (a trace, an error), named ``what`` in the message."""
    if not is_real(value):
        raise ValueError(f"{what} must be a number, got {value!r}.")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {number!r}.")
    return number


def make_spec(
    layers: Sequence[LayerSensitivity | Mapping[str, Any]],
    groups: Sequence[WidthGroupSensitivity | Mapping[str, Any]],
    tensors: Sequence[ParamTensor | Mapping[str, Any]] | None,
    bits: Sequence[int],
    widths: Sequence[float],
    budget: float,
    fixed_bits: Mapping[str, int] | None,
    trace_z: float = DEFAULT_TRACE_Z,
    formats: Sequence[Any] | None = None,
    always_kept: Sequence[Any] = (),
    ties: Sequence[Sequence[str]] = (),
) -> SpaceSpec:
    """Check every field and build the :class:`SpaceSpec`.

    The arguments are those of :class:`~optuna_ctpe.HessianSearchSpace`, which holds their
    defaults and documentation. With ``formats``, ``bits`` is not read: the bit-width grid is
    the formats' own.

    Raises:
        ValueError: Naming the field and the bad value.
    """
    format_names = check_formats_grid(formats) if formats is not None else ()
    if format_names:
        bits = sorted({parse_format(f).bits for f in format_names if parse_format(f).quantized})
    bits_grid = check_bits_grid(bits)
    widths_grid = check_widths_grid(widths)
    checked_budget = check_budget(budget)
    checked_z = check_real(trace_z, "trace_z", minimum=0.0)
    layer_map = check_layers(layers, format_names or bits_grid)
    group_map = check_groups(groups, widths_grid)
    fixed = dict(fixed_bits or {})
    for name, b in fixed.items():
        if name not in layer_map:
            raise ValueError(
                f"fixed_bits names unknown layer {name!r}; known layers: {sorted(layer_map)}."
            )
        fixed[name] = check_bit(b, f"fixed_bits[{name!r}]")
    checked_tensors = check_tensors(tensors, layer_map, group_map)
    if format_names:
        format_names = _by_uniform_size(format_names, checked_tensors)
    grid = format_names or bits_grid
    if isinstance(always_kept, (str, Mapping)) or not isinstance(always_kept, Sequence):
        raise ValueError(f"always_kept must be a sequence of choices, got {always_kept!r}.")
    kept = tuple(dict.fromkeys(always_kept))
    outside = [c for c in kept if c not in grid or isinstance(c, bool)]
    if outside:
        raise ValueError(f"always_kept holds {outside}, which are not choices of the grid {grid}.")
    checked_ties = check_ties(ties, layer_map, fixed)
    return SpaceSpec(
        layers=layer_map,
        groups=group_map,
        tensors=checked_tensors,
        bits=bits_grid,
        widths=widths_grid,
        budget=checked_budget,
        fixed_bits=fixed,
        trace_z=checked_z,
        formats=format_names,
        always_kept=tuple(c for c in grid if c in kept),
        ties=checked_ties,
    )


def check_ties(
    ties: Any, layers: Mapping[str, Any], fixed_bits: Mapping[str, int]
) -> tuple[tuple[str, ...], ...]:
    """``ties`` as disjoint tuples of two or more searched layers, each in model order, the
    ties ordered by their first layer.

    Every layer of a space shares its grid, so any searched layers can be tied.
    """
    if isinstance(ties, (str, Mapping)) or not isinstance(ties, Sequence):
        raise ValueError(f"ties must be a sequence of sequences of layer names, got {ties!r}.")
    order = {name: i for i, name in enumerate(layers)}
    seen: dict[str, int] = {}
    out = []
    for i, tie in enumerate(ties):
        members = _tie_members(tie, i)
        _check_tie_known(members, i, order)
        _check_tie_searched(members, i, fixed_bits)
        _check_tie_disjoint(members, i, seen)
        out.append(tuple(sorted(members, key=order.__getitem__)))
    return tuple(sorted(out, key=lambda t: order[t[0]]))


def _tie_members(tie: Any, i: int) -> list[str]:
    """The distinct layer names of ``ties[i]``: two or more strings."""
    if isinstance(tie, (str, Mapping)) or not isinstance(tie, Sequence):
        raise ValueError(f"ties[{i}] must be a sequence of layer names, got {tie!r}.")
    bad = [n for n in tie if not isinstance(n, str) or not n]
    if bad:
        raise ValueError(f"ties[{i}] must hold layer names, got {bad[0]!r} in {list(tie)}.")
    repeated = sorted({n for n in tie if list(tie).count(n) > 1})
    if repeated:
        raise ValueError(f"ties[{i}] names the layers {repeated} more than once: {list(tie)}.")
    if len(tie) < 2:
        raise ValueError(
            f"ties[{i}] must tie two or more layers, got {list(tie)}; a layer alone needs no tie."
        )
    return list(tie)


def _check_tie_known(members: list[str], i: int, order: Mapping[str, int]) -> None:
    unknown = [n for n in members if n not in order]
    if unknown:
        raise ValueError(
            f"ties[{i}] names unknown layers {unknown}; known layers: {sorted(order)}."
        )


def _check_tie_searched(members: list[str], i: int, fixed_bits: Mapping[str, int]) -> None:
    fixed = [n for n in members if n in fixed_bits]
    if fixed:
        raise ValueError(
            f"ties[{i}] holds the fixed layers {fixed} ({list(members)}); a tie is searched. Fix "
            "every layer of the tie at one bit-width instead (fixed_bits), or search them all."
        )


def _check_tie_disjoint(members: list[str], i: int, seen: dict[str, int]) -> None:
    twice = [n for n in members if n in seen]
    if twice:
        raise ValueError(
            f"ties[{i}] holds the layers {twice}, already tied by ties[{seen[twice[0]]}]; "
            "a layer belongs to one tie at most (merge the two)."
        )
    seen.update(dict.fromkeys(members, i))


def check_formats_grid(formats: Any) -> tuple[str, ...]:
    """A format grid: a non-empty, repeat-free sequence of weight formats (records, names or
    bit-widths, :func:`~optuna_ctpe.space.formats.as_format`), as their names."""
    if isinstance(formats, (str, Mapping)) or not isinstance(formats, Sequence) or not formats:
        raise ValueError(f"formats must be a non-empty sequence of formats, got {formats!r}.")
    names = [as_format(f, f"formats[{i}]").name for i, f in enumerate(formats)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"formats has {repeated} more than once.")
    unquantized = [n for n in names if not parse_format(n).quantized]
    if unquantized:
        raise ValueError(f"formats must be integer formats, got {unquantized}.")
    return tuple(names)


def _by_uniform_size(names: Sequence[str], tensors: Sequence[ParamTensor]) -> tuple[str, ...]:
    """``names`` ordered by the stored bits of every quantized tensor in that format (ties by
    name): the order the median of :func:`~optuna_ctpe.space.omega.omega_reference` and
    monotonicity read. A format other than a bit-width needs the tensors' channel counts."""

    def size(name: str) -> int:
        fmt = parse_format(name)
        total = 0
        for t in tensors:
            if t.layer is None:
                continue
            if t.scales == 0:
                if fmt != as_format(fmt.bits):
                    raise ValueError(
                        f"tensor {t.name!r} was recorded without its channel count, so format "
                        f"{name!r} cannot be priced; measure the space with "
                        "HessianSearchSpace.from_model, or give tensors with their scales."
                    )
                total += t.numel * fmt.bits
            else:
                total += format_bits(fmt, t.scales, t.numel // t.scales)
        return total

    return tuple(sorted(names, key=lambda n: (size(n), n)))


def _checked_by_name(
    records: Any,
    plural: str,
    kind: str,
    convert: Callable[[Any], _R],
    check_one: Callable[[_R, str], _R],
    *,
    allow_empty: bool,
) -> dict[str, _R]:
    """Name -> ``check_one(record, "of <kind> <name>")`` for each of ``records``, converted from
    its mapping by ``convert``; the names must be distinct non-empty strings."""
    requirement = "a sequence" if allow_empty else "a non-empty sequence"
    if (
        isinstance(records, Mapping)
        or not isinstance(records, Sequence)
        or not (allow_empty or records)
    ):
        raise ValueError(f"{plural} must be {requirement}, got {records!r}.")
    out: dict[str, _R] = {}
    for item in records:
        record = convert(item)
        name = record.name  # type: ignore[attr-defined]
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {kind} name must be a non-empty string, got {name!r}.")
        if name in out:
            raise ValueError(f"{plural} has the {kind} {name!r} twice.")
        out[name] = check_one(record, f"of {kind} {name!r}")
    return out


def _per_choice(
    values: Mapping[Any, Any], grid: Sequence[Any], field: str, what: str, grid_name: str
) -> dict[Any, float]:
    """``field`` (choice -> number >= 0) checked to cover every choice of ``grid``."""
    missing = [c for c in grid if c not in values]
    if missing:
        raise ValueError(f"the {field} {what} lack the {grid_name} {missing}.")
    return {c: check_nonnegative(values[c], f"{field}[{c}] {what}") for c in grid}


def check_layers(
    layers: Sequence[LayerSensitivity | Mapping[str, Any]], bits: Sequence[Any]
) -> dict[str, LayerSensitivity]:
    """Layer name -> checked :class:`LayerSensitivity`, whose errors cover ``bits`` (the
    bit-widths, or a format space's format names)."""

    def check_one(layer: LayerSensitivity, what: str) -> LayerSensitivity:
        trace = check_nonnegative(layer.mean_trace, f"the mean_trace {what}")
        stderr = check_nonnegative(layer.trace_stderr, f"the trace_stderr {what}")
        n_params = check_integer(layer.n_params, f"the n_params {what}", minimum=1)
        kind = "bit-widths" if all(isinstance(b, int) for b in bits) else "formats"
        errors = _per_choice(layer.errors, bits, "errors", what, kind)
        return LayerSensitivity(layer.name, trace, n_params, errors, stderr)

    return _checked_by_name(layers, "layers", "layer", as_layer, check_one, allow_empty=False)


def check_groups(
    groups: Sequence[WidthGroupSensitivity | Mapping[str, Any]], widths: Sequence[float]
) -> dict[str, WidthGroupSensitivity]:
    """Group name -> checked :class:`WidthGroupSensitivity`, covering ``widths``."""

    def check_one(group: WidthGroupSensitivity, what: str) -> WidthGroupSensitivity:
        trace = check_nonnegative(group.mean_trace, f"the mean_trace {what}")
        n_channels = check_integer(group.n_channels, f"the n_channels {what}", minimum=1)
        perturbations = _per_choice(group.perturbations, widths, "perturbations", what, "widths")
        kept = None
        if group.kept_channels is not None:
            kept = {
                w: check_integer(
                    group.kept_channels.get(w),
                    f"kept_channels[{w}] {what}",
                    minimum=1,
                    maximum=n_channels,
                )
                for w in widths
            }
        increase = None
        if group.loss_increase is not None:
            missing = [w for w in widths if w not in group.loss_increase]
            if missing:
                raise ValueError(f"the loss_increase {what} lack the widths {missing}.")
            increase = {
                w: check_real(group.loss_increase[w], f"loss_increase[{w}] {what}") for w in widths
            }
        stderr = check_nonnegative(group.trace_stderr, f"the trace_stderr {what}")
        return WidthGroupSensitivity(
            group.name, n_channels, trace, perturbations, kept, increase, stderr
        )

    return _checked_by_name(groups, "groups", "group", as_group, check_one, allow_empty=True)


def check_tensors(
    tensors: Sequence[ParamTensor | Mapping[str, Any]] | None,
    layers: Mapping[str, LayerSensitivity],
    groups: Mapping[str, WidthGroupSensitivity],
) -> tuple[ParamTensor, ...]:
    """The checked tensors; by default (None) one weight tensor per layer, without groups."""
    if tensors is None:
        if groups:
            raise ValueError(
                "tensors is required when groups is not empty: the size effect of a width "
                "depends on which tensors the group prunes."
            )
        return tuple(ParamTensor(f"{n}.weight", layer.n_params, n) for n, layer in layers.items())
    out: dict[str, ParamTensor] = {}
    for item in tensors:
        t = as_tensor(item)
        if t.name in out:
            raise ValueError(f"tensors has the tensor {t.name!r} twice.")
        numel = check_integer(t.numel, f"the numel of tensor {t.name!r}", minimum=1)
        if t.layer is not None and t.layer not in layers:
            raise ValueError(f"tensor {t.name!r} names unknown layer {t.layer!r}.")
        scales = check_integer(t.scales, f"the scales of tensor {t.name!r}", minimum=0)
        if scales and t.layer is None:
            raise ValueError(f"tensor {t.name!r} has {scales} scales but is not quantized.")
        if t.scale_group is not None and not scales:
            raise ValueError(f"tensor {t.name!r} has a scale_group but no scales.")
        for role, g, what, count in (
            ("out_group", t.out_group, "numel", numel),
            ("in_group", t.in_group, "numel", numel),
            ("scale_group", t.scale_group, "scales", scales),
        ):
            if g is None:
                continue
            if g not in groups:
                raise ValueError(f"tensor {t.name!r} names unknown {role} {g!r}.")
            if count % groups[g].n_channels:
                raise ValueError(
                    f"the {what} {count} of tensor {t.name!r} is not a multiple of the "
                    f"{groups[g].n_channels} channels of its {role} {g!r}."
                )
        out[t.name] = ParamTensor(
            t.name, numel, t.layer, t.out_group, t.in_group, scales, t.scale_group
        )
    unused = set(groups) - {t.out_group for t in out.values()}
    if unused:
        raise ValueError(f"no tensor has the width groups {sorted(unused)} as out_group.")
    return tuple(out.values())


def check_config(spec: SpaceSpec, config: Any) -> QuantConfig:
    """``config``, if it names exactly ``spec``'s layers and groups with valid values."""
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {config!r}.")
    if bool(spec.formats) != bool(config.formats):
        raise ValueError(
            "config must name a format per layer in a format space, and none in a bit-width "
            f"space; got {config!r} for a space of grid {list(spec.grid)}."
        )
    for what, names, known in (
        ("bits", config.bits, spec.layers),
        ("widths", config.widths, spec.groups),
    ):
        if set(names) != set(known):
            kind = "layers" if what == "bits" else "groups"
            raise ValueError(
                f"config.{what} must name exactly the {kind} {sorted(known)}, got {sorted(names)}."
            )
    for name, b in config.bits.items():
        check_bit(b, f"config.bits[{name!r}]")
    for name, w in config.widths.items():
        check_ratio(w, f"config.widths[{name!r}]")
    check_ties_hold(spec, config)
    return config


def check_ties_hold(spec: SpaceSpec, config: QuantConfig) -> None:
    """Refuse ``config`` if the layers of a tie of ``spec`` do not share one choice (a runtime
    that fuses them could not load it)."""
    choices = config.layer_choices()
    for tie in spec.ties:
        values = {n: choices[n] for n in tie if n in choices}
        if len(set(values.values())) > 1:
            leader = values.get(tie[0])
            differ = [n for n, v in values.items() if v != leader]
            raise ValueError(
                f"config breaks the tie {list(tie)}: its layers must share one choice, got "
                f"{values} ({differ} differ from {tie[0]!r})."
            )
