"""The one module that touches Optuna's private internals, and the differences between 4.x and 5.x.

Everything optuna-ctpe needs from Optuna beyond its public API is imported or wrapped here, so an
Optuna upgrade that moves an internal breaks this module alone. Each name is used by Optuna's own
built-in samplers, and their interfaces are stable from 4.0 to Optuna's main branch of August
2026 apart from the differences bridged below (``docs/optuna_versions.md``). Optuna's TPE
internals are not used: Optuna changes them in most releases and 6.0 removes the options
ClusterTPE relies on, so the Parzen estimator is our own (:mod:`optuna_ctpe.sampler._parzen`).

Checked against the released wheels of Optuna 4.0 to 4.9 and 5.0: every private name imported
below exists in all of them. What differs, and is bridged here:

* the search spaces' ``calculate(study, use_cache)`` takes ``use_cache`` from 4.6 on (see
  :func:`calculate_search_space`);
* ``Trial.set_constraint`` and ``FrozenTrial.constraints`` are new in 5.0 (see the constraints
  section below).
"""

from __future__ import annotations

import inspect
from typing import Any
from typing import TYPE_CHECKING

from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.search_space import IntersectionSearchSpace
from optuna.search_space.group_decomposed import (
    _GroupDecomposedSearchSpace as GroupDecomposedSearchSpace,
)
from optuna.study._multi_objective import _fast_non_domination_rank as fast_non_domination_rank
from optuna.trial import FrozenTrial


if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.search_space.group_decomposed import _SearchSpaceGroup
    from optuna.storages import BaseStorage
    from optuna.study import Study
    from optuna.trial import Trial
    from optuna.trial import TrialState


__all__ = [
    "GroupDecomposedSearchSpace",
    "LazyRandomState",
    "calculate_search_space",
    "constraint_sampler_kwargs",
    "fast_non_domination_rank",
    "fixed_params",
    "get_trials",
    "record_constraint",
    "set_constraint",
    "set_trial_system_attr",
    "set_trial_user_attr",
    "storage_of",
    "stored_constraints",
    "trial_constraints",
    "trial_id",
]


def get_trials(study: Study, states: tuple[TrialState, ...], use_cache: bool) -> list[FrozenTrial]:
    """``study.get_trials`` without deep copies, using Optuna's trial cache when allowed.

    The cache is a large speed-up with many trials; built-in samplers disable it whenever they
    must see RUNNING trials written by other workers (constant liar).
    """
    return study._get_trials(deepcopy=False, states=states, use_cache=use_cache)


def set_trial_system_attr(study: Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Write a system attribute on a trial the sampler only holds as a ``FrozenTrial``."""
    storage_of(study).set_trial_system_attr(trial_id(trial), key, value)


def set_trial_user_attr(study: Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Write a user attribute (shown by optuna-dashboard) on a ``FrozenTrial``."""
    storage_of(study).set_trial_user_attr(trial_id(trial), key, value)


# -- Search spaces ------------------------------------------------------------------------------

_CALCULATE_TAKES_USE_CACHE = (
    "use_cache" in inspect.signature(IntersectionSearchSpace.calculate).parameters
)


def calculate_search_space(
    search_space: IntersectionSearchSpace | GroupDecomposedSearchSpace, study: Study
) -> dict[str, BaseDistribution] | _SearchSpaceGroup:
    """``search_space.calculate(study)``, with Optuna's trial cache where it exists (4.6+).

    Args:
        search_space: An ``IntersectionSearchSpace`` or a ``_GroupDecomposedSearchSpace``.
        study: The study whose trials define the space.
    """
    if _CALCULATE_TAKES_USE_CACHE:
        return search_space.calculate(study, use_cache=True)
    return search_space.calculate(study)


# -- Trials and storage --------------------------------------------------------------------------


def trial_id(trial: Any) -> int:
    """The storage id of a ``Trial`` or ``FrozenTrial`` (unique across studies, unlike number)."""
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
    """A trial's constraint values by name (the unnamed values of the list form by position).

    On 4.x this reads the system attributes as 5.0's ``FrozenTrial.constraints`` does: the list
    under ``constraints`` and the ``constraints:<name>`` values a 5.x worker writes, so a study
    shared by 4.x and 5.x workers is judged the same by both.
    """
    if HAS_SET_CONSTRAINT:
        return trial.constraints
    values = trial.system_attrs.get(_CONSTRAINTS_KEY) or ()
    constraints = {str(i): float(v) for i, v in enumerate(values)}
    prefix = f"{_CONSTRAINTS_KEY}:"
    constraints.update(
        (key[len(prefix) :], float(value))
        for key, value in trial.system_attrs.items()
        if key.startswith(prefix)
    )
    return constraints


def record_constraint(study: Study, trial: FrozenTrial, key: str, value: float) -> None:
    """Record a constraint value on a trial a sampler holds as a ``FrozenTrial`` (in
    ``after_trial``), where 5.x's ``Trial.set_constraint`` stores it: the system attribute
    ``constraints:<key>``. 5.x reads it as ``FrozenTrial.constraints``; on 4.x
    :func:`trial_constraints` (and through it the samplers of this package, and Optuna's own
    samplers given :func:`constraint_sampler_kwargs`) reads it."""
    set_trial_system_attr(study, trial, f"{_CONSTRAINTS_KEY}:{key}", float(value))


def fixed_params(trial: FrozenTrial) -> dict[str, Any]:
    """The parameters of an enqueued trial (``Study.enqueue_trial``), which override whatever a
    sampler proposes; empty for other trials. Optuna keeps them in the system attribute
    ``fixed_params``."""
    return dict(trial.system_attrs.get("fixed_params") or {})


def stored_constraints(trial: FrozenTrial) -> tuple[float, ...]:
    """A 4.x ``constraints_func`` that returns what :func:`set_constraint` stored."""
    return tuple(trial_constraints(trial).values())


def constraint_sampler_kwargs() -> dict[str, Any]:
    """Keyword arguments that make Optuna's own samplers see :func:`set_constraint`'s values.

    Empty on 5.x, where they read ``FrozenTrial.constraints``; on 4.x they only consider
    constraints through a ``constraints_func``.
    """
    return {} if HAS_SET_CONSTRAINT else {"constraints_func": stored_constraints}
