"""ClusterTPESampler: a Tree-structured Parzen Estimator with a k-means (dual-threshold) split.

This module holds the sampler protocol (start-up, relative and independent sampling, constant
liar publishing), the candidates and duplicate avoidance. Which trials feed l(x) and g(x) is
decided in :mod:`optuna_ctpe.sampler._grouping`, the cluster split in
:mod:`optuna_ctpe.sampler._cluster_split`, and the Parzen estimator with priors in
:mod:`optuna_ctpe.sampler._parzen`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import json
import math
import threading
from typing import Any
from typing import Literal
from typing import TYPE_CHECKING

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.distributions import CategoricalDistribution
from optuna.logging import get_logger
from optuna.samplers import BaseSampler
from optuna.samplers import RandomSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from optuna_ctpe import _attrs
from optuna_ctpe import _optuna_compat as compat
from optuna_ctpe._validation import check_integer
from optuna_ctpe._validation import check_real
from optuna_ctpe.sampler import _grouping
from optuna_ctpe.sampler import _known_constraints as _kc
from optuna_ctpe.sampler._cluster_split import Transform
from optuna_ctpe.sampler._grouping import default_max_good
from optuna_ctpe.sampler._grouping import GroupedTrials
from optuna_ctpe.sampler._parzen import default_weights
from optuna_ctpe.sampler._parzen import fit_parzen_estimator
from optuna_ctpe.sampler._parzen import normalise_priors
from optuna_ctpe.sampler._parzen import ParzenEstimator


if TYPE_CHECKING:
    from optuna.study import Study


__all__ = ["ClusterTPESampler", "default_max_good"]

_logger = get_logger(__name__)

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Extra batches of candidates drawn when every candidate repeats an observed configuration.
_MAX_CANDIDATE_ROUNDS = 8


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
    constraints (:meth:`optuna.trial.Trial.set_constraint` on Optuna 5, the ``constraints``
    system attribute of a ``constraints_func`` on Optuna 4) and multi-objective studies.

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
            ``None`` for no cap. Defaults to :func:`default_max_good`, ``min(ceil(0.05 n), 25)``:
            half of the share of Optuna's TPE good set, ``min(ceil(0.1 n), 25)``.
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
        known_constraints: A constraint computable from the parameters alone,
            ``known_constraints(params) -> sequence of floats``, feasible when all values are
            <= 0 (e.g. :meth:`optuna_ctpe.HessianSearchSpace.size_constraint`), or None. The
            sampler then proposes only feasible configurations: it drops the candidates that
            violate it and, when none fits, repairs the best one (by the constraint's own
            ``repair``, else the generic rule of
            ``optuna_ctpe.sampler._known_constraints.generic_repair``), recording ``ctpe:repaired``
            on the trial, and records the values as the trial's constraints ``ctpe:known:<name>``
            after it. A constraint that declares ``distributions`` (its scope) has them modelled
            jointly from the first trial on, start-up trials included; see
            :class:`~optuna_ctpe.sampler.KnownConstraint` and
            ``docs/guide/09_known_constraints.md`` for what is guaranteed. Black-box constraints
            (``set_constraint``) keep working beside it.

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
        known_constraints: Callable[[dict[str, Any]], Sequence[float]] | None = None,
    ) -> None:
        self._n_startup_trials = check_integer(n_startup_trials, "n_startup_trials", minimum=0)
        self._n_ei_candidates = check_integer(n_ei_candidates, "n_ei_candidates", minimum=1)
        self._grouping_rule = _grouping.grouping_rule(
            n_clusters, transform, max_good, near_miss_weight, middle_weight
        )
        if group and not multivariate:
            raise ValueError("group=True requires multivariate=True.")
        prior_weight = check_real(prior_weight, "prior_weight", minimum=0.0)
        if seed is not None:
            check_integer(seed, "seed", extra="or None")

        self._avoid_duplicates = avoid_duplicates
        self._multivariate = multivariate
        self._group = group
        self._constant_liar = constant_liar
        self._prior_probs = normalise_priors(prior_weights)
        self._record_decisions = record_decisions
        self._warn_independent_sampling = warn_independent_sampling
        self._prior_weight = prior_weight
        self._known = None if known_constraints is None else _kc.as_known(known_constraints)

        self._rng = compat.LazyRandomState(seed)
        self._random_sampler = RandomSampler(seed=seed)
        # numpy's RandomState is not safe to share between threads drawing batches (n_jobs>1).
        self._rng_lock = threading.Lock()
        self._intersection = IntersectionSearchSpace(include_pruned=True)
        self._group_decomposition = compat.GroupDecomposedSearchSpace(include_pruned=True)
        # infer_relative_search_space and sample_relative run back to back in one thread.
        self._thread_state = threading.local()
        self._row_cache = _grouping.RowCache()

    def __repr__(self) -> str:
        rule = self._grouping_rule
        return (
            f"ClusterTPESampler(n_startup_trials={self._n_startup_trials}, "
            f"n_ei_candidates={self._n_ei_candidates}, n_clusters={rule.n_clusters!r}, "
            f"transform={rule.transform!r}, near_miss_weight={rule.near_miss_weight}, "
            f"middle_weight={rule.middle_weight}, "
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
        space = self._inferred_space(study)
        # A known constraint's declared parameters are drawn jointly, so they can be checked.
        return space if self._known is None else _kc.with_scope(space, self._known)

    def _inferred_space(self, study: Study) -> dict[str, BaseDistribution]:
        if not self._multivariate:
            return {}
        if self._group:
            groups = compat.calculate_search_space(self._group_decomposition, study)
            self._thread_state.groups = groups
            spaces = groups.search_spaces
        else:
            spaces = [compat.calculate_search_space(self._intersection, study)]
        return {
            name: dist
            for space in spaces
            for name, dist in sorted(space.items())
            if not dist.single()
        }

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        if self._known is not None:
            return self._sample_known(study, trial, search_space)
        if self._in_startup(study):
            return {}
        params = self._sample_spaces(study, trial, search_space)
        if params and self._constant_liar:
            self._publish_relative_params(study, trial, params)
        return params

    def _sample_spaces(
        self,
        study: Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
        check: Callable[[dict[str, Any], dict[str, BaseDistribution]], Any] | None = None,
    ) -> dict[str, Any]:
        """The model's proposal for ``search_space``: jointly (multivariate), by group, or one
        parameter at a time (a known constraint's scope without ``multivariate``; no candidate
        filter then, the caller repairs the joint proposal).

        ``check(params, space)``, if given, returns the candidate filter of a space sampled after
        ``params`` (see :meth:`_sample_known`)."""
        if not self._multivariate:
            params: dict[str, Any] = {}
            for name, dist in search_space.items():
                params.update(self._sample(study, trial, {name: dist}, mode="independent"))
            return params
        spaces = [search_space]
        if self._group:
            groups = getattr(self._thread_state, "groups", None)
            spaces = list(groups.search_spaces) if groups is not None else []
            # Parameters the stored decomposition does not cover (it may predate this call)
            # are modelled together as one more group.
            covered = {name for space in spaces for name in space}
            spaces.append({k: v for k, v in search_space.items() if k not in covered})
        params = {}
        for space in spaces:
            # With PartialFixedSampler the requested space can be smaller than the inferred one.
            sub = {k: v for k, v in sorted(space.items()) if k in search_space and not v.single()}
            if sub:
                feasible = None if check is None else check(params, sub)
                params.update(self._sample(study, trial, sub, mode="relative", feasible=feasible))
        return params

    def _sample_known(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """A proposal that satisfies the known constraint (see ``known_constraints``).

        Start-up trials draw the search space here, each parameter as :meth:`_sample_startup`
        would, so that the draw can be checked. Later trials drop the candidates that violate
        the constraint in the space sampled last among those it reads (earlier spaces' and
        enqueued parameters held), and repair the proposal when none fits.
        """
        assert self._known is not None
        given = {k: v for k, v in compat.fixed_params(trial).items() if k in search_space}
        scope = _kc.scope_names(self._known, search_space)
        if self._in_startup(study):
            if self._record_decisions:
                compat.set_trial_user_attr(study, trial, _attrs.decision_key("mode"), "startup")
            params = {
                name: self._sample_startup(study, trial, name, dist)
                for name, dist in search_space.items()
            }
        else:

            def check(
                earlier: dict[str, Any], space: dict[str, BaseDistribution]
            ) -> Callable[[dict[str, np.ndarray]], np.ndarray] | None:
                known_now = given.keys() | earlier.keys() | space.keys()
                if not scope <= known_now:
                    return None  # a later space still sets a parameter the constraint reads
                held = {**earlier, **given}
                return lambda candidates: _kc.feasible_mask(self._known, candidates, space, held)

            params = self._sample_spaces(study, trial, search_space, check)
        params.update(given)
        repaired = False
        if scope <= params.keys() and _kc.violation(self._known, params) > 0:
            with self._rng_lock:
                params = _kc.repair(self._known, params, search_space, given.keys(), self._rng.rng)
            repaired = True
            if _kc.violation(self._known, params) > 0:
                _logger.warning(
                    f"Trial {trial.number}: no repair of the proposal satisfies the known "
                    "constraints; the trial runs infeasible."
                )
        if scope <= params.keys():
            compat.set_trial_user_attr(study, trial, _attrs.REPAIRED, repaired)
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
                compat.set_trial_user_attr(study, trial, _attrs.decision_key("mode"), "startup")
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
        if self._known is not None:
            _kc.record(study, trial, self._known)
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
        feasible: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
    ) -> dict[str, Any]:
        states = _FINISHED + ((TrialState.RUNNING,) if self._constant_liar else ())
        trials = compat.get_trials(study, states, use_cache=not self._constant_liar)
        if self._constant_liar:
            trials = [t for t in trials if t.number != trial.number]
        grouped = self._group_trials(study, trials)
        observations, row_of = self._observations(trials, search_space)
        mpe_good, mpe_bad = self._estimators(study, search_space, grouped, observations, row_of)

        # One parameter sampled on its own repeats its earlier values by design; only a joint
        # configuration can be a wasted repeat.
        seen: set[bytes] = set()
        running: set[bytes] = set()
        if self._avoid_duplicates and mode == "relative":
            seen = _configurations(observations)
            running_rows = [
                row_of[t.number]
                for t in trials
                if t.state == TrialState.RUNNING and t.number in row_of
            ]
            running = _configurations(_grouping.subset(observations, running_rows))
        candidates, best = self._best_candidate(mpe_good, mpe_bad, seen, running, feasible)

        if self._record_decisions:
            self._record(study, trial, mode, grouped)
        return {
            name: dist.to_external_repr(candidates[name][best].item())
            for name, dist in search_space.items()
        }

    def _group_trials(self, study: Study, trials: list[FrozenTrial]) -> GroupedTrials:
        """Assign trials to l(x) (good) and g(x) (bad, with weights); see :mod:`._grouping`."""
        return _grouping.group_trials(trials, study.directions, self._grouping_rule)

    def _observations(
        self, trials: list[FrozenTrial], search_space: dict[str, BaseDistribution]
    ) -> tuple[dict[str, np.ndarray], dict[int, int]]:
        """Rows of the trials that set every parameter of the space, and number -> row."""
        return _grouping.observations(
            trials, search_space, self._row_cache.rows_for(search_space), self._params_of
        )

    def _estimators(
        self,
        study: Study,
        search_space: dict[str, BaseDistribution],
        grouped: GroupedTrials,
        observations: dict[str, np.ndarray],
        row_of: dict[int, int],
    ) -> tuple[ParzenEstimator, ParzenEstimator]:
        """l(x) fitted to the good trials (with the priors) and g(x) to the weighted bad ones."""
        priors = {
            name: probs
            for name, dist in search_space.items()
            if (probs := self._prior_for(name, dist)) is not None
        }
        good_obs = _grouping.subset(
            observations, [row_of[t.number] for t in grouped.good if t.number in row_of]
        )
        # As in Optuna's MOTPE, good trials of a multi-objective study weigh the same.
        n_good = _grouping.n_rows(good_obs)
        good_weights = np.ones(n_good) if len(study.directions) > 1 else None
        mpe_good = fit_parzen_estimator(
            good_obs, search_space, self._prior_weight, good_weights, priors
        )
        bad_kept = np.array([t.number in row_of for t in grouped.bad], dtype=bool)
        bad_obs = _grouping.subset(
            observations, [row_of[t.number] for t, k in zip(grouped.bad, bad_kept) if k]
        )
        bad_weights = grouped.bad_weights[bad_kept]
        mpe_bad = fit_parzen_estimator(
            bad_obs,
            search_space,
            self._prior_weight,
            # Optuna's age ramp, scaled down for the trials between the two thresholds.
            default_weights(len(bad_weights)) * bad_weights if bad_weights.size else None,
        )
        return mpe_good, mpe_bad

    def _best_candidate(
        self,
        mpe_good: ParzenEstimator,
        mpe_bad: ParzenEstimator,
        seen: set[bytes],
        running: set[bytes],
        feasible: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], int]:
        """Candidates drawn from l(x), and the index of the one to propose.

        The best by l(x)/g(x) among those that repeat no configuration in ``seen``; when several
        batches bring nothing new, the best that no running trial (in ``running``) evaluates.
        With ``feasible`` (a known constraint's filter), infeasible candidates come last: a
        feasible repeat before an infeasible new one; when none is feasible, the best one
        (which the caller repairs).
        """
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
            is_new = ~_is_seen(candidates, running)
        if feasible is not None:
            fits = feasible(candidates)
            if (fits & is_new).any():
                is_new = fits & is_new
            elif fits.any():
                is_new = fits
        if is_new.any():
            score = np.where(is_new, score, -np.inf)
        return candidates, int(np.argmax(score))

    def _params_of(self, trial: FrozenTrial) -> dict[str, Any]:
        """Parameters of a trial, including relative ones a RUNNING worker has only published."""
        if trial.state.is_finished() or not (self._constant_liar and self._multivariate):
            return trial.params
        return _grouping.params_with_published(trial)

    def _publish_relative_params(
        self, study: Study, trial: FrozenTrial, params: dict[str, Any]
    ) -> None:
        """Let other workers see this trial's relative parameters before it suggests them."""
        _attrs.write_chunked(
            lambda key, value: compat.set_trial_system_attr(study, trial, key, value),
            _attrs.RELATIVE_PARAMS,
            json.dumps(params),
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

    def _record(self, study: Study, trial: FrozenTrial, mode: str, grouped: GroupedTrials) -> None:
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
            compat.set_trial_user_attr(study, trial, _attrs.decision_key(key), value)


# -- duplicate detection ---------------------------------------------------------------


def _configurations(observations: dict[str, np.ndarray]) -> set[bytes]:
    """The observed configurations, as hashable rows of internal representations."""
    if _grouping.n_rows(observations) == 0:
        return set()
    rows = np.ascontiguousarray(np.column_stack(list(observations.values())))
    return {row.tobytes() for row in rows}


def _is_seen(candidates: dict[str, np.ndarray], seen: set[bytes]) -> np.ndarray:
    rows = np.ascontiguousarray(np.column_stack(list(candidates.values())))
    return np.array([row.tobytes() in seen for row in rows], dtype=bool)
