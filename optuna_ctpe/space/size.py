"""Size accounting and summed perturbation of a configuration, and the size of the space.

A configuration's storage is exact: each weight of a quantized layer takes its bit-width, every
other parameter (biases, normalisation) 32 bits, and a width ratio shrinks each tensor its group
prunes by the channels it removes, along the pruned dimension. Each quantized tensor also stores
one float32 scale per channel of its quantization axis (what a packed artifact,
:mod:`optuna_ctpe.deploy.artifact`, writes beside the integers: several percent of a small model
at low bits), shrunk likewise when a group prunes that axis. The scale count comes from the
tensor records (:attr:`~optuna_ctpe.space.records.ParamTensor.scales`), which
``HessianSearchSpace.from_model`` fills in; records without it (spaces built from sensitivities
alone, or saved before scales were counted) count no scales, so old studies keep their sizes.
Buffers (batch-norm running statistics) are not counted.

:func:`size_bits_formats` prices a weight format per layer
(:class:`~optuna_ctpe.space.formats.WeightFormat`): each quantized tensor as an
``(channels × inputs)`` matrix after pruning, its codes, scales and zero points at the
precision stored (:func:`~optuna_ctpe.space.formats.format_bits`). A bit-width ``b`` there is
the legacy format ``int{b}-pc-sym-rtn`` and is priced exactly as :func:`size_bits` prices it.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any

from optuna_ctpe._validation import check_integer
from optuna_ctpe._validation import check_ratio
from optuna_ctpe.space.checks import check_config
from optuna_ctpe.space.formats import as_format
from optuna_ctpe.space.formats import format_bits
from optuna_ctpe.space.formats import legacy_format
from optuna_ctpe.space.params import Choices
from optuna_ctpe.space.params import extreme_config
from optuna_ctpe.space.params import layer_param
from optuna_ctpe.space.params import width_param
from optuna_ctpe.space.records import ParamTensor
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import SpaceSpec


#: Bits of a parameter that is not quantized.
FLOAT_BITS = 32


def numel_after(spec: SpaceSpec, tensor: ParamTensor, widths: Mapping[str, float]) -> int:
    """Elements of ``tensor`` left after pruning to ``widths``.

    Exact: a tensor's numel is a multiple of the channels of each pruned dimension
    (:func:`~optuna_ctpe.space.checks.check_tensors` makes sure).
    """
    numel = tensor.numel
    for g in (tensor.out_group, tensor.in_group):
        if g is not None:
            group = spec.groups[g]
            numel = numel // group.n_channels * group.kept(widths[g])
    return numel


def scales_after(spec: SpaceSpec, tensor: ParamTensor, widths: Mapping[str, float]) -> int:
    """Per-channel scales of ``tensor`` left after pruning to ``widths`` (0 for a float tensor).

    Exact, as :func:`numel_after`: the scale count is a multiple of its group's channels.
    """
    if tensor.scale_group is None:
        return tensor.scales
    group = spec.groups[tensor.scale_group]
    return tensor.scales // group.n_channels * group.kept(widths[tensor.scale_group])


def size_bits(spec: SpaceSpec, config: QuantConfig) -> int:
    """Exact storage of the model under ``config``, in bits (see the module docstring); a
    format configuration is priced by :func:`size_bits_formats`."""
    check_config(spec, config)
    if spec.formats:
        return size_bits_formats(spec, config.formats, config.widths)
    return sum(
        numel_after(spec, t, config.widths)
        * (config.bits[t.layer] if t.layer is not None else FLOAT_BITS)
        + scales_after(spec, t, config.widths) * FLOAT_BITS
        for t in spec.tensors
    )


def size_bits_formats(
    spec: SpaceSpec, formats: Mapping[str, Any], widths: Mapping[str, float] | None = None
) -> int:
    """Exact storage of the model with a weight format per layer, pruned to ``widths``, in bits.

    Each quantized tensor is priced by :func:`~optuna_ctpe.space.formats.format_bits` on its
    ``(channels, inputs)`` shape after pruning (channels: its scale count; inputs: the rest),
    every other tensor at 32 bits, as :func:`size_bits` does. With bit-widths (legacy formats)
    the result equals :func:`size_bits` of the same configuration.

    Example:
        .. code-block:: python

            from optuna_ctpe.space.checks import make_spec
            from optuna_ctpe.space.records import LayerSensitivity, ParamTensor
            from optuna_ctpe.space.size import size_bits_formats

            layer = LayerSensitivity("fc", 1.0, 384 * 384, {4: 1.0})
            tensors = [ParamTensor("fc.weight", 384 * 384, "fc", scales=384)]
            spec = make_spec([layer], [], tensors, [4], [1.0], 16.0, None)
            size_bits_formats(spec, {"fc": "int4-g128-asym-rtn"}) / (384 * 384)  # 4.15625

    Args:
        spec: The space.
        formats: Layer name -> format (a :class:`~optuna_ctpe.space.formats.WeightFormat`,
            its name, or a bit-width), for exactly the space's layers.
        widths: Group name -> width ratio for exactly the space's groups; None keeps every
            group whole.

    Raises:
        ValueError: If ``formats`` or ``widths`` do not name exactly the space's layers and
            groups, a format is bad, or a tensor recorded without its channel count (a space
            built from sensitivities alone, or saved before scales were counted) is given a
            format other than a bit-width: its shape is then unknown.
    """
    if not isinstance(formats, Mapping) or set(formats) != set(spec.layers):
        got = sorted(formats) if isinstance(formats, Mapping) else formats
        raise ValueError(f"formats must name exactly the layers {sorted(spec.layers)}, got {got}.")
    checked = {name: as_format(f, f"formats[{name!r}]") for name, f in formats.items()}
    widths = dict.fromkeys(spec.groups, 1.0) if widths is None else dict(widths)
    if set(widths) != set(spec.groups):
        raise ValueError(
            f"widths must name exactly the groups {sorted(spec.groups)}, got {sorted(widths)}."
        )
    for name, w in widths.items():
        check_ratio(w, f"widths[{name!r}]")
    total = 0
    for t in spec.tensors:
        numel = numel_after(spec, t, widths)
        if t.layer is None:
            total += numel * FLOAT_BITS
            continue
        fmt = checked[t.layer]
        if t.scales == 0:
            if fmt != legacy_format(fmt.bits):
                raise ValueError(
                    f"tensor {t.name!r} was recorded without its channel count, so format "
                    f"{fmt.name!r} of layer {t.layer!r} cannot be priced; give a bit-width, or "
                    "measure the space with HessianSearchSpace.from_model."
                )
            total += numel * fmt.bits  # today's count for such records: no scales
            continue
        rows = scales_after(spec, t, widths)
        total += format_bits(fmt, rows, numel // rows)
    return total


def layer_bits(spec: SpaceSpec, layer: str, choice: Any, widths: Mapping[str, float]) -> int:
    """Exact stored bits of ``layer``'s quantized tensors at ``choice`` (a bit-width, or a
    format of a format space) when pruned to ``widths``: codes, scales and zero points, as
    :func:`size_bits` and :func:`size_bits_formats` count them."""
    total = 0
    for t in spec.tensors:
        if t.layer != layer:
            continue
        numel = numel_after(spec, t, widths)
        if not spec.formats:
            total += numel * choice + scales_after(spec, t, widths) * FLOAT_BITS
            continue
        fmt = as_format(choice)
        rows = scales_after(spec, t, widths)
        # Without a channel count only a bit-width can be priced (make_spec made sure).
        total += numel * fmt.bits if rows == 0 else format_bits(fmt, rows, numel // rows)
    return total


def tie_bits(spec: SpaceSpec, layer: str, choice: Any, widths: Mapping[str, float]) -> int:
    """Exact stored bits of ``layer``'s tie at ``choice``, the layer alone when untied
    (:meth:`~optuna_ctpe.space.records.SpaceSpec.tie_of`): what one choice of its parameter
    stores."""
    return sum(layer_bits(spec, m, choice, widths) for m in spec.tie_of(layer))


def smallest_size(spec: SpaceSpec, choices: Choices) -> int:
    """Storage of the smallest configuration the kept ``choices`` allow, in bits.

    Size grows with every choice (kept smallest first), so it is the one taking every
    smallest choice.
    """
    return size_bits(spec, extreme_config(choices, largest=False, ties=spec.ties))


def fp32_bits(spec: SpaceSpec) -> int:
    """Storage of the unpruned float32 model, in bits (the denominator of size ratios)."""
    return FLOAT_BITS * sum(t.numel for t in spec.tensors)


def size_target(spec: SpaceSpec, size_ratio: Any, size_bits: Any) -> float:
    """A size target in bits, from exactly one of a fraction of fp32 and a number of bits.

    Raises:
        ValueError: If not exactly one is given, ``size_ratio`` is not in (0, 1] or
            ``size_bits`` is not a positive integer.
    """
    if (size_ratio is None) == (size_bits is None):
        raise ValueError("give exactly one of size_ratio and size_bits.")
    if size_ratio is not None:
        try:
            return check_ratio(size_ratio, "size_ratio") * fp32_bits(spec)
        except ValueError:
            # The wording saved scripts match on.
            raise ValueError(f"size_ratio must be in (0, 1], got {size_ratio!r}.") from None
    return float(check_integer(size_bits, "size_bits", minimum=1))


def perturbation(
    spec: SpaceSpec, omega: Mapping[str, Mapping[Any, float]], config: QuantConfig
) -> float:
    """The summed Ω of ``config``'s searched layers and groups (fixed layers are the same in
    every configuration, so they are left out).

    Raises:
        ValueError: If ``config`` does not fit ``spec`` or sets a value outside the grid.
    """
    check_config(spec, config)
    items = [
        (layer_param(spec, n), c)
        for n, c in config.layer_choices().items()
        if n not in spec.fixed_bits
    ]
    items += [(width_param(g), w) for g, w in config.widths.items()]
    total = 0.0
    for name, value in items:
        if value not in omega[name]:
            raise ValueError(
                f"config sets {name!r} to {value!r}, outside the grid {list(omega[name])}."
            )
        total += omega[name][value]
    return float(total)


def log10_size_before(spec: SpaceSpec) -> float:
    """log10 of the number of configurations before pruning (fixed layers excluded; a tie
    counts once)."""
    searched = [n for n in spec.leaders() if n not in spec.fixed_bits]
    counts = [len(spec.grid)] * len(searched) + [len(spec.widths)] * len(spec.groups)
    return _log10_product(counts)


def log10_size_after(choices: Choices) -> float:
    """log10 of the number of configurations the kept ``choices`` allow."""
    return _log10_product([len(c) for c in choices.values()])


def _log10_product(counts: list[int]) -> float:
    return float(sum(math.log10(c) for c in counts))
