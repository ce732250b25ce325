"""Trials -> the good group of l(x), the weighted bad group of g(x), and their observation rows.

Module-level functions of trials, as Optuna's ``_split_trials`` is for its TPE: the sampler
decides *which* trials it reads (constant liar or not) and this module decides where each one
goes. The cluster split itself (values in, index sets out) lives in
:mod:`optuna_ctpe.sampler._cluster_split`.

Where a trial goes:

* COMPLETE and feasible: scored (:func:`complete_scores`) and split by :func:`cluster_split` into
  good, near misses, middle and bad; near misses and middle enter g(x) with their rule weights;
* PRUNED, infeasible (any constraint value > 0) and, when the sampler passes them, RUNNING: g(x)
  with full weight;
* when clustering is not meaningful, TPE's order instead: feasible complete trials by score,
  then pruned trials by progress (:func:`pruned_score`), then infeasible trials by total
  violation (:func:`violation`), cut by :func:`quantile_split`; RUNNING trials stay in g(x).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import json
import math
import threading
from typing import Any
from typing import Literal
from typing import NamedTuple

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from optuna_ctpe import _attrs
from optuna_ctpe import _optuna_compat as compat
from optuna_ctpe._validation import check_integer
from optuna_ctpe._validation import check_real
from optuna_ctpe.sampler._cluster_split import cluster_split
from optuna_ctpe.sampler._cluster_split import quantile_split
from optuna_ctpe.sampler._cluster_split import Split
from optuna_ctpe.sampler._cluster_split import Transform
from optuna_ctpe.sampler._cluster_split import TRANSFORMS


def default_max_good(n_finished: int) -> int:
    """Cap on the good group, ``min(ceil(0.05 n), 25)``: half of Optuna's TPE good-set share.

    Measured in ``benchmarks/results/ablation.md``: a smaller good group concentrates l(x) on
    the best results and needs fewer trials on per-layer quantization problems.
    """
    return min(math.ceil(0.05 * n_finished), 25)


class GroupingRule(NamedTuple):
    """The sampler's settings that decide the groups (see :class:`ClusterTPESampler`).

    Attributes:
        n_clusters: Number of k-means clusters, or ``"auto"``.
        transform: Transform of the scores before clustering.
        max_good: Number of finished trials -> largest good group, or ``None`` for no cap.
        near_miss_weight: Weight in g(x) of the best cluster's members beyond the cap.
        middle_weight: Weight in g(x) of the clusters between the best and the worst.
    """

    n_clusters: int | Literal["auto"]
    transform: Transform
    max_good: Callable[[int], int] | None
    near_miss_weight: float
    middle_weight: float


def grouping_rule(
    n_clusters: Any, transform: Any, max_good: Any, near_miss_weight: Any, middle_weight: Any
) -> GroupingRule:
    """The sampler's grouping settings, each checked (the message names a bad one).

    Args:
        n_clusters: An integer >= 2 or ``"auto"``.
        transform: One of :data:`optuna_ctpe.sampler._cluster_split.TRANSFORMS`.
        max_good: A callable from the number of finished trials to an int, or ``None``.
        near_miss_weight: A number in [0, 1].
        middle_weight: A number in [0, 1].

    Raises:
        ValueError: If an argument is out of range or of the wrong kind.
    """
    if n_clusters != "auto":
        n_clusters = check_integer(n_clusters, "n_clusters", minimum=2, extra='or "auto"')
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}.")
    if max_good is not None and not callable(max_good):
        raise ValueError(
            f"max_good must be a callable n_finished -> int or None, got {max_good!r}."
        )
    return GroupingRule(
        n_clusters=n_clusters,
        transform=transform,
        max_good=max_good,
        near_miss_weight=check_real(near_miss_weight, "near_miss_weight", minimum=0, maximum=1),
        middle_weight=check_real(middle_weight, "middle_weight", minimum=0, maximum=1),
    )


class GroupedTrials(NamedTuple):
    """Result of :func:`group_trials`.

    Attributes:
        good: The trials of l(x), by number.
        bad: The trials of g(x), by number.
        bad_weights: Relative weight of each trial of ``bad`` in g(x).
        split: The split that decided the groups (a quantile split when clustering fell back).
        n_finished: Number of finished (complete, pruned or infeasible) trials seen.
    """

    good: list[FrozenTrial]
    bad: list[FrozenTrial]
    bad_weights: np.ndarray
    split: Split
    n_finished: int


def group_trials(
    trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection], rule: GroupingRule
) -> GroupedTrials:
    """Assign trials to l(x) (good) and g(x) (bad, with weights); the others are left out.

    Args:
        trials: The finished trials, plus the RUNNING ones that must count as bad.
        directions: The study's directions.
        rule: The sampler's grouping settings.
    """
    running, infeasible, complete, pruned = _by_kind(trials)
    n_finished = len(complete) + len(pruned) + len(infeasible)
    n_good_max = n_finished if rule.max_good is None else int(rule.max_good(n_finished))
    n_good_max = max(n_good_max, 1)

    scores = complete_scores(complete, directions) if complete else np.empty(0)
    split: Split | None = None
    if complete:
        split = cluster_split(
            scores,
            n_clusters=rule.n_clusters,
            transform_method=rule.transform,
            n_good_max=n_good_max,
        )
    weight_of: dict[int, float] = {}
    if split is not None and not split.fallback_reason:
        good = [complete[i] for i in split.good]
        bad = [complete[i] for i in split.bad] + pruned + infeasible + running
        for indices, weight in (
            (split.near_miss, rule.near_miss_weight),
            (split.middle, rule.middle_weight),
        ):
            if weight > 0:
                bad += [complete[i] for i in indices]
                weight_of.update((complete[i].number, weight) for i in indices)
    else:
        reason = split.fallback_reason if split is not None else "no feasible complete trial"
        ranked = _tpe_order(complete, scores, pruned, infeasible, directions[0])
        split = quantile_split(np.arange(len(ranked), dtype=float), n_good_max, reason)
        good = [ranked[i] for i in split.good]
        bad = [ranked[i] for i in split.bad] + running
    bad.sort(key=lambda t: t.number)
    bad_weights = np.array([weight_of.get(t.number, 1.0) for t in bad])
    good.sort(key=lambda t: t.number)
    return GroupedTrials(good, bad, bad_weights, split, n_finished)


def _by_kind(
    trials: Sequence[FrozenTrial],
) -> tuple[list[FrozenTrial], list[FrozenTrial], list[FrozenTrial], list[FrozenTrial]]:
    """Running, infeasible, feasible complete and feasible pruned trials, in this order."""
    running, infeasible, complete, pruned = [], [], [], []
    for t in trials:
        if t.state == TrialState.RUNNING:
            running.append(t)
        elif violation(t) > 0:
            infeasible.append(t)
        elif t.state == TrialState.COMPLETE:
            complete.append(t)
        else:
            pruned.append(t)
    return running, infeasible, complete, pruned


def _tpe_order(
    complete: list[FrozenTrial],
    scores: np.ndarray,
    pruned: list[FrozenTrial],
    infeasible: list[FrozenTrial],
    direction: StudyDirection,
) -> list[FrozenTrial]:
    """TPE's ranking: complete trials by score, pruned by progress, infeasible by violation."""
    ranked = [complete[i] for i in np.argsort(scores, kind="stable")]
    ranked += sorted(pruned, key=lambda t: pruned_score(t, direction))
    ranked += sorted(infeasible, key=violation)
    return ranked


def violation(trial: FrozenTrial) -> float:
    """Total constraint violation (0 when feasible or when no constraint was set)."""
    return float(sum(v for v in compat.trial_constraints(trial).values() if v > 0))


def pruned_score(trial: FrozenTrial, direction: StudyDirection) -> tuple[float, float]:
    """Rank pruned trials as Optuna's TPE does: furthest step first, then last value.

    Args:
        trial: A pruned trial.
        direction: The study's (first) direction, which decides whether low values are good.
    """
    if not trial.intermediate_values:
        return 1.0, 0.0
    step, value = max(trial.intermediate_values.items())
    if math.isnan(value):
        return -step, math.inf
    return -step, value if direction == StudyDirection.MINIMIZE else -value


def complete_scores(
    trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection]
) -> np.ndarray:
    """One score per complete trial, lower is better.

    Single objective: the value, negated when maximising (NaN counts as worst). Several
    objectives (our interpretation of "cluster on the fronts"): the non-domination rank plus a
    tie-break in [0, 1) given by the mean normalised rank of the trial's objective values, so
    trials on one front are ordered by how good they are on average.

    Args:
        trials: Complete trials.
        directions: The study's directions.
    """
    signs = np.array([-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in directions])
    values = np.array([t.values for t in trials], dtype=float).reshape(len(trials), -1) * signs
    values = np.where(np.isnan(values), np.inf, values)
    if values.shape[1] == 1:
        return values[:, 0]
    finite_max = np.finfo(float).max
    bounded = np.clip(values, -finite_max, finite_max)
    fronts = compat.fast_non_domination_rank(bounded)
    ranks = np.argsort(np.argsort(bounded, axis=0, kind="stable"), axis=0, kind="stable")
    tie_break = ranks.mean(axis=1) / max(len(trials), 1)
    return fronts.astype(float) + tie_break


# -- Observations: the trials as the Parzen estimators see them --------------------------------


class RowCache:
    """Internal representations of finished trials, per search space, bounded in size.

    Keyed by trial id, which is unique within a storage; a sampler serves one study at a time
    (as Optuna's own samplers assume), and a trial id seen again always means the same trial.
    Trials that set only part of a space are not cached (they are skipped quickly anyway).
    """

    _MAX_SPACES = 16

    def __init__(self) -> None:
        self._spaces: dict[tuple[tuple[str, str], ...], dict[int, np.ndarray]] = {}
        self._lock = threading.Lock()

    def rows_for(self, search_space: dict[str, BaseDistribution]) -> dict[int, np.ndarray]:
        """The cache of one search space: trial id -> row of internal representations."""
        key = tuple((name, repr(dist)) for name, dist in search_space.items())
        with self._lock:
            if key not in self._spaces:
                if len(self._spaces) >= self._MAX_SPACES:
                    self._spaces.pop(next(iter(self._spaces)))
                self._spaces[key] = {}
            return self._spaces[key]


def observations(
    trials: Sequence[FrozenTrial],
    search_space: dict[str, BaseDistribution],
    cache: dict[int, np.ndarray],
    params_of: Callable[[FrozenTrial], dict[str, Any]],
) -> tuple[dict[str, np.ndarray], dict[int, int]]:
    """Internal representations of the trials that set every parameter of the space.

    Rows of finished trials never change, so they are kept in ``cache``: converting every
    parameter of every trial at every trial dominated the sampling time otherwise.

    Args:
        trials: The trials to represent.
        search_space: The distributions being modelled.
        cache: :meth:`RowCache.rows_for` of ``search_space``.
        params_of: A trial's parameters (see :func:`params_with_published`).

    Returns:
        The observations (parameter name -> one value per represented trial) and the map from
        trial number to row.
    """
    rows: list[np.ndarray] = []
    row_of: dict[int, int] = {}
    for t in trials:
        row = cache.get(compat.trial_id(t)) if t.state.is_finished() else None
        if row is None:
            params = params_of(t)
            if not search_space.keys() <= params.keys():
                continue
            row = np.array(
                [dist.to_internal_repr(params[n]) for n, dist in search_space.items()],
                dtype=float,
            )
            if t.state.is_finished():
                cache[compat.trial_id(t)] = row
        row_of[t.number] = len(rows)
        rows.append(row)
    matrix = np.array(rows, dtype=float).reshape(len(rows), len(search_space))
    return {name: matrix[:, i] for i, name in enumerate(search_space)}, row_of


def params_with_published(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's parameters plus the relative ones its worker published but has not suggested.

    Reads :data:`optuna_ctpe._attrs.RELATIVE_PARAMS` as the sampler writes it, and 0.1.0's
    headerless chunks.
    """
    try:
        text = _attrs.read_chunked(
            trial.system_attrs, _attrs.RELATIVE_PARAMS, legacy_headerless=True
        )
        published = json.loads(text) if text is not None else None
    except (_attrs.ChunkedAttrError, json.JSONDecodeError):
        # Another worker may be half-way through writing its chunks.
        return trial.params
    if not isinstance(published, dict):
        return trial.params
    return {**published, **trial.params}


def subset(observations: dict[str, np.ndarray], rows: list[int]) -> dict[str, np.ndarray]:
    """The given rows of ``observations``."""
    index = np.asarray(rows, dtype=int)
    return {name: values[index] for name, values in observations.items()}


def n_rows(observations: dict[str, np.ndarray]) -> int:
    """Number of trials represented in ``observations``."""
    return len(next(iter(observations.values()))) if observations else 0
