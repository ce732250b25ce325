"""ClusterTPESampler: a Tree-structured Parzen Estimator with a k-means (dual-threshold) split."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import json
import math
import threading
from typing import Any
from typing import Literal
from typing import NamedTuple
from typing import TYPE_CHECKING

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.distributions import CategoricalDistribution
from optuna.logging import get_logger
from optuna.samplers import BaseSampler
from optuna.samplers import RandomSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from optuna_ctpe import _optuna_compat as compat
from optuna_ctpe._parzen import PriorParzenEstimator
from optuna_ctpe._split import cluster_split
from optuna_ctpe._split import quantile_split
from optuna_ctpe._split import Split
from optuna_ctpe._split import Transform
from optuna_ctpe._split import TRANSFORMS


if TYPE_CHECKING:
    from optuna.study import Study


_logger = get_logger(__name__)

ATTR_PREFIX = "ctpe:"
_RELATIVE_PARAMS_KEY = "ctpe:relative_params"
# RDBStorage limits system attribute values to 2045 characters.
_SYSTEM_ATTR_MAX_LENGTH = 2045
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Extra batches of candidates drawn when every candidate repeats an observed configuration.
_MAX_CANDIDATE_ROUNDS = 8


def default_max_good(n_finished: int) -> int:
    """Cap on the good group, ``min(ceil(0.05 n), 25)``: half of Optuna's TPE good-set share.

    Measured in ``benchmarks/results/ablation.md``: a smaller good group concentrates l(x) on
    the best results and needs fewer trials on per-layer quantization problems.
    """
    return min(math.ceil(0.05 * n_finished), 25)


class _GroupedTrials(NamedTuple):
    good: list[FrozenTrial]
    bad: list[FrozenTrial]
    bad_weights: np.ndarray  # relative weight of each bad trial in g(x)
    split: Split
    n_finished: int


class _RowCache:
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
        key = tuple((name, repr(dist)) for name, dist in search_space.items())
        with self._lock:
            if key not in self._spaces:
                if len(self._spaces) >= self._MAX_SPACES:
                    self._spaces.pop(next(iter(self._spaces)))
                self._spaces[key] = {}
            return self._spaces[key]


class ClusterTPESampler(BaseSampler):
    """TPE whose good and bad groups come from k-means clustering of the observed results.

    Optuna's :class:`~optuna.samplers.TPESampler` fits a density l(x) to the best
    ``min(ceil(0.1 n), 25)`` trials and g(x) to all others, then proposes the candidate that
    maximises l(x)/g(x). ``ClusterTPESampler`` replaces that fixed quantile by a *dual
    threshold* found by 1-D k-means on the (transformed) objective values: l(x) is fitted to the
    best cluster (capped in size), g(x) to the worst cluster plus the best cluster's members
    beyond the cap (near misses), and the clusters in between are left out. Everything else
    behaves as Optuna's TPE: start-up random trials, multivariate and group-decomposed kernels,
    constant liar for parallel workers, pruned trials ranked by their last intermediate value,
    constraints from :meth:`optuna.trial.Trial.set_constraint` and multi-objective studies.

    The method follows arXiv:2308.06422 (Azizi et al., DATE 2024), of which only the abstract is
    public. **Our interpretation, not the paper's:** what is clustered (the transformed objective
    or, for several objectives, non-domination rank plus a tie-break), the number of clusters,
    the cap on the good cluster, which clusters enter g(x) and with what weight, the smaller
    default prior weight, the quantile fallback,
    the handling of pruned, infeasible and running trials, and the categorical priors. The
    defaults come from the measurements in ``benchmarks/results/``.

    Example:

        .. code-block:: python

            import optuna
            from optuna_ctpe import ClusterTPESampler


            def objective(trial):
                bits = [trial.suggest_categorical(f"bits_{i}", [2, 4, 8]) for i in range(6)]
                x = trial.suggest_float("x", -5.0, 5.0)
                return sum(4.0 ** -b for b in bits) + 0.01 * sum(bits) + x**2


            study = optuna.create_study(sampler=ClusterTPESampler(seed=0))
            study.optimize(objective, n_trials=30)
            print(study.best_params)

    Args:
        seed: Seed of the random number generator. Clustering itself is deterministic.
        n_startup_trials: Number of finished (COMPLETE or PRUNED) trials sampled at random, or
            from ``prior_weights``, before the model is used.
        n_ei_candidates: Number of candidates drawn from l(x) and ranked by l(x)/g(x).
        n_clusters: Number of k-means clusters (an integer >= 2), or ``"auto"`` to choose 2 to 5
            clusters by the silhouette score at every trial.
        transform: Transform of the values before clustering: ``"none"`` (the values
            themselves, measured best overall), ``"log"`` (compress the tail of bad results
            relative to the gap between the best value and the good-set threshold) or
            ``"rank"`` (normalised ranks).
        near_miss_weight: Weight in g(x), relative to the worst cluster, of the *near misses*:
            members of the best cluster beyond ``max_good``. They are the results closest to
            l(x) that did not make it, so they keep the search from re-proposing the
            neighbourhood of its incumbent. In ``[0, 1]``.
        middle_weight: Weight in g(x) of the clusters between the best and the worst. ``0``
            leaves them out (the dual threshold), ``1`` together with ``near_miss_weight=1``
            fits g(x) to every trial outside the good group as plain TPE does. Pruned,
            infeasible and (with ``constant_liar``) running trials always go to g(x) with full
            weight. In ``[0, 1]``.
        max_good: Function from the number of finished trials to the largest good group, or
            ``None`` for no cap. Defaults to Optuna's TPE good-set size ``min(ceil(0.1 n), 25)``.
        multivariate: Model parameters jointly (multivariate TPE). Parameters outside the
            relative search space are sampled one at a time, with a warning.
        group: Decompose a conditional search space into groups that are always sampled
            together and model each group jointly. Requires ``multivariate=True``.
        constant_liar: Put other workers' RUNNING trials into g(x) so that parallel workers do
            not propose the same configuration. Relative parameters are published as trial
            system attributes so workers on shared storage see each other's proposals.
        prior_weights: Optional mapping from a categorical parameter's name to non-negative
            weights over its choices (in the order of its ``choices``). Start-up trials draw that
            parameter from these weights and they replace the uniform prior of l(x), so the
            search leans on them until observations take over (see
            :meth:`optuna_ctpe.HessianSearchSpace.prior_weights`).
        prior_weight: Weight of the prior in both densities, as in Optuna's TPE (where it is
            1). It also sets how much each categorical kernel spreads to other choices, i.e.
            how many parameters a candidate changes relative to the good trial it is drawn
            from. The default 0.05 was measured (``benchmarks/results/ablation.md``): with tens
            of categorical parameters, Optuna's 1.0 changes most of them at once and the search
            degrades towards random sampling.
        avoid_duplicates: Never propose a joint configuration of the modelled parameters that
            an observed or running trial already has, unless no new one turns up in several
            batches of candidates (parameters sampled independently are not checked).
            Re-evaluating a known configuration wastes a trial in deterministic problems, and
            with a small ``prior_weight`` most candidates copy a good trial.
        record_decisions: Record each trial's sampling decisions as trial user attributes
            prefixed with ``ctpe:`` (mode, sizes of l and g, clusters, threshold, fallback
            reason), which optuna-dashboard shows as columns.
        warn_independent_sampling: Warn when a parameter falls back to independent sampling
            although ``multivariate=True``.

    Raises:
        ValueError: If an argument is out of range or of the wrong kind.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        n_startup_trials: int = 10,
        n_ei_candidates: int = 24,
        n_clusters: int | Literal["auto"] = 3,
        transform: Transform = "none",
        near_miss_weight: float = 1.0,
        middle_weight: float = 0.0,
        max_good: Callable[[int], int] | None = default_max_good,
        multivariate: bool = True,
        group: bool = False,
        constant_liar: bool = True,
        prior_weights: Mapping[str, Sequence[float]] | None = None,
        prior_weight: float = 0.05,
        avoid_duplicates: bool = True,
        record_decisions: bool = False,
        warn_independent_sampling: bool = True,
    ) -> None:
        _check_int("n_startup_trials", n_startup_trials, minimum=0)
        _check_int("n_ei_candidates", n_ei_candidates, minimum=1)
        if n_clusters != "auto":
            _check_int("n_clusters", n_clusters, minimum=2, extra='or "auto"')
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}.")
        for name, weight in (
            ("near_miss_weight", near_miss_weight),
            ("middle_weight", middle_weight),
        ):
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not 0 <= weight <= 1
            ):
                raise ValueError(f"{name} must be a number in [0, 1], got {weight!r}.")
        if max_good is not None and not callable(max_good):
            raise ValueError(
                f"max_good must be a callable n_finished -> int or None, got {max_good!r}."
            )
        if group and not multivariate:
            raise ValueError("group=True requires multivariate=True.")
        if not (isinstance(prior_weight, (int, float)) and 0 <= prior_weight < math.inf):
            raise ValueError(f"prior_weight must be a finite number >= 0, got {prior_weight!r}.")
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}.")

        self._n_startup_trials = n_startup_trials
        self._n_ei_candidates = n_ei_candidates
        self._n_clusters = n_clusters
        self._transform = transform
        self._near_miss_weight = float(near_miss_weight)
        self._middle_weight = float(middle_weight)
        self._avoid_duplicates = avoid_duplicates
        self._max_good = max_good
        self._multivariate = multivariate
        self._group = group
        self._constant_liar = constant_liar
        self._prior_probs = _normalise_priors(prior_weights)
        self._record_decisions = record_decisions
        self._warn_independent_sampling = warn_independent_sampling
        self._parzen_parameters = compat.ParzenEstimatorParameters(
            prior_weight=float(prior_weight),
            consider_magic_clip=True,
            consider_endpoints=False,
            weights=compat.default_weights,
            multivariate=True,
        )

        self._rng = compat.LazyRandomState(seed)
        self._random_sampler = RandomSampler(seed=seed)
        # numpy's RandomState is not safe to share between threads drawing batches (n_jobs>1).
        self._rng_lock = threading.Lock()
        self._intersection = IntersectionSearchSpace(include_pruned=True)
        self._group_decomposition = compat.GroupDecomposedSearchSpace(include_pruned=True)
        # infer_relative_search_space and sample_relative run back to back in one thread.
        self._thread_state = threading.local()
        self._row_cache = _RowCache()

    def __repr__(self) -> str:
        return (
            f"ClusterTPESampler(n_startup_trials={self._n_startup_trials}, "
            f"n_ei_candidates={self._n_ei_candidates}, n_clusters={self._n_clusters!r}, "
            f"transform={self._transform!r}, near_miss_weight={self._near_miss_weight}, "
            f"middle_weight={self._middle_weight}, "
            f"multivariate={self._multivariate}, group={self._group}, "
            f"constant_liar={self._constant_liar})"
        )

    def reseed_rng(self) -> None:
        with self._rng_lock:
            self._rng.rng.seed()
        self._random_sampler.reseed_rng()

    # -- BaseSampler interface -------------------------------------------------------------

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        if not self._multivariate:
            return {}
        if self._group:
            groups = self._group_decomposition.calculate(study, use_cache=True)
            self._thread_state.groups = groups
            spaces = groups.search_spaces
        else:
            spaces = [self._intersection.calculate(study, use_cache=True)]
        return {
            name: dist
            for space in spaces
            for name, dist in sorted(space.items())
            if not dist.single()
        }

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space or self._in_startup(study):
            return {}
        spaces = [search_space]
        if self._group:
            groups = getattr(self._thread_state, "groups", None)
            spaces = list(groups.search_spaces) if groups is not None else []
            # Parameters the stored decomposition does not cover (it may predate this call)
            # are modelled together as one more group.
            covered = {name for space in spaces for name in space}
            spaces.append({k: v for k, v in search_space.items() if k not in covered})
        params: dict[str, Any] = {}
        for space in spaces:
            # With PartialFixedSampler the requested space can be smaller than the inferred one.
            sub = {k: v for k, v in sorted(space.items()) if k in search_space and not v.single()}
            if sub:
                params.update(self._sample(study, trial, sub, mode="relative"))
        if params and self._constant_liar:
            self._publish_relative_params(study, trial, params)
        return params

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        if self._in_startup(study):
            if self._record_decisions:
                compat.set_trial_user_attr(study, trial, f"{ATTR_PREFIX}mode", "startup")
            return self._sample_startup(study, trial, param_name, param_distribution)
        if self._warn_independent_sampling and self._multivariate:
            trials = compat.get_trials(study, _FINISHED, use_cache=True)
            if any(param_name in t.params for t in trials):
                _logger.warning(
                    f"The parameter `{param_name}` in trial #{trial.number} is sampled "
                    "independently by ClusterTPESampler instead of jointly with the other "
                    "parameters, because it is not in every finished trial (a dynamic search "
                    "space). Pass group=True to model conditional parameters jointly, or "
                    "warn_independent_sampling=False to silence this warning."
                )
        return self._sample(study, trial, {param_name: param_distribution}, mode="independent")[
            param_name
        ]

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._random_sampler.before_trial(study, trial)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._random_sampler.after_trial(study, trial, state, values)

    # -- sampling ----------------------------------------------------------------------------

    def _in_startup(self, study: Study) -> bool:
        if self._n_startup_trials == 0:
            return False
        trials = compat.get_trials(study, _FINISHED, use_cache=True)
        return len(trials) < self._n_startup_trials

    def _sample_startup(
        self, study: Study, trial: FrozenTrial, name: str, distribution: BaseDistribution
    ) -> Any:
        probs = self._prior_for(name, distribution)
        if probs is None:
            return self._random_sampler.sample_independent(study, trial, name, distribution)
        assert isinstance(distribution, CategoricalDistribution)
        with self._rng_lock:
            index = int(self._rng.rng.choice(len(probs), p=probs))
        return distribution.choices[index]

    def _sample(
        self,
        study: Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
        mode: str,
    ) -> dict[str, Any]:
        states = _FINISHED + ((TrialState.RUNNING,) if self._constant_liar else ())
        trials = compat.get_trials(study, states, use_cache=not self._constant_liar)
        if self._constant_liar:
            trials = [t for t in trials if t.number != trial.number]
        grouped = self._group_trials(study, trials)

        priors = {
            name: probs
            for name, dist in search_space.items()
            if (probs := self._prior_for(name, dist)) is not None
        }
        observations, row_of = self._observations(trials, search_space)
        good_obs = _subset(
            observations, [row_of[t.number] for t in grouped.good if t.number in row_of]
        )
        # As in Optuna's MOTPE, good trials of a multi-objective study weigh the same.
        good_weights = np.ones(_n_rows(good_obs)) if len(study.directions) > 1 else None
        mpe_good = PriorParzenEstimator(
            good_obs, search_space, self._parzen_parameters, priors, good_weights
        )
        bad_kept = np.array([t.number in row_of for t in grouped.bad], dtype=bool)
        bad_obs = _subset(
            observations, [row_of[t.number] for t, k in zip(grouped.bad, bad_kept) if k]
        )
        bad_weights = grouped.bad_weights[bad_kept]
        mpe_bad = compat.ParzenEstimator(
            bad_obs,
            search_space,
            self._parzen_parameters,
            # Optuna's age ramp, scaled down for the trials between the two thresholds.
            compat.default_weights(len(bad_weights)) * bad_weights if bad_weights.size else None,
        )
        # One parameter sampled on its own repeats its earlier values by design; only a joint
        # configuration can be a wasted repeat.
        check_duplicates = self._avoid_duplicates and mode == "relative"
        seen = _configurations(observations) if check_duplicates else set()
        for _ in range(_MAX_CANDIDATE_ROUNDS):
            with self._rng_lock:
                candidates = mpe_good.sample(self._rng.rng, self._n_ei_candidates)
            score = mpe_good.log_pdf(candidates) - mpe_bad.log_pdf(candidates)
            is_new = ~_is_seen(candidates, seen)
            if is_new.any() or not seen:
                break
        if seen and not is_new.any():
            # No new configuration turned up in several rounds: the space near l(x) is
            # exhausted. Repeat a finished configuration rather than one another worker is
            # evaluating right now.
            running_rows = [
                row_of[t.number]
                for t in trials
                if t.state == TrialState.RUNNING and t.number in row_of
            ]
            running = _configurations(_subset(observations, running_rows))
            is_new = ~_is_seen(candidates, running)
        if is_new.any():
            score = np.where(is_new, score, -np.inf)
        best = int(np.argmax(score))

        if self._record_decisions:
            self._record(study, trial, mode, grouped)
        return {
            name: dist.to_external_repr(candidates[name][best].item())
            for name, dist in search_space.items()
        }

    def _group_trials(self, study: Study, trials: list[FrozenTrial]) -> _GroupedTrials:
        """Assign trials to l(x) (good) and g(x) (bad, with weights); others are left out."""
        running, infeasible, complete, pruned = [], [], [], []
        for t in trials:
            if t.state == TrialState.RUNNING:
                running.append(t)
            elif _violation(t) > 0:
                infeasible.append(t)
            elif t.state == TrialState.COMPLETE:
                complete.append(t)
            else:
                pruned.append(t)
        n_finished = len(complete) + len(pruned) + len(infeasible)
        n_good_max = n_finished if self._max_good is None else int(self._max_good(n_finished))
        n_good_max = max(n_good_max, 1)

        scores = _complete_scores(study, complete) if complete else np.empty(0)
        split: Split | None = None
        if complete:
            split = cluster_split(
                scores,
                n_clusters=self._n_clusters,
                transform_method=self._transform,
                n_good_max=n_good_max,
            )
        weight_of: dict[int, float] = {}
        if split is not None and not split.fallback_reason:
            good = [complete[i] for i in split.good]
            bad = [complete[i] for i in split.bad] + pruned + infeasible + running
            for indices, weight in (
                (split.near_miss, self._near_miss_weight),
                (split.middle, self._middle_weight),
            ):
                if weight > 0:
                    bad += [complete[i] for i in indices]
                    weight_of.update((complete[i].number, weight) for i in indices)
        else:
            # TPE's order: feasible complete trials by value, then pruned trials by progress,
            # then infeasible trials by total violation.
            ranked = [complete[i] for i in np.argsort(scores, kind="stable")]
            ranked += sorted(pruned, key=lambda t: _pruned_score(study, t))
            ranked += sorted(infeasible, key=_violation)
            reason = split.fallback_reason if split is not None else "no feasible complete trial"
            split = quantile_split(np.arange(len(ranked), dtype=float), n_good_max, reason)
            good = [ranked[i] for i in split.good]
            bad = [ranked[i] for i in split.bad] + running
        bad.sort(key=lambda t: t.number)
        bad_weights = np.array([weight_of.get(t.number, 1.0) for t in bad])
        good.sort(key=lambda t: t.number)
        return _GroupedTrials(good, bad, bad_weights, split, n_finished)

    def _observations(
        self, trials: list[FrozenTrial], search_space: dict[str, BaseDistribution]
    ) -> tuple[dict[str, np.ndarray], dict[int, int]]:
        """Internal representations of the trials that set every parameter of the space.

        Returns the observations (one row per such trial) and trial number -> row. Rows of
        finished trials never change, so they are cached per search space: converting every
        parameter of every trial at every trial dominated the sampling time otherwise.
        """
        cache = self._row_cache.rows_for(search_space)
        rows: list[np.ndarray] = []
        row_of: dict[int, int] = {}
        for t in trials:
            row = cache.get(t._trial_id) if t.state.is_finished() else None
            if row is None:
                params = self._params_of(t)
                if not search_space.keys() <= params.keys():
                    continue
                row = np.array(
                    [dist.to_internal_repr(params[n]) for n, dist in search_space.items()],
                    dtype=float,
                )
                if t.state.is_finished():
                    cache[t._trial_id] = row
            row_of[t.number] = len(rows)
            rows.append(row)
        matrix = np.array(rows, dtype=float).reshape(len(rows), len(search_space))
        return {name: matrix[:, i] for i, name in enumerate(search_space)}, row_of

    def _params_of(self, trial: FrozenTrial) -> dict[str, Any]:
        """Parameters of a trial, including relative ones a RUNNING worker has only published."""
        if trial.state.is_finished() or not (self._constant_liar and self._multivariate):
            return trial.params
        chunks = []
        while (
            chunk := trial.system_attrs.get(f"{_RELATIVE_PARAMS_KEY}:{len(chunks)}")
        ) is not None:
            chunks.append(chunk)
        if not chunks:
            return trial.params
        try:
            params = json.loads("".join(chunks))
        except json.JSONDecodeError:
            # Another worker may be half-way through writing its chunks.
            return trial.params
        params.update(trial.params)
        return params

    def _publish_relative_params(
        self, study: Study, trial: FrozenTrial, params: dict[str, Any]
    ) -> None:
        text = json.dumps(params)
        for i in range(0, len(text), _SYSTEM_ATTR_MAX_LENGTH):
            compat.set_trial_system_attr(
                study,
                trial,
                f"{_RELATIVE_PARAMS_KEY}:{i // _SYSTEM_ATTR_MAX_LENGTH}",
                text[i : i + _SYSTEM_ATTR_MAX_LENGTH],
            )

    def _prior_for(self, name: str, distribution: BaseDistribution) -> np.ndarray | None:
        probs = self._prior_probs.get(name)
        if probs is None or not isinstance(distribution, CategoricalDistribution):
            return None
        if len(probs) != len(distribution.choices):
            raise ValueError(
                f"prior_weights[{name!r}] has {len(probs)} weights but the parameter has "
                f"{len(distribution.choices)} choices {distribution.choices!r}."
            )
        return probs

    def _record(
        self, study: Study, trial: FrozenTrial, mode: str, grouped: _GroupedTrials
    ) -> None:
        attrs = {
            "mode": mode,
            "n_good": len(grouped.good),
            "n_bad": len(grouped.bad),
            "n_clusters": grouped.split.n_clusters,
            "threshold": grouped.split.threshold
            if math.isfinite(grouped.split.threshold)
            else None,
            "fallback_reason": grouped.split.fallback_reason,
        }
        for key, value in attrs.items():
            compat.set_trial_user_attr(study, trial, f"{ATTR_PREFIX}{key}", value)


# -- module-level helpers (pure functions of trials) ------------------------------------------


def _check_int(name: str, value: Any, *, minimum: int, extra: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        suffix = f" {extra}" if extra else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{suffix}, got {value!r}.")


def _normalise_priors(
    prior_weights: Mapping[str, Sequence[float]] | None,
) -> dict[str, np.ndarray]:
    if prior_weights is None:
        return {}
    if not isinstance(prior_weights, Mapping):
        raise ValueError(
            f"prior_weights must be a mapping of parameter name to weights, got {prior_weights!r}."
        )
    probs = {}
    for name, weights in prior_weights.items():
        w = np.asarray(weights, dtype=float)
        if (
            w.ndim != 1
            or w.size == 0
            or not np.all(np.isfinite(w))
            or np.any(w < 0)
            or w.sum() <= 0
        ):
            raise ValueError(
                f"prior_weights[{name!r}] must be a non-empty sequence of finite non-negative "
                f"weights with a positive sum, got {weights!r}."
            )
        probs[name] = w / w.sum()
    return probs


def _configurations(observations: dict[str, np.ndarray]) -> set[bytes]:
    """The observed configurations, as hashable rows of internal representations."""
    if _n_rows(observations) == 0:
        return set()
    rows = np.ascontiguousarray(np.column_stack(list(observations.values())))
    return {row.tobytes() for row in rows}


def _is_seen(candidates: dict[str, np.ndarray], seen: set[bytes]) -> np.ndarray:
    rows = np.ascontiguousarray(np.column_stack(list(candidates.values())))
    return np.array([row.tobytes() in seen for row in rows], dtype=bool)


def _subset(observations: dict[str, np.ndarray], rows: list[int]) -> dict[str, np.ndarray]:
    index = np.asarray(rows, dtype=int)
    return {name: values[index] for name, values in observations.items()}


def _n_rows(observations: dict[str, np.ndarray]) -> int:
    return len(next(iter(observations.values()))) if observations else 0


def _violation(trial: FrozenTrial) -> float:
    """Total constraint violation (0 when feasible or when no constraint was set)."""
    return float(sum(v for v in trial.constraints.values() if v > 0))


def _pruned_score(study: Study, trial: FrozenTrial) -> tuple[float, float]:
    """Rank pruned trials as Optuna's TPE does: furthest step first, then last value."""
    if not trial.intermediate_values:
        return 1.0, 0.0
    step, value = max(trial.intermediate_values.items())
    if math.isnan(value):
        return -step, math.inf
    return -step, value if study.direction == StudyDirection.MINIMIZE else -value


def _complete_scores(study: Study, trials: list[FrozenTrial]) -> np.ndarray:
    """One score per complete trial, lower is better.

    Single objective: the value, negated when maximising (NaN counts as worst). Several
    objectives (our interpretation of "cluster on the fronts"): the non-domination rank plus a
    tie-break in [0, 1) given by the mean normalised rank of the trial's objective values, so
    trials on one front are ordered by how good they are on average.
    """
    signs = np.array([-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in study.directions])
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
