"""A model -> the records a :class:`~optuna_ctpe.HessianSearchSpace` is built from.

:func:`measure` is what :meth:`HessianSearchSpace.from_model` does before pruning: it traces
the Hessian (or empirical Fisher) of the chosen layers, measures each layer's quantization error
at every bit-width and, with example inputs, finds the width groups, their perturbation at every
ratio and exactly which tensors each group shrinks.

Requires the ``torch`` extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import math
from typing import Any
import warnings

from torch import nn

from optuna_ctpe.nn import width as _width
from optuna_ctpe.nn.layers import weight_of
from optuna_ctpe.nn.layers import WEIGHTED_LAYER_TYPES
from optuna_ctpe.nn.quantize import quantization_error
from optuna_ctpe.nn.sensitivity import estimator as _estimator
from optuna_ctpe.nn.traces import LayerTrace
from optuna_ctpe.space.records import check_bit
from optuna_ctpe.space.records import check_bits_grid
from optuna_ctpe.space.records import check_widths_grid
from optuna_ctpe.space.records import LayerSensitivity
from optuna_ctpe.space.records import ParamTensor
from optuna_ctpe.space.records import WidthGroupSensitivity


__all__ = ["measure", "measure_groups", "quantized_layer_names"]


def measure(
    model: nn.Module,
    loss_fn: Any,
    batches: Sequence[Any],
    *,
    bits: Sequence[int],
    widths: Sequence[float],
    layers: Sequence[str] | None,
    example_inputs: Any,
    keep_first_last_bits: int | None,
    estimator: str,
    **estimator_kwargs: Any,
) -> dict[str, Any]:
    """Measure ``model`` into the keyword arguments of :class:`~optuna_ctpe.HessianSearchSpace`.

    Args:
        model: The trained full-precision model; it is not modified.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, twice differentiable.
        batches: Calibration batches passed to ``loss_fn``.
        bits: The grid of weight bit-widths.
        widths: The grid of width ratios; width groups are measured only when
            ``example_inputs`` is given and the grid has more than one ratio.
        layers: Names of the modules to quantize; None for every supported layer with a weight.
        example_inputs: Inputs for tracing channel dependencies, or None (bits only).
        keep_first_last_bits: Bit-width the first and last layers are fixed to, or None.
        estimator: ``"hutchinson"`` or ``"fisher"``
            (:data:`optuna_ctpe.nn.sensitivity.ESTIMATORS`).
        **estimator_kwargs: ``seed``, ``max_probes``, ``min_probes``, ``rtol`` and ``progress``
            of the estimator.

    Returns:
        ``layers``, ``groups``, ``tensors``, ``bits``, ``widths`` and ``fixed_bits``.

    Raises:
        ValueError: On a bad grid, an unknown layer name, an unknown ``estimator`` or a NaN
            trace; a negative trace is clipped to 0 with a warning.
    """
    bits = check_bits_grid(bits)
    widths = check_widths_grid(widths)
    if keep_first_last_bits is not None:
        check_bit(keep_first_last_bits, "keep_first_last_bits")
    estimate = _estimator(estimator)
    quantizable, names = quantized_layer_names(model, layers)
    width_groups: list[_width.WidthGroup] = []
    if example_inputs is not None and len(widths) > 1:
        width_groups = _width.width_groups(model, example_inputs)
    group_layers = {n for g in width_groups for n in g.layers}
    traced = [n for n in quantizable if n in set(names) | group_layers]
    traces = estimate(model, loss_fn, batches, layers=traced, **estimator_kwargs)
    mean_trace = {name: _mean_trace(traces[name], estimator) for name in traced}
    groups, tensors = measure_groups(
        model, example_inputs, width_groups, widths, mean_trace, names
    )
    fixed = None
    if keep_first_last_bits is not None:
        fixed = {names[0]: keep_first_last_bits, names[-1]: keep_first_last_bits}
    return {
        "layers": _layer_sensitivities(model, names, traces, mean_trace, bits),
        "groups": groups,
        "tensors": tensors,
        "bits": bits,
        "widths": widths,
        "fixed_bits": fixed,
    }


def quantized_layer_names(
    model: nn.Module, layers: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """Every supported layer with a weight, and those of them to quantize, in module order.

    Raises:
        ValueError: If ``layers`` names a module that is not a supported layer, or nothing is
            left to quantize.
    """
    quantizable = [
        n
        for n, m in model.named_modules()
        if isinstance(m, WEIGHTED_LAYER_TYPES) and weight_of(m) is not None
    ]
    if layers is None:
        names = quantizable
    else:
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
            raise ValueError(f"layers must be a non-empty sequence of names, got {layers!r}.")
        unknown = [n for n in layers if n not in quantizable]
        if unknown:
            raise ValueError(
                f"layers names {unknown}, which are not Conv/Linear modules of the model; "
                f"known: {quantizable}."
            )
        names = [n for n in quantizable if n in set(layers)]
    if not names:
        raise ValueError("the model has no Conv or Linear layer to quantize.")
    return quantizable, names


def _mean_trace(trace: LayerTrace, estimator: str) -> float:
    """The layer's mean trace; a negative estimate (noise on an indefinite Hessian) clipped."""
    value = float(trace.mean_trace)
    if math.isnan(value):
        raise ValueError(f"the {estimator} trace of layer {trace.name!r} is NaN.")
    if value < 0:
        warnings.warn(
            f"the {estimator} trace of layer {trace.name!r} is negative ({value:.3g}, standard "
            f"error {trace.stderr / trace.n_params:.3g}); clipped to 0. Use more probes or "
            "estimator='fisher' if this layer matters.",
            # Point at the user's call: from_model -> measure -> here.
            stacklevel=4,
        )
        value = 0.0
    return value


def _layer_sensitivities(
    model: nn.Module,
    names: Sequence[str],
    traces: Mapping[str, LayerTrace],
    mean_trace: Mapping[str, float],
    bits: Sequence[int],
) -> list[LayerSensitivity]:
    modules = dict(model.named_modules())
    out = []
    for name in names:
        weight = modules[name].weight.detach()
        out.append(
            LayerSensitivity(
                name=name,
                mean_trace=mean_trace[name],
                n_params=int(weight.numel()),
                errors={b: quantization_error(weight, b) for b in bits},
                trace_stderr=float(traces[name].stderr) / int(weight.numel()),
            )
        )
    return out


def measure_groups(
    model: nn.Module,
    example_inputs: Any,
    width_groups: Sequence[_width.WidthGroup],
    widths: Sequence[float],
    mean_trace: Mapping[str, float],
    quantized: Sequence[str],
) -> tuple[list[WidthGroupSensitivity], list[ParamTensor]]:
    """Width-group sensitivities and the tensor-to-group map, measured by actually pruning.

    Pruning each group alone at each ratio and diffing parameter shapes gives, exactly as the
    pruner behaves, which tensors each group shrinks (and along which dimension) and how many
    channels each ratio keeps, so :meth:`HessianSearchSpace.size` needs no model.
    """
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out_group: dict[str, str] = {}
    in_group: dict[str, str] = {}
    groups = []
    for g in width_groups:
        kept: dict[float, int] = {1.0: int(g.n_channels)} if 1.0 in widths else {}
        for w in (w for w in widths if w < 1):
            pruned = _width.prune_widths(model, example_inputs, {g.name: w})
            for n, p in pruned.named_parameters():
                new, old = tuple(p.shape), shapes[n]
                if new[:1] != old[:1]:
                    out_group[n] = g.name
                    kept.setdefault(w, round(g.n_channels * new[0] / old[0]))
                if len(old) > 1 and new[1:2] != old[1:2]:
                    in_group[n] = g.name
        groups.append(
            WidthGroupSensitivity(
                name=g.name,
                n_channels=int(g.n_channels),
                mean_trace=_group_mean_trace(g, shapes, mean_trace),
                perturbations={
                    w: _width.width_perturbation(model, g, w) if w < 1 else 0.0 for w in widths
                },
                kept_channels=kept if len(kept) == len(widths) else None,
            )
        )
    layer_of = {f"{n}.weight": n for n in quantized}
    tensors = [
        ParamTensor(n, math.prod(s), layer_of.get(n), out_group.get(n), in_group.get(n))
        for n, s in shapes.items()
    ]
    return groups, tensors


def _group_mean_trace(
    group: _width.WidthGroup,
    shapes: Mapping[str, tuple[int, ...]],
    mean_trace: Mapping[str, float],
) -> float:
    """Parameter-weighted mean trace of the group's layers: the average Hessian eigenvalue over
    exactly the weights a width change removes."""
    layers = [n for n in group.layers if n in mean_trace]
    sizes = [math.prod(shapes[f"{n}.weight"]) for n in layers]
    if not sizes:
        return 0.0
    return float(sum(mean_trace[n] * k for n, k in zip(layers, sizes)) / sum(sizes))
