"""Which trials a study recommends: what ``search`` reports and what ``export`` writes."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from optuna_ctpe import _attrs
from optuna_ctpe import _optuna_compat as compat


__all__ = ["chosen_trials", "recommended_trial"]


def chosen_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials a study recommends: its Pareto front sorted by its second objective (size, or
    latency for accuracy x latency x size), or its
    most accurate feasible trial, ties broken by size (one objective under a size budget)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: (t.values[1], -t.values[0], t.number))
    feasible = [t for t in complete if all(v <= 0 for v in compat.trial_constraints(t).values())]
    if not feasible:
        return []
    return [min(feasible, key=lambda t: (-t.values[0], t.user_attrs[_attrs.SIZE_BYTES], t.number))]


def recommended_trial(study: optuna.Study) -> FrozenTrial | None:
    """The one trial ``export`` writes by default: the most accurate of :func:`chosen_trials`
    (on a Pareto front, the largest configuration), ties going to the smaller; None if no
    trial is chosen yet."""
    chosen = chosen_trials(study)
    if not chosen:
        return None
    return max(
        chosen,
        key=lambda t: (t.user_attrs[_attrs.ACCURACY], -t.user_attrs[_attrs.SIZE_BYTES]),
    )
