"""Warm starts: budgeted choice allocation by integer linear programming (HAWQ-V3 style).

HAWQ-V3 (Yao et al., ICML 2021) picks one bit-width per layer by minimising the summed
Hessian-weighted perturbation Σ Ω subject to a model-size (or BOPs, latency) limit.
:func:`ilp_allocation` holds that integer program as a pure numpy/scipy function;
:func:`linearised_ilp` extends it to the joint choice of bit-widths and width ratios, whose size
is bilinear, and :func:`warm_start_configs` gives the configurations that
:meth:`optuna_ctpe.HessianSearchSpace.warm_starts` returns for a user to enqueue before the
search. The sampler itself does not use them: it sees them only as enqueued trials.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import math
from typing import Any

import numpy as np
from scipy.optimize import Bounds
from scipy.optimize import LinearConstraint
from scipy.optimize import milp

from optuna_ctpe.space.omega import tied_table
from optuna_ctpe.space.params import Choices
from optuna_ctpe.space.params import extreme_config
from optuna_ctpe.space.params import layer_param
from optuna_ctpe.space.params import make_config
from optuna_ctpe.space.params import width_param
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import SpaceSpec
from optuna_ctpe.space.size import FLOAT_BITS
from optuna_ctpe.space.size import tie_bits
from optuna_ctpe.space.size import numel_after
from optuna_ctpe.space.size import perturbation
from optuna_ctpe.space.size import scales_after
from optuna_ctpe.space.size import size_bits


__all__ = [
    "ilp_allocation",
    "linearised_ilp",
    "measured_warm_start_configs",
    "warm_start_configs",
]

# Re-linearisations of the joint size before settling for the best configuration found.
_MAX_LINEARISATIONS = 8
# Corrections of the Ω table by a measured miss before settling for the best measured answer.
_MAX_CORRECTIONS = 6
#: A measured loss increase above this multiple of the predicted Ω/2 is a miss, and the joint
#: ILP answer is corrected. Two, as in the width calibration: within it the prediction holds.
MISS_FACTOR = 2.0


def ilp_allocation(
    omega: Sequence[np.ndarray], cost: Sequence[np.ndarray], budget: float
) -> list[int]:
    """Choose one option per group, minimising the summed ``omega`` with summed ``cost`` <= budget.

    Solves the multiple-choice knapsack

    .. math::

        \\min_x \\sum_{i,j} \\Omega_{ij} x_{ij} \\quad \\text{s.t.} \\quad
        \\sum_{i,j} c_{ij} x_{ij} \\le B, \\quad \\sum_j x_{ij} = 1, \\quad x_{ij} \\in \\{0, 1\\}

    exactly with :func:`scipy.optimize.milp` (HiGHS branch and bound, zero optimality gap).
    Ties in ``omega`` (within 1e-9 of the largest ``omega``) go to the cheapest allocation, by a
    second, lexicographic solve, so the result never spends budget for nothing.

    Example:
        .. code-block:: python

            import numpy as np
            from optuna_ctpe.space.warm_start import ilp_allocation

            # Two layers with choices (2, 4, 8) bits: sensitivity x error, and size in bits.
            omega = [np.array([9.0, 2.0, 0.1]), np.array([1.0, 0.2, 0.01])]
            cost = [np.array([2.0, 4.0, 8.0]) * 100, np.array([2.0, 4.0, 8.0]) * 1000]
            ilp_allocation(omega, cost, budget=5000)  # [2, 1]: 8 bits, then 4 bits

    Args:
        omega: One 1-D array per group (a layer's bit-width, a width group's ratio): the
            perturbation of each option, finite and >= 0.
        cost: One 1-D array per group, the same shapes as ``omega``: the cost of each option
            (e.g. bits of storage), finite and >= 0.
        budget: Upper bound on the summed cost of the chosen options.

    Returns:
        The index of the chosen option of each group.

    Raises:
        ValueError: If the inputs are malformed, or if no choice fits ``budget`` (the message
            gives the smallest feasible budget).
    """
    omegas, costs = _checked_arrays(omega, cost, budget)
    sizes = [o.size for o in omegas]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat_omega = np.concatenate(omegas)
    flat_cost = np.concatenate(costs)
    # Scale both terms to O(1) so HiGHS' tolerances mean the same on any model.
    o_scale = flat_omega.max() or 1.0
    c_scale = flat_cost.max() or 1.0
    one_per_group = np.zeros((len(sizes), flat_omega.size))
    for g, (start, size) in enumerate(zip(starts, sizes)):
        one_per_group[g, start : start + size] = 1.0
    constraints = [
        LinearConstraint(one_per_group, 1.0, 1.0),
        # A tiny slack keeps a budget equal to a feasible size feasible despite rounding.
        LinearConstraint(flat_cost[None, :] / c_scale, -np.inf, budget / c_scale + 1e-12),
    ]
    options = {"mip_rel_gap": 0.0}
    kwargs = dict(integrality=np.ones_like(flat_omega), bounds=Bounds(0.0, 1.0), options=options)
    first = milp(flat_omega / o_scale, constraints=constraints, **kwargs)
    if first.x is None:
        raise ValueError(f"the integer program failed: {first.message}")
    # Lexicographic second stage: among (near-)optimal allocations, the cheapest, so the result
    # is deterministic and never spends budget for no reduction of omega.
    best = float(flat_omega @ np.round(first.x)) / o_scale
    constraints.append(LinearConstraint(flat_omega[None, :] / o_scale, -np.inf, best + 1e-9))
    result = milp(flat_cost / c_scale, constraints=constraints, **kwargs)
    if result.x is None:
        result = first
    x = np.round(result.x)
    return [int(np.argmax(x[start : start + size])) for start, size in zip(starts, sizes)]


def _checked_arrays(
    omega: Sequence[np.ndarray], cost: Sequence[np.ndarray], budget: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``omega`` and ``cost`` as float arrays, if well-formed and ``budget`` is feasible."""
    if len(omega) != len(cost):
        raise ValueError(
            f"omega and cost must have one array per group, got {len(omega)} and {len(cost)}."
        )
    if not len(omega):
        raise ValueError("omega and cost must have at least one group, got none.")
    omegas, costs = [], []
    for i, (o, c) in enumerate(zip(omega, cost)):
        o = np.asarray(o, dtype=float)
        c = np.asarray(c, dtype=float)
        if o.ndim != 1 or o.size == 0 or o.shape != c.shape:
            raise ValueError(
                f"omega[{i}] and cost[{i}] must be non-empty 1-D arrays of equal length, got "
                f"shapes {o.shape} and {c.shape}."
            )
        for label, arr in (("omega", o), ("cost", c)):
            if not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(f"{label}[{i}] must be finite and >= 0, got {arr.tolist()}.")
        omegas.append(o)
        costs.append(c)
    if not np.isfinite(budget):
        raise ValueError(f"budget must be a finite number, got {budget!r}.")
    cheapest = float(sum(c.min() for c in costs))
    if cheapest > budget:
        raise ValueError(
            f"budget={budget!r} is infeasible: the cheapest choice costs {cheapest!r}."
        )
    return omegas, costs


def _linear_problem(
    spec: SpaceSpec,
    choices: Choices,
    omega: Mapping[str, Mapping[Any, float]],
    point: QuantConfig,
    groups: Sequence[str],
) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """The knapsack of the size linearised around ``point``: Ω and cost arrays, and the cost
    left out of them (float tensors and scales, and the smallest size change of each group).
    ``omega`` is per parameter (:func:`~optuna_ctpe.space.omega.tied_table`)."""
    # Per-layer weight elements at the point's widths: the size of 1 bit for that layer.
    per_bit = dict.fromkeys(spec.layers, 0)
    constant = 0.0
    for t in spec.tensors:
        numel = numel_after(spec, t, point.widths)
        if not spec.formats:
            constant += scales_after(spec, t, point.widths) * FLOAT_BITS  # independent of bits
        if t.layer is None:
            constant += numel * FLOAT_BITS
        else:
            per_bit[t.layer] += numel
    omegas, costs = [], []
    # One variable set per parameter: a tie's choice is priced on all its layers together.
    for n in spec.leaders():
        param = layer_param(spec, n)
        options = choices[param]
        # A fixed layer has one choice, possibly off the grid: its Ω is a constant.
        omegas.append(
            np.zeros(1) if n in spec.fixed_bits else np.array([omega[param][c] for c in options])
        )
        if spec.formats:
            # A format's scales and zero points depend on it: each choice is priced whole.
            per_choice = np.array([tie_bits(spec, n, c, point.widths) for c in options], float)
        else:
            elements = sum(per_bit[m] for m in spec.tie_of(n))
            per_choice = np.array([elements * b for b in options], dtype=float)
        costs.append(per_choice)
    base = size_bits(spec, point)
    for g in groups:
        options = choices[width_param(g)]
        deltas = np.array(
            [
                size_bits(spec, dataclasses.replace(point, widths={**point.widths, g: w})) - base
                for w in options
            ],
            dtype=float,
        )
        constant += deltas.min()
        omegas.append(np.array([omega[width_param(g)][w] for w in options]))
        costs.append(deltas - deltas.min())
    return omegas, costs, constant


def linearised_ilp(
    spec: SpaceSpec,
    choices: Choices,
    omega: Mapping[str, Mapping[Any, float]],
    target: float,
    vary_widths: bool,
) -> QuantConfig | None:
    """Best-Ω configuration within ``target`` bits by ILP, linearising the size around a point.

    The size is bilinear in bit-widths and width ratios; around the current point (first the
    safest configuration) it is written as ``Σ_layer numel(point widths) × bits +
    Σ_group Δsize(group ratio)``, solved, re-linearised around the solution and re-solved,
    keeping the best configuration whose exact size fits. With ``vary_widths=False`` the
    problem is HAWQ-V3's bits-only ILP and exact in one pass.

    Args:
        spec: The space's validated inputs.
        choices: Its kept choices.
        omega: Its Ω table.
        target: Size budget in bits.
        vary_widths: Choose the width ratios too, or keep them at the widest.

    Returns:
        The configuration, or None if none was found within ``target``.
    """
    groups = list(spec.groups) if vary_widths else []
    best: QuantConfig | None = None
    best_omega = math.inf
    point = extreme_config(choices, largest=True, ties=spec.ties)
    param_omega = tied_table(spec, omega)  # a tie's choice weighs its layers' summed Ω
    seen: set[QuantConfig] = set()
    leaders = spec.leaders()
    for _ in range(_MAX_LINEARISATIONS):
        omegas, costs, constant = _linear_problem(spec, choices, param_omega, point, groups)
        try:
            picks = ilp_allocation(omegas, costs, target - constant)
        except ValueError:
            break
        # Each layer takes the pick of its parameter (a follower its leader's).
        picked = {n: choices[layer_param(spec, n)][i] for n, i in zip(leaders, picks)}
        values = {n: picked[spec.leader(n)] for n in spec.layers}
        widths = dict(point.widths)
        for g, i in zip(groups, picks[len(leaders) :]):
            widths[g] = choices[width_param(g)][i]
        point = make_config(spec, values, widths)
        if point in seen:
            break
        seen.add(point)
        if size_bits(spec, point) <= target and perturbation(spec, omega, point) < best_omega:
            best, best_omega = point, perturbation(spec, omega, point)
    return best


def warm_start_configs(
    spec: SpaceSpec,
    choices: Choices,
    omega: Mapping[str, Mapping[Any, float]],
    target: float,
    n: int,
) -> list[QuantConfig]:
    """Up to ``n`` distinct configurations within ``target`` bits, best first.

    The joint and the bits-only allocation at ``target`` come first, the one of less Ω
    leading: the joint problem is solved approximately (bilinear size), the bits-only one
    exactly, so the first warm start is never worse than HAWQ-V3's. Then joint allocations at
    budgets shrunk by 10% steps, for diversity. Empty if nothing fits ``target``.
    """
    at_budget = [
        c
        for c in (
            linearised_ilp(spec, choices, omega, target, True),
            linearised_ilp(spec, choices, omega, target, False),
        )
        if c is not None
    ]
    found: list[QuantConfig] = []
    for config in sorted(at_budget, key=lambda c: perturbation(spec, omega, c)):
        if config not in found:
            found.append(config)
    for k in range(1, n):
        if len(found) >= n:
            break
        config = linearised_ilp(spec, choices, omega, (1 - 0.1 * k) * target, True)
        if config is not None and config not in found:
            found.append(config)
    return found[:n]


def measured_warm_start_configs(
    spec: SpaceSpec,
    choices: Choices,
    omega: Mapping[str, Mapping[Any, float]],
    target: float,
    n: int,
    measure: Callable[[QuantConfig], float],
) -> list[tuple[QuantConfig, float]]:
    """Warm starts checked by measurement: up to ``n`` (configuration, measured increase) pairs,
    best first.

    Ω predicts each choice's loss increase alone; a configuration of many choices can lose far
    more than the sum (``benchmarks/results/omega_prediction.md``: resnet18's width groups of
    one stage each lower the loss alone and raise it 60x above the prediction together). So,
    our rule (the paper is silent): measure every warm start of :func:`warm_start_configs`
    with ``measure``; while the joint allocation's measured increase exceeds
    :data:`MISS_FACTOR` × its predicted Ω/2, scale the Ω of each of its choices by
    measured / predicted, so that the corrected table predicts that configuration exactly,
    and solve again (at most ``_MAX_CORRECTIONS`` times). The ILP then leaves the combination
    that failed. Answers are ranked by ``max(measured, Ω/2)`` (Ω of the uncorrected table): as
    in :mod:`optuna_ctpe.nn.width_calibration`, the measurement counts where it exceeds the
    prediction, and a measured *decrease* (the calibration loss is not at its minimum, and a
    few batches are noisy) cannot lift an answer above one the Ω ranks better.

    Measuring the failed answer's choices alone first and repricing them (a lazy calibration)
    was tried and dropped: ``benchmarks/results/warm_start_quality_lazy_calibration.md`` records
    that it moved resnet18's first warm start at 1/16 from 2.96% to 5.19% validation error, and
    mobilenet_v2's (broken either way) from 55.7% to 50.4%.

    Args:
        spec: The space's validated inputs.
        choices: Its kept choices.
        omega: Its Ω table.
        target: Size budget in bits.
        n: Most configurations returned.
        measure: ``measure(config) -> float``: the configuration's loss increase over the
            unconfigured model, in the units of Ω/2 (e.g. the calibration loss increase).

    Returns:
        Distinct configurations within ``target`` with their measured increase, best first.

    Raises:
        ValueError: If ``measure`` returns a value that is not finite.
    """
    table = {name: dict(values) for name, values in omega.items()}
    measured: dict[QuantConfig, float] = {}

    def checked(config: QuantConfig) -> float:
        if config not in measured:
            value = float(measure(config))
            if not math.isfinite(value):
                raise ValueError(f"measure returned {value!r} for {config}; it must be finite.")
            measured[config] = value
        return measured[config]

    for config in warm_start_configs(spec, choices, omega, target, n):
        checked(config)
    for _ in range(_MAX_CORRECTIONS):
        config = linearised_ilp(spec, choices, table, target, True)
        if config is None:
            break
        predicted = perturbation(spec, table, config) / 2
        loss = checked(config)
        if predicted <= 0 or loss <= MISS_FACTOR * predicted:
            break  # the prediction holds, or there is no Ω to correct
        _scale_choices(spec, table, config, loss / predicted)
    ranked = sorted(
        measured.items(),
        key=lambda item: max(item[1], perturbation(spec, omega, item[0]) / 2),
    )
    return ranked[:n]


def _scale_choices(
    spec: SpaceSpec, table: dict[str, dict[Any, float]], config: QuantConfig, factor: float
) -> None:
    """Multiply the Ω of each searched choice ``config`` makes by ``factor``, in place."""
    for name, c in config.layer_choices().items():
        if name not in spec.fixed_bits:
            table[layer_param(spec, name)][c] *= factor
    for group, w in config.widths.items():
        table[width_param(group)][w] *= factor
