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

import torch
from torch import nn

from optuna_ctpe.nn import width as _width
from optuna_ctpe.nn.formats import format_errors
from optuna_ctpe.nn.formats import FormatQuantizer
from optuna_ctpe.nn.layers import eval_mode
from optuna_ctpe.nn.layers import layer_type
from optuna_ctpe.nn.layers import LayerWeight
from optuna_ctpe.nn.layers import model_layers
from optuna_ctpe.nn.layers import weight_of
from optuna_ctpe.nn.quantize import quantization_error
from optuna_ctpe.nn.sensitivity import estimator as _estimator
from optuna_ctpe.nn.sensitivity import resolve_estimator
from optuna_ctpe.nn.traces import LayerTrace
from optuna_ctpe.nn.width_calibration import calibrate_groups
from optuna_ctpe.space.checks import check_bit
from optuna_ctpe.space.checks import check_bits_grid
from optuna_ctpe.space.checks import check_formats_grid
from optuna_ctpe.space.checks import check_widths_grid
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
    include_embeddings: bool = False,
    traces: Mapping[str, LayerTrace] | None = None,
    calibrate_widths: bool = False,
    formats: Sequence[Any] | None = None,
    quantizer: FormatQuantizer | None = None,
    format_error: str = "output",
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
        layers: Names of the layers to quantize (:mod:`optuna_ctpe.nn.layers`); None for every
            supported layer.
        example_inputs: Inputs for tracing channel dependencies, or None (bits only).
        keep_first_last_bits: Bit-width the first and last layers are fixed to, or None.
        estimator: One of :data:`optuna_ctpe.nn.ESTIMATOR_NAMES`; ``"auto"`` is
            resolved by :func:`~optuna_ctpe.nn.sensitivity.resolve_estimator`.
        include_embeddings: Also quantize ``nn.Embedding`` tables (per row) and layers tied to
            them (an LM head); off by default.
        traces: Per-layer traces measured before (e.g. read with
            :func:`optuna_ctpe.nn.trace_file.read_trace_file`), used instead of running the
            estimator; ``estimator`` then only names them in messages. They must cover every
            layer that needs a trace, each with its weight's parameter count.
        calibrate_widths: Also measure each width group's calibration-loss increase at each
            ratio (:func:`optuna_ctpe.nn.width_calibration.calibrate_groups`).
        formats: Weight formats (names, records or bit-widths) of a format space: each
            layer's errors are then measured per format, on the weights ``quantizer``
            produces (:func:`optuna_ctpe.nn.formats.format_errors`), and ``bits`` is not read;
            None measures ``bits``, as always.
        quantizer: ``model``'s :class:`~optuna_ctpe.nn.formats.FormatQuantizer`, required with
            ``formats`` (GPTQ formats need its calibration batches).
        format_error: How a format's weight change is measured, ``"output"`` or ``"weight"``
            (:func:`optuna_ctpe.nn.formats.format_errors`).
        **estimator_kwargs: ``seed``, ``max_probes``, ``min_probes``, ``rtol`` and ``progress``
            of the estimator.

    Returns:
        ``layers``, ``groups``, ``tensors``, ``bits``, ``widths`` and ``fixed_bits``; with
        ``formats``, ``formats`` too.

    Raises:
        ValueError: On a bad grid, an unknown layer name, an unknown ``estimator`` or a NaN
            trace; a negative trace is clipped to 0 (its standard error kept) with a warning.
    """
    format_names = None
    if formats is not None:
        format_names = check_formats_grid(formats)
        if quantizer is None or quantizer.model is not model:
            raise ValueError("formats need the model's FormatQuantizer as quantizer.")
    else:
        bits = check_bits_grid(bits)
    widths = check_widths_grid(widths)
    if keep_first_last_bits is not None:
        check_bit(keep_first_last_bits, "keep_first_last_bits")
    if estimator != "auto":
        _estimator(estimator)  # an unknown name fails before anything is measured
    quantizable, names = quantized_layer_names(
        model, layers, include_embeddings=include_embeddings
    )
    width_groups: list[_width.WidthGroup] = []
    if example_inputs is not None and len(widths) > 1:
        width_groups = _width.width_groups(model, example_inputs)
    # The quantized layers and every layer a width group prunes need a trace.
    needed = set(names) | {n for g in width_groups for n in g.layers}
    traced = [n for n in quantizable if n in needed]
    by_name = model_layers(model, include_embeddings=include_embeddings)
    if traces is None:
        estimator = resolve_estimator(estimator, model, loss_fn, batches, layers=traced)
        estimate = _estimator(estimator)
        traces = estimate(model, loss_fn, batches, layers=traced, **estimator_kwargs)
    else:
        check_traces_fit(traces, {n: by_name[n] for n in traced})
        estimator = "supplied" if estimator == "auto" else estimator  # names them in messages
    mean_trace = {name: _mean_trace(traces[name], estimator) for name in traced}
    stderr = {name: traces[name].stderr / traces[name].n_params for name in traced}
    groups, tensors = measure_groups(
        model, example_inputs, width_groups, widths, mean_trace, [by_name[n] for n in names],
        stderr,
    )  # fmt: skip
    if calibrate_widths:
        groups = calibrate_groups(model, loss_fn, batches, example_inputs, groups)
    fixed = None
    if keep_first_last_bits is not None:
        fixed = {names[0]: keep_first_last_bits, names[-1]: keep_first_last_bits}
    measured = [by_name[n] for n in names]
    if format_names is None:
        errors = {
            layer.name: {b: quantization_error(layer.weight.detach(), b, layer.out_axis)
                         for b in bits}
            for layer in measured
        }  # fmt: skip
    else:
        assert quantizer is not None  # checked above
        errors = format_errors(quantizer, measured, format_names, format_error)
    return {
        "layers": _layer_sensitivities(measured, traces, mean_trace, errors),
        "groups": groups,
        "tensors": tensors,
        "bits": bits,
        "widths": widths,
        "fixed_bits": fixed,
        **({} if format_names is None else {"formats": format_names}),
    }


def quantized_layer_names(
    model: nn.Module, layers: Sequence[str] | None, *, include_embeddings: bool = False
) -> tuple[list[str], list[str]]:
    """Every supported layer, and those of them to quantize, in module order.

    Modules holding a weight matrix of an unsupported type are named in a warning.

    Args:
        model: The network.
        layers: Layer names to quantize, or None for every supported layer.
        include_embeddings: Count ``nn.Embedding`` modules (and layers tied to them, such as
            an LM head) as supported layers.

    Raises:
        ValueError: If ``layers`` names something that is not a supported layer, or nothing is
            left to quantize.
    """
    quantizable = list(model_layers(model, include_embeddings=include_embeddings, warn=True))
    if layers is None:
        names = quantizable
    else:
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
            raise ValueError(f"layers must be a non-empty sequence of names, got {layers!r}.")
        unknown = [n for n in layers if n not in quantizable]
        if unknown:
            raise ValueError(
                f"layers names {unknown}, which are not supported layers of the model "
                f"(Conv, ConvTranspose, Linear, Conv1D, attention projections"
                f"{'' if include_embeddings else '; embeddings need include_embeddings=True'}); "
                f"known: {quantizable}."
            )
        chosen = set(layers)
        names = [n for n in quantizable if n in chosen]
    if not names:
        raise ValueError("the model has no Conv, Linear or attention layer to quantize.")
    return quantizable, names


def check_traces_fit(traces: Mapping[str, LayerTrace], layers: Mapping[str, LayerWeight]) -> None:
    """Raise a ValueError unless ``traces`` has a trace of each of ``layers``' weights.

    Traces measured on another model, or on another selection of its layers, do not fit; the
    message names the missing layers or the first layer whose parameter count differs.
    """
    missing = [name for name in layers if name not in traces]
    if missing:
        raise ValueError(
            f"the given traces lack {len(missing)} of the {len(layers)} layers that need one "
            f"(first: {missing[:3]}); were they measured on this model, with the same layers "
            "and include_embeddings?"
        )
    for name, layer in layers.items():
        n_params = int(layer.weight.numel())
        if traces[name].n_params != n_params:
            raise ValueError(
                f"the given trace of layer {name!r} is of {traces[name].n_params} parameters, "
                f"but the model's layer has {n_params}: the traces are of another model."
            )


def _mean_trace(trace: LayerTrace, estimator: str) -> float:
    """The layer's mean trace; a negative estimate (noise on an indefinite Hessian) clipped."""
    value = float(trace.mean_trace)
    if math.isnan(value):
        raise ValueError(f"the {estimator} trace of layer {trace.name!r} is NaN.")
    if value < 0:
        warnings.warn(
            f"the {estimator} trace of layer {trace.name!r} is negative ({value:.3g}, standard "
            f"error {trace.stderr / trace.n_params:.3g}); clipped to 0, keeping its standard "
            "error, so the pruning rule reads it at its upper bound and lists it among "
            "uncertain_layers. Use more probes or estimator='ggn' (never negative) if this "
            "layer matters.",
            # Point at the user's call: from_model -> measure -> here.
            stacklevel=4,
        )
        value = 0.0
    return value


def _layer_sensitivities(
    layers: Sequence[LayerWeight],
    traces: Mapping[str, LayerTrace],
    mean_trace: Mapping[str, float],
    errors: Mapping[str, Mapping[Any, float]],
) -> list[LayerSensitivity]:
    out = []
    for layer in layers:
        weight = layer.weight.detach()
        out.append(
            LayerSensitivity(
                name=layer.name,
                mean_trace=mean_trace[layer.name],
                n_params=int(weight.numel()),
                errors=dict(errors[layer.name]),
                trace_stderr=float(traces[layer.name].stderr) / int(weight.numel()),
            )
        )
    return out


def measure_groups(
    model: nn.Module,
    example_inputs: Any,
    width_groups: Sequence[_width.WidthGroup],
    widths: Sequence[float],
    mean_trace: Mapping[str, float],
    quantized: Sequence[LayerWeight],
    trace_stderr: Mapping[str, float] | None = None,
) -> tuple[list[WidthGroupSensitivity], list[ParamTensor]]:
    """Width-group sensitivities and the tensor-to-group map, measured by actually pruning.

    Pruning each group alone at each ratio and diffing parameter shapes gives, exactly as the
    pruner behaves, which tensors each group shrinks (and along which dimension) and how many
    channels each ratio keeps, so :meth:`HessianSearchSpace.size` needs no model; each quantized
    tensor records its per-channel scales (the channels of its quantization axis) too. Diffing the
    squared norms of the layer weights gives ``‖ΔW‖²`` of each ratio (the removed weights; the
    kept ones are unchanged) for any coupling the pruner handles: grouped convolutions, group
    norms, attention; norm scales and biases are not weights and are left out, as in
    :func:`optuna_ctpe.nn.width.width_perturbation`.
    """
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out_group: dict[str, str] = {}
    in_group: dict[str, str] = {}
    groups = []
    norms = _weight_norms(model)
    for g in width_groups:
        kept: dict[float, int] = {1.0: int(g.n_channels)} if 1.0 in widths else {}
        perturbations = dict.fromkeys(widths, 0.0)
        pruned_at = _pruned_or_warn(model, example_inputs, g, widths)
        if pruned_at is None:
            continue
        for w, pruned in pruned_at.items():
            left = _weight_norms(pruned)
            perturbations[w] = max(0.0, sum(norms[n] - left[n] for n in g.layers if n in norms))
            for n, p in pruned.named_parameters():
                new, old = tuple(p.shape), shapes[n]
                if new[:1] != old[:1]:
                    out_group[n] = g.name
                    kept.setdefault(w, round(g.n_channels * new[0] / old[0]))
                if len(old) > 1 and new[1:2] != old[1:2]:
                    in_group[n] = g.name
                elif new[2:] != old[2:] and n not in out_group:
                    # A parameter pruned along a later dimension (a ViT's class token and
                    # position embedding): size accounting needs only which group shrinks it.
                    out_group[n] = g.name
        groups.append(
            WidthGroupSensitivity(
                name=g.name,
                n_channels=int(g.n_channels),
                mean_trace=_group_mean(g, shapes, mean_trace),
                perturbations=perturbations,
                kept_channels=kept if len(kept) == len(widths) else None,
                trace_stderr=_group_mean(g, shapes, trace_stderr or {}),
            )
        )
    layer_of = {layer.param_name: layer for layer in quantized}
    tensors = []
    for n, s in shapes.items():
        layer = layer_of.get(n)
        # A quantized tensor stores one float32 scale per channel of its quantization axis,
        # pruned by whichever group prunes that axis (dimension 0 or 1 of the weight).
        axis = None if layer is None else layer.out_axis
        tensors.append(
            ParamTensor(
                n,
                math.prod(s),
                None if layer is None else layer.name,
                out_group.get(n),
                in_group.get(n),
                scales=0 if axis is None else s[axis],
                scale_group=None if axis is None else (out_group, in_group)[axis].get(n),
            )
        )
    return groups, tensors


def _pruned_or_warn(
    model: nn.Module, example_inputs: Any, group: _width.WidthGroup, widths: Sequence[float]
) -> dict[float, nn.Module] | None:
    """``group`` pruned alone to each width below 1; None, with a warning naming the group and
    the pruner's error, when the pruned model does not run (torch-pruning mishandles some
    couplings, e.g. torchvision ViT's class token), so the group is not searched."""
    out = {}
    call = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        for w in (w for w in widths if w < 1):
            out[w] = _width.prune_widths(model, example_inputs, {group.name: w})
            with torch.no_grad(), eval_mode(out[w]):
                if isinstance(example_inputs, dict):
                    out[w](**example_inputs)
                else:
                    out[w](*call)
    except Exception as err:  # noqa: BLE001 - whatever the pruner or the pruned model raises
        warnings.warn(
            f"width group {group.name!r} ({len(group.layers)} layers) could not be pruned "
            f"({type(err).__name__}: {err}); its width is not searched.",
            stacklevel=4,
        )
        return None
    return out


def _weight_norms(model: nn.Module) -> dict[str, float]:
    """Module name -> squared norm of its weight, for every module of a supported layer type."""
    with torch.no_grad():
        return {
            n: float(m.weight.detach().double().pow(2).sum())
            for n, m in model.named_modules()
            if layer_type(m) is not None and weight_of(m) is not None
        }


def _group_mean(
    group: _width.WidthGroup,
    shapes: Mapping[str, tuple[int, ...]],
    per_layer: Mapping[str, float],
) -> float:
    """Parameter-weighted mean of a per-layer value over the group's layers: of the mean
    traces, the average Hessian eigenvalue over exactly the weights a width change removes; of
    their standard errors, an upper bound of its standard error."""
    layers = [n for n in group.layers if n in per_layer]
    sizes = [math.prod(shapes[f"{n}.weight"]) for n in layers]
    if not sizes:
        return 0.0
    return float(sum(per_layer[n] * k for n, k in zip(layers, sizes)) / sum(sizes))
