"""Known constraints for any Optuna sampler: a wrapper that checks and repairs its proposals.

:class:`~optuna_ctpe.sampler.ClusterTPESampler` filters its own candidates by a known
constraint (:mod:`optuna_ctpe.sampler._known_constraints`). Optuna's samplers have no such
hook, but a sampler may wrap another: :class:`KnownConstraintSampler` adds the constraint's
declared parameters to the relative search space, so they are drawn before the trial runs;
takes the wrapped sampler's relative proposal and draws the declared parameters it left out
from the wrapped sampler's ``sample_independent``; draws those again (up to ``n_resamples``
times) while the configuration is infeasible; and then repairs it as ClusterTPESampler does.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import threading
from typing import Any
from typing import TYPE_CHECKING

from optuna.distributions import BaseDistribution
from optuna.logging import get_logger
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from optuna_ctpe import _attrs
from optuna_ctpe import _optuna_compat as compat
from optuna_ctpe._validation import check_integer
from optuna_ctpe.sampler import _known_constraints as _kc


if TYPE_CHECKING:
    from optuna.study import Study


__all__ = ["KnownConstraintSampler"]

_logger = get_logger(__name__)


class KnownConstraintSampler(BaseSampler):
    """Any Optuna sampler, proposing only configurations that satisfy a known constraint.

    The constraint must declare the parameters it reads (``distributions``, see
    :class:`~optuna_ctpe.sampler.KnownConstraint`;
    :meth:`optuna_ctpe.HessianSearchSpace.size_constraint` does). Each trial, the wrapped sampler
    proposes the declared parameters (jointly where its ``sample_relative`` covers them, one at a
    time through its
    ``sample_independent`` otherwise); while the configuration violates the constraint, the
    parameters drawn one at a time are drawn again, up to ``n_resamples`` times; then the
    configuration is repaired (the constraint's own ``repair``, else the generic rule of
    :func:`optuna_ctpe.sampler._known_constraints.generic_repair`). The trial records
    ``ctpe:repaired`` and, after it, the constraint's values as its constraints
    ``ctpe:known:<name>``. Other parameters are left to the wrapped sampler as they are.

    A sampler whose ``sample_relative`` already covers the declared parameters (CMA-ES, GP)
    gets its proposal repaired, never redrawn; the repaired configuration is what it then
    observes.

    Example:

        .. code-block:: python

            import optuna
            from optuna_ctpe.sampler import KnownConstraintSampler

            sampler = KnownConstraintSampler(
                optuna.samplers.TPESampler(seed=0), space.size_constraint(1 / 16), seed=0
            )
            study = optuna.create_study(sampler=sampler)

    Args:
        sampler: The sampler that proposes.
        known_constraints: The constraint, with ``distributions`` declared.
        seed: Seed of the generic repair rule's parameter order.
        n_resamples: How many times the parameters drawn one at a time are drawn again before
            the configuration is repaired, >= 0.

    Raises:
        ValueError: If ``known_constraints`` declares no ``distributions`` or an argument is
            malformed.
    """

    def __init__(
        self,
        sampler: BaseSampler,
        known_constraints: Callable[[dict[str, Any]], Sequence[float]],
        *,
        seed: int | None = None,
        n_resamples: int = 8,
    ) -> None:
        if not isinstance(sampler, BaseSampler):
            raise ValueError(f"sampler must be an Optuna sampler, got {sampler!r}.")
        self._known = _kc.as_known(known_constraints)
        if self._known.scope is None:
            raise ValueError(
                "known_constraints must declare the parameters it reads (distributions) for "
                "KnownConstraintSampler; ClusterTPESampler also takes a plain callable."
            )
        self._n_resamples = check_integer(n_resamples, "n_resamples", minimum=0)
        if seed is not None:
            check_integer(seed, "seed", extra="or None")
        self._sampler = sampler
        self._rng = compat.LazyRandomState(seed)
        self._rng_lock = threading.Lock()
        self._thread_state = threading.local()

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()
        with self._rng_lock:
            self._rng.rng.seed()

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        inner = self._sampler.infer_relative_search_space(study, trial)
        self._thread_state.inner = inner
        return _kc.with_scope(inner, self._known)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        inner_space = getattr(self._thread_state, "inner", {})
        inner = {k: v for k, v in search_space.items() if k in inner_space}
        params = dict(self._sampler.sample_relative(study, trial, inner)) if inner else {}
        given = {k: v for k, v in compat.fixed_params(trial).items() if k in search_space}
        params.update(given)
        drawn = [n for n in search_space if n not in params]
        scope = _kc.scope_names(self._known, search_space)
        if not scope <= search_space.keys() | given.keys():
            return params  # a declared parameter is not searched: nothing to check
        for _ in range(self._n_resamples + 1):
            for name in drawn:
                params[name] = self._sampler.sample_independent(
                    study, trial, name, search_space[name]
                )
            if not drawn or _kc.violation(self._known, params) == 0:
                break
        repaired = _kc.violation(self._known, params) > 0
        if repaired:
            with self._rng_lock:
                params = _kc.repair(self._known, params, search_space, given.keys(), self._rng.rng)
            if _kc.violation(self._known, params) > 0:
                _logger.warning(
                    f"Trial {trial.number}: no repair of the proposal satisfies the known "
                    "constraints; the trial runs infeasible."
                )
        compat.set_trial_user_attr(study, trial, _attrs.REPAIRED, repaired)
        return params

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._sampler.before_trial(study, trial)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        _kc.record(study, trial, self._known)
        self._sampler.after_trial(study, trial, state, values)
