"""Tests of the ILP allocation: exactness against brute force, validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from optuna_ctpe.space.warm_start import ilp_allocation


def _brute_force(omega: list[np.ndarray], cost: list[np.ndarray], budget: float) -> float:
    best = np.inf
    for picks in itertools.product(*[range(len(o)) for o in omega]):
        c = sum(cost[i][j] for i, j in enumerate(picks))
        if c <= budget:
            best = min(best, sum(omega[i][j] for i, j in enumerate(picks)))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_groups = int(rng.integers(1, 5))
    omega = [rng.exponential(size=int(rng.integers(1, 5))) for _ in range(n_groups)]
    cost = [rng.integers(1, 50, size=o.size).astype(float) for o in omega]
    lo = sum(c.min() for c in cost)
    hi = sum(c.max() for c in cost)
    budget = float(rng.uniform(lo, hi))
    picks = ilp_allocation(omega, cost, budget)
    assert len(picks) == n_groups
    assert sum(cost[i][j] for i, j in enumerate(picks)) <= budget
    assert sum(omega[i][j] for i, j in enumerate(picks)) == pytest.approx(
        _brute_force(omega, cost, budget), rel=1e-9, abs=1e-12
    )


def test_budget_equal_to_a_feasible_size_is_feasible() -> None:
    omega = [np.array([3.0, 1.0, 0.0]), np.array([5.0, 0.0])]
    cost = [np.array([2.0, 4.0, 8.0]), np.array([2.0, 8.0])]
    assert ilp_allocation(omega, cost, 16.0) == [2, 1]
    assert ilp_allocation(omega, cost, 12.0) == [1, 1]


def test_ties_prefer_cheaper_choice() -> None:
    omega = [np.array([0.0, 0.0, 0.0])]
    cost = [np.array([8.0, 2.0, 4.0])]
    assert ilp_allocation(omega, cost, 100.0) == [1]


def test_docstring_example() -> None:
    omega = [np.array([9.0, 2.0, 0.1]), np.array([1.0, 0.2, 0.01])]
    cost = [np.array([2.0, 4.0, 8.0]) * 100, np.array([2.0, 4.0, 8.0]) * 1000]
    assert ilp_allocation(omega, cost, budget=5000) == [2, 1]


def test_infeasible_budget_names_smallest_cost() -> None:
    with pytest.raises(ValueError, match="infeasible.*costs 4.0"):
        ilp_allocation([np.array([1.0, 0.0])] * 2, [np.array([2.0, 4.0])] * 2, 3.0)


@pytest.mark.parametrize(
    "omega, cost, budget, match",
    [
        ([np.array([1.0])], [], 1.0, "one array per group"),
        ([], [], 1.0, "at least one group"),
        ([np.array([1.0, 2.0])], [np.array([1.0])], 1.0, r"omega\[0\] and cost\[0\]"),
        ([np.array([np.nan])], [np.array([1.0])], 1.0, r"omega\[0\] must be finite"),
        ([np.array([1.0])], [np.array([-1.0])], 1.0, r"cost\[0\] must be finite and >= 0"),
        ([np.array([1.0])], [np.array([1.0])], np.nan, "budget must be a finite"),
    ],
)
def test_validation(omega, cost, budget, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        ilp_allocation(omega, cost, budget)
