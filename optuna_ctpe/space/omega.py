"""HAWQ-V2's sensitivity Ω of a choice: the one definition the package uses.

``Ω = Tr̄(H) · ‖ΔW‖²``: ``Tr̄(H)`` is the layer's Hessian trace divided by its parameter count
(``mean_trace``), ``‖ΔW‖²`` the squared norm of the weight change a choice makes: ``‖Q_b(W) −
W‖²`` for a bit-width ``b``, ``‖Q_f(W) − W‖²`` for a weight format ``f`` with ``Q_f(W)`` the
weight the format actually produces (GPTQ's output for a GPTQ format, not a round-to-nearest
stand-in), the squared norm of the removed weights for a width ratio. Pure
Python: the torch wing measures the two factors, the space wing multiplies them here.

A measured trace is noisy, so the table comes in two readings: the point estimate
(``upper=False``: summed perturbations, warm starts) and the upper confidence bound
``mean_trace + z × trace_stderr`` (``upper=True``: the pruning rule and the priors), so that a
layer whose trace cannot be told from zero is not taken for an insensitive one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optuna_ctpe._validation import check_real
from optuna_ctpe.space.params import layer_param
from optuna_ctpe.space.params import width_param
from optuna_ctpe.space.records import LayerSensitivity
from optuna_ctpe.space.records import SpaceSpec
from optuna_ctpe.space.records import WidthGroupSensitivity


def choice_sensitivity(mean_trace: float, delta_w_sq_norm: float) -> float:
    """HAWQ-V2's sensitivity ``Ω = Tr̄(H) · ‖ΔW‖²`` of one choice for one layer.

    ``Ω`` is the second-order loss increase ``½ ΔWᵀ H ΔW`` (up to the factor ½) for a
    perturbation spread evenly over the Hessian's eigendirections, so choices of different
    layers are comparable. ``ΔW`` is ``Q_b(W) − W`` for a bit-width (see
    :func:`optuna_ctpe.nn.quantize.quantization_error`) or the removed weights for a width (see
    :func:`optuna_ctpe.nn.width.width_perturbation`).

    Args:
        mean_trace: The layer's mean trace
            (:attr:`optuna_ctpe.nn.traces.LayerTrace.mean_trace`).
        delta_w_sq_norm: ``‖ΔW‖²``, non-negative.

    Raises:
        ValueError: If an argument is not finite or ``delta_w_sq_norm`` is negative.
    """
    trace = check_real(mean_trace, "mean_trace")
    return trace * check_real(delta_w_sq_norm, "delta_w_sq_norm", minimum=0.0)


def upper_trace(layer: LayerSensitivity | WidthGroupSensitivity, z: float) -> float:
    """``mean_trace + z × trace_stderr``: the layer's (or group's) trace as the pruning rule
    reads it.

    Args:
        layer: The layer's (or width group's) sensitivity record.
        z: Standard errors added, >= 0 (:attr:`~optuna_ctpe.space.records.SpaceSpec.trace_z`).

    Example:
        .. code-block:: python

            from optuna_ctpe.space.omega import upper_trace
            from optuna_ctpe.space.records import LayerSensitivity

            layer = LayerSensitivity("fc", 0.0, 10, {8: 1e-4}, trace_stderr=0.3)
            upper_trace(layer, 1.0)  # 0.3: a clipped (negative) estimate is not read as zero

    Raises:
        ValueError: If ``z`` is negative or not finite.
    """
    return layer.mean_trace + check_real(z, "z", minimum=0.0) * layer.trace_stderr


def omega_table(spec: SpaceSpec, *, upper: bool = False) -> dict[str, dict[Any, float]]:
    """Parameter name -> {choice: Ω} over the full grids (before pruning), every parameter.

    Args:
        spec: The space's validated inputs.
        upper: Use each layer's and each width group's :func:`upper_trace` at
            ``spec.trace_z`` instead of its mean trace.

    A width group with a measured ``loss_increase`` (:mod:`optuna_ctpe.nn.width_calibration`)
    is priced at ``max(2 × loss_increase, Ω)``: Ω is twice the predicted loss increase, and the
    second-order estimate under-predicts removing channels, but a measured decrease on a small
    calibration set must not make a width change free.
    """
    out: dict[str, dict[Any, float]] = {}
    for name, layer in spec.layers.items():
        trace = upper_trace(layer, spec.trace_z) if upper else layer.mean_trace
        out[layer_param(spec, name)] = {
            c: choice_sensitivity(trace, layer.errors[c]) for c in spec.grid
        }
    for name, group in spec.groups.items():
        trace = upper_trace(group, spec.trace_z) if upper else group.mean_trace
        table = {w: choice_sensitivity(trace, group.perturbations[w]) for w in spec.widths}
        if group.loss_increase is not None:
            table = {w: max(2.0 * group.loss_increase[w], o) for w, o in table.items()}
        out[width_param(name)] = table
    return out


def tied_table(
    spec: SpaceSpec, omega: Mapping[str, Mapping[Any, float]]
) -> dict[str, dict[Any, float]]:
    """``omega`` (an :func:`omega_table`, one entry per layer) per parameter of the space: a
    tie's leader parameter gets the summed Ω of the tie's layers at each choice, its followers'
    entries are dropped; without ties, a copy of ``omega``.

    The per-layer table stays what :func:`~optuna_ctpe.space.size.perturbation` sums; this one
    is what the choices of a parameter are weighed by (the ILP, the priors, the repair rule).
    """
    out = {name: dict(table) for name, table in omega.items()}
    for tie in spec.ties:
        params = [layer_param(spec, n) for n in tie]
        out[params[0]] = {c: sum(omega[p][c] for p in params) for c in omega[params[0]]}
        for p in params[1:]:
            del out[p]
    return out


def omega_reference(spec: SpaceSpec) -> float:
    """``Ω_ref``: the largest Ω over the searched layers at the median bit-width of the grid
    (in a format space, the median format of :attr:`~optuna_ctpe.space.records.SpaceSpec.formats`,
    which are ordered by the model's size in each).

    From the point estimates: a noisy layer's upper bound makes that layer's own choices
    riskier, it does not raise the threshold every other layer is held to.
    """
    median_bits = spec.grid[(len(spec.grid) - 1) // 2]
    return max(
        (
            choice_sensitivity(spec.layers[n].mean_trace, spec.layers[n].errors[median_bits])
            for n in spec.searched_layers()
        ),
        default=0.0,
    )
