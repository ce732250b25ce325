"""The one module that touches Optuna's private internals.

Everything optuna-ctpe needs from Optuna beyond its public API is imported or wrapped here, so an
Optuna upgrade that moves an internal breaks this module alone. Each name is used by Optuna's own
built-in samplers, which is why we rely on it rather than rewriting it.
"""

from __future__ import annotations

from typing import Any
from typing import TYPE_CHECKING

from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator as ParzenEstimator
from optuna.samplers._tpe.parzen_estimator import (
    _ParzenEstimatorParameters as ParzenEstimatorParameters,
)
from optuna.samplers._tpe.probability_distributions import (
    _BatchedCategoricalDistributions as BatchedCategoricalDistributions,
)
from optuna.samplers._tpe.sampler import default_weights
from optuna.search_space.group_decomposed import (
    _GroupDecomposedSearchSpace as GroupDecomposedSearchSpace,
)
from optuna.search_space.group_decomposed import _SearchSpaceGroup as SearchSpaceGroup
from optuna.study._multi_objective import _fast_non_domination_rank as fast_non_domination_rank


from optuna.trial import FrozenTrial


if TYPE_CHECKING:
    from optuna.storages import BaseStorage
    from optuna.study import Study
    from optuna.trial import Trial
    from optuna.trial import TrialState


__all__ = [
    "BatchedCategoricalDistributions",
    "GroupDecomposedSearchSpace",
    "LazyRandomState",
    "ParzenEstimator",
    "ParzenEstimatorParameters",
    "SearchSpaceGroup",
    "default_weights",
    "fast_non_domination_rank",
    "get_trials",
    "set_trial_system_attr",
    "set_trial_user_attr",
]


def get_trials(study: Study, states: tuple[TrialState, ...], use_cache: bool) -> list[FrozenTrial]:
    """``study.get_trials`` without deep copies, using Optuna's trial cache when allowed.

    The cache is a large speed-up with many trials; built-in samplers disable it whenever they
    must see RUNNING trials written by other workers (constant liar).
    """
    return study._get_trials(deepcopy=False, states=states, use_cache=use_cache)


def set_trial_system_attr(study: Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Write a system attribute on a trial the sampler only holds as a ``FrozenTrial``."""
    study._storage.set_trial_system_attr(trial._trial_id, key, value)


def set_trial_user_attr(study: Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Write a user attribute (shown by optuna-dashboard) on a ``FrozenTrial``."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


# -- Trials and storage --------------------------------------------------------------------------


def trial_id(trial: Any) -> int:
    """The storage id of a ``Trial`` or ``FrozenTrial`` (unique across studies, unlike ``number``)."""
    return trial._trial_id


def storage_of(study: Study) -> BaseStorage:
    """The storage a study reads and writes (``Study`` has no public accessor)."""
    return study._storage


# -- Constraints: 5.x has Trial.set_constraint / FrozenTrial.constraints (a dict); 4.x keeps a
# -- sequence in the ``constraints`` system attribute, filled by a sampler's constraints_func.

_CONSTRAINTS_KEY = "constraints"
HAS_SET_CONSTRAINT = hasattr(FrozenTrial, "constraints") and isinstance(
    FrozenTrial.constraints, property
)


def set_constraint(trial: Trial, key: str, value: float) -> None:
    """Record one constraint value (feasible when <= 0) on a running trial, on 4.x and 5.x."""
    if HAS_SET_CONSTRAINT:
        trial.set_constraint(key, value)
        return
    # 4.x: one value per trial in the ``constraints`` system attribute; the sampler's
    # constraints_func (see stored_constraints) hands it back to Optuna after the trial.
    storage = storage_of(trial.study)
    stored = storage.get_trial_system_attrs(trial_id(trial)).get(_CONSTRAINTS_KEY) or ()
    storage.set_trial_system_attr(trial_id(trial), _CONSTRAINTS_KEY, (*stored, float(value)))


def trial_constraints(trial: FrozenTrial) -> dict[str, float]:
    """A trial's constraint values by name (4.x's unnamed values are named by position)."""
    if HAS_SET_CONSTRAINT:
        return trial.constraints
    values = trial.system_attrs.get(_CONSTRAINTS_KEY) or ()
    return {str(i): float(v) for i, v in enumerate(values)}


def stored_constraints(trial: FrozenTrial) -> tuple[float, ...]:
    """A 4.x ``constraints_func`` that returns what :func:`set_constraint` stored."""
    return tuple(trial_constraints(trial).values())


def constraint_sampler_kwargs() -> dict[str, Any]:
    """Keyword arguments that make Optuna's own samplers see :func:`set_constraint`'s values.

    Empty on 5.x, where they read ``FrozenTrial.constraints``; on 4.x they only consider
    constraints through a ``constraints_func``.
    """
    return {} if HAS_SET_CONSTRAINT else {"constraints_func": stored_constraints}
