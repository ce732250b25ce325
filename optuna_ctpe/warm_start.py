"""Budgeted choice allocation by integer linear programming (HAWQ-V3 style).

HAWQ-V3 (Yao et al., ICML 2021) picks one bit-width per layer by minimising the summed
Hessian-weighted perturbation Σ Ω subject to a model-size (or BOPs, latency) limit. This module
holds that integer program as a pure numpy/scipy function, so the sampler side and the search
space can use it without torch; :meth:`optuna_ctpe.HessianSearchSpace.warm_starts` builds its
inputs from a model's sensitivities.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds
from scipy.optimize import LinearConstraint
from scipy.optimize import milp


__all__ = ["ilp_allocation"]


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
            from optuna_ctpe.warm_start import ilp_allocation

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
