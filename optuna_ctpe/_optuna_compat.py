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


if TYPE_CHECKING:
    from optuna.study import Study
    from optuna.trial import FrozenTrial
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
