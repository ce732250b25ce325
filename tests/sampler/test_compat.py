"""The Optuna 4.x / 5.x shims of ``_optuna_compat``, on whichever Optuna is installed."""

from __future__ import annotations

import optuna
from optuna.trial import create_trial
import pytest

from optuna_ctpe import _optuna_compat as compat
from optuna_ctpe import ClusterTPESampler


optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_set_constraint_round_trips_through_trial_constraints():
    study = optuna.create_study()
    trial = study.ask()
    compat.set_constraint(trial, "size", 2.5)
    compat.set_constraint(trial, "latency", -1.0)
    study.tell(trial, 0.0)
    values = compat.trial_constraints(study.trials[0])
    # 4.x stores unnamed values in order; 5.x keeps the names.
    assert sorted(values.values()) == [-1.0, 2.5]
    if compat.HAS_SET_CONSTRAINT:
        assert values == {"size": 2.5, "latency": -1.0}
    assert compat.stored_constraints(study.trials[0]) == tuple(values.values())


def test_trials_without_constraints_have_none():
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert compat.trial_constraints(study.trials[0]) == {}


@pytest.mark.parametrize(
    "system_attrs, expected",
    [
        ({"constraints": (1.0, -2.0)}, {"0": 1.0, "1": -2.0}),  # constraints_func (4.x, 5.x)
        ({"constraints:size": 3.0}, {"size": 3.0}),  # Trial.set_constraint (5.x)
    ],
)
def test_both_stored_forms_are_read_on_every_version(system_attrs, expected):
    trial = create_trial(value=0.0, system_attrs=system_attrs)
    assert compat.trial_constraints(trial) == expected


def test_optunas_own_samplers_keep_set_constraint_values_once():
    # On 4.x the sampler's constraints_func writes the values back after the trial; they must
    # not be doubled.
    sampler = optuna.samplers.TPESampler(seed=0, **compat.constraint_sampler_kwargs())
    study = optuna.create_study(sampler=sampler)

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        compat.set_constraint(trial, "c", x - 0.5)
        return x

    study.optimize(objective, n_trials=3)
    for t in study.trials:
        assert list(compat.trial_constraints(t).values()) == [pytest.approx(t.params["x"] - 0.5)]


def test_constraints_steer_towards_feasible_region():
    def objective(trial):
        x = trial.suggest_float("x", 0, 10)
        compat.set_constraint(trial, "x_below_3", x - 3.0)
        return -x

    study = optuna.create_study(sampler=ClusterTPESampler(seed=0, n_startup_trials=10))
    study.optimize(objective, n_trials=60)
    late = study.trials[30:]
    feasible = [t for t in late if all(v <= 0 for v in compat.trial_constraints(t).values())]
    assert len(feasible) >= 20
    assert min(t.value for t in feasible) < -2.5
