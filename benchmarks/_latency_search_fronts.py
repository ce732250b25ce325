"""Pareto fronts of ``benchmarks/latency_search.py``: non-dominated rows, a front cut to a few
configurations spread along it, and 2-D hypervolumes (pure numpy)."""

from __future__ import annotations

import numpy as np


def _dominated(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` is dominated by ``b`` (all objectives minimised)."""
    return bool(np.all(b <= a) and np.any(b < a))


def pareto_front(points: np.ndarray) -> list[int]:
    """Indices of the non-dominated rows of ``points`` (every column minimised)."""
    return [i for i, p in enumerate(points) if not any(_dominated(p, q) for q in points)]


def spread_front(values: np.ndarray, cap: int) -> list[int]:
    """At most ``cap`` rows of a front, spread along it.

    The rows non-dominated in the first two columns (the metric and the search's first cost:
    the plane the plots draw) come first, evenly spaced in the order of that cost when there
    are more than ``cap``; what ``cap`` leaves is filled, evenly spaced the same way, with the
    front's other rows.

    Args:
        values: One row per configuration of the front, every column minimised.
        cap: The most rows to keep, an integer >= 1.

    Returns:
        The kept rows' indices, in increasing order.
    """
    if len(values) <= cap:
        return list(range(len(values)))

    def even(items: list[int], n: int) -> list[int]:
        if n >= len(items):
            return items
        return [items[round(j)] for j in np.linspace(0, len(items) - 1, n)] if n else []

    plane = sorted(pareto_front(values[:, :2]), key=lambda i: values[i, 1])
    rest = sorted(set(range(len(values))) - set(plane), key=lambda i: values[i, 1])
    chosen = even(plane, cap)
    return sorted(chosen + even(rest, cap - len(chosen)))


def hypervolume_2d(accuracy: np.ndarray, cost: np.ndarray, ref: tuple[float, float]) -> float:
    """Area dominated by the points (accuracy up, cost down) above ``ref`` = (accuracy, cost)."""
    keep = (accuracy > ref[0]) & (cost < ref[1])
    order = np.argsort(cost[keep])
    area, best = 0.0, ref[0]
    costs, accs = cost[keep][order], accuracy[keep][order]
    for i, (c, a) in enumerate(zip(costs, accs)):
        best = max(best, a)
        right = costs[i + 1] if i + 1 < len(costs) else ref[1]
        area += (right - c) * (best - ref[0])
    return area
