"""Known constraints in the samplers: ClusterTPESampler(known_constraints=) and
KnownConstraintSampler."""

from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.distributions import IntDistribution
import pytest

from optuna_ctpe import _attrs
from optuna_ctpe import _optuna_compat as compat
from optuna_ctpe.sampler import _known_constraints
from optuna_ctpe.sampler import ClusterTPESampler
from optuna_ctpe.sampler import KnownConstraint
from optuna_ctpe.sampler import KnownConstraintSampler
from optuna_ctpe.search_space import HessianSearchSpace
from optuna_ctpe.search_space import LayerSensitivity


optuna.logging.set_verbosity(optuna.logging.WARNING)

BITS = (2, 3, 4, 6, 8)


def _space(n_layers: int = 10) -> HessianSearchSpace:
    rng = np.random.default_rng(0)
    layers = [
        LayerSensitivity(
            f"l{i}",
            float(10 ** rng.uniform(-3, 1)),
            int(rng.integers(50, 2000)),
            {b: 4.0 ** (-b) for b in BITS},
        )
        for i in range(n_layers)
    ]
    return HessianSearchSpace.from_sensitivities(layers, bits=BITS, budget=math.inf)


SPACE = _space()
# 2.6 bits per weight: the priors' start-up draws and most candidates do not fit, so the
# sampler has to repair.
TIGHT = SPACE.size_constraint(2.6 / 32)


def _objective(trial: optuna.Trial) -> float:
    return SPACE.perturbation(SPACE.suggest(trial))


def _violations(study: optuna.Study, constraint: Any) -> list[float]:
    return [
        max(constraint(t.params))
        for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"multivariate": False},
        {"group": True},
        {"constant_liar": False},
        {"n_startup_trials": 0},
    ],
)
def test_no_completed_trial_violates_over_many_seeds(kwargs: dict[str, Any]) -> None:
    repaired = 0
    for seed in range(12):
        sampler = ClusterTPESampler(
            seed=seed, prior_weights=SPACE.prior_weights(), known_constraints=TIGHT, **kwargs
        )
        study = optuna.create_study(sampler=sampler)
        study.optimize(_objective, n_trials=25)
        assert max(_violations(study, TIGHT)) <= 0, seed
        repaired += sum(t.user_attrs[_attrs.REPAIRED] for t in study.trials)
    assert repaired > 0  # the budget is tight enough that the repair was exercised


def test_without_the_constraint_the_same_budget_is_violated() -> None:
    """The control of the test above: the budget does bite."""
    study = optuna.create_study(
        sampler=ClusterTPESampler(seed=0, prior_weights=SPACE.prior_weights())
    )
    study.optimize(_objective, n_trials=25)
    assert max(_violations(study, TIGHT)) > 0


def test_multi_objective_and_threads() -> None:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        config = SPACE.suggest(trial)
        return SPACE.perturbation(config), float(SPACE.size(config))

    for seed in range(3):
        study = optuna.create_study(
            directions=["minimize", "minimize"],
            sampler=ClusterTPESampler(seed=seed, known_constraints=TIGHT),
        )
        study.optimize(objective, n_trials=24, n_jobs=2)
        assert max(_violations(study, TIGHT)) <= 0


def test_values_are_recorded_as_constraints_beside_the_users_own() -> None:
    def objective(trial: optuna.Trial) -> float:
        value = _objective(trial)
        compat.set_constraint(trial, "user", -1.0)
        return value

    study = optuna.create_study(sampler=ClusterTPESampler(seed=0, known_constraints=TIGHT))
    study.optimize(objective, n_trials=12)
    key = _attrs.known_constraint_key("size")
    for t in study.trials:
        constraints = compat.trial_constraints(t)
        # 4.x keeps set_constraint's values as an unnamed list: the first is "0".
        assert constraints["user" if compat.HAS_SET_CONSTRAINT else "0"] == -1.0
        assert constraints[key] == pytest.approx(TIGHT(t.params)[0])
        assert isinstance(t.user_attrs[_attrs.REPAIRED], bool)


def test_enqueued_parameters_are_held() -> None:
    name = "bits:l0"
    study = optuna.create_study(sampler=ClusterTPESampler(seed=0, known_constraints=TIGHT))
    for _ in range(15):
        study.enqueue_trial({name: 4})
    study.optimize(_objective, n_trials=15)
    assert all(t.params[name] == 4 for t in study.trials)
    assert max(_violations(study, TIGHT)) <= 0


def test_same_seed_same_proposals() -> None:
    def run() -> list[dict[str, Any]]:
        study = optuna.create_study(
            sampler=ClusterTPESampler(
                seed=3, prior_weights=SPACE.prior_weights(), known_constraints=TIGHT
            )
        )
        study.optimize(_objective, n_trials=20)
        return [t.params for t in study.trials]

    assert run() == run()


@pytest.mark.parametrize("kwargs", [{}, {"multivariate": False}, {"group": True}])
def test_no_known_constraint_leaves_the_sampler_as_it_was(
    kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without known constraints no new code path runs, and the proposals are the same."""

    def run(**extra: Any) -> list[dict[str, Any]]:
        study = optuna.create_study(sampler=ClusterTPESampler(seed=1, **kwargs, **extra))
        study.optimize(_objective, n_trials=20)
        return [t.params for t in study.trials]

    default = run()

    def forbidden(*args: Any, **kw: Any) -> None:
        raise AssertionError("a known-constraint path ran without known constraints")

    for name in ("with_scope", "feasible_mask", "violation", "repair", "record"):
        monkeypatch.setattr(_known_constraints, name, forbidden)
    assert run(known_constraints=None) == default


# -- plain callables and the generic repair --------------------------------------------------

SCOPE = {
    "x0": IntDistribution(0, 10),
    "x1": IntDistribution(0, 10),
    "y": FloatDistribution(0.1, 10.0, log=True),
}


def _sum_budget(params: dict[str, Any]) -> list[float]:
    return [params["x0"] + params["x1"] + params["y"] - 6.0]


def _sum_objective(trial: optuna.Trial) -> float:
    x0 = trial.suggest_int("x0", 0, 10)
    x1 = trial.suggest_int("x1", 0, 10)
    y = trial.suggest_float("y", 0.1, 10.0, log=True)
    return -(x0**2 + x1**2 + y)


@pytest.mark.parametrize("kwargs", [{}, {"multivariate": False}])
def test_generic_repair_with_declared_scope(kwargs: dict[str, Any]) -> None:
    known = KnownConstraint(_sum_budget, SCOPE, names=["sum"])
    for seed in range(5):
        study = optuna.create_study(
            sampler=ClusterTPESampler(seed=seed, known_constraints=known, **kwargs)
        )
        study.optimize(_sum_objective, n_trials=25)
        assert all(_sum_budget(t.params)[0] <= 0 for t in study.trials)
        assert any(t.user_attrs[_attrs.REPAIRED] for t in study.trials)


def test_plain_callable_checks_from_the_second_trial() -> None:
    """Without declared parameters, the scope is the relative search space: known once a trial
    has finished."""
    for seed in range(5):
        study = optuna.create_study(
            sampler=ClusterTPESampler(seed=seed, known_constraints=_sum_budget)
        )
        study.optimize(_sum_objective, n_trials=20)
        assert all(_sum_budget(t.params)[0] <= 0 for t in study.trials[1:])
        assert _attrs.REPAIRED not in study.trials[0].user_attrs


def test_own_repair_is_used_and_fixed_names_are_passed() -> None:
    calls: list[frozenset[str]] = []

    def repair(params: dict[str, Any], fixed: Any) -> dict[str, Any]:
        calls.append(frozenset(fixed))
        return {**params, "x0": 0, "x1": 0, "y": 0.1}

    known = KnownConstraint(_sum_budget, SCOPE, repair=repair)
    study = optuna.create_study(sampler=ClusterTPESampler(seed=0, known_constraints=known))
    study.enqueue_trial({"x0": 5})
    study.optimize(_sum_objective, n_trials=10)
    assert calls and calls[0] == frozenset({"x0"})
    assert study.trials[0].params["x0"] == 5
    assert all(_sum_budget(t.params)[0] <= 0 for t in study.trials)


@pytest.mark.parametrize(
    ("constraint", "match"),
    [
        (3, "callable"),
        (KnownConstraint(_sum_budget, {"x0": 1}), "distributions"),
        (KnownConstraint(_sum_budget, SCOPE, names="sum"), "names"),
    ],
)
def test_argument_validation(constraint: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ClusterTPESampler(known_constraints=constraint)


def test_bad_values_are_a_clear_error() -> None:
    known = KnownConstraint(lambda p: [math.nan], SCOPE)
    study = optuna.create_study(sampler=ClusterTPESampler(known_constraints=known))
    with pytest.raises(ValueError, match="NaN"):
        study.optimize(_sum_objective, n_trials=1)


def test_a_constraint_sent_to_another_process_works() -> None:
    """Workers of a distributed study rebuild their sampler from a pickled (or re-made)
    constraint."""
    again = pickle.loads(pickle.dumps(TIGHT))
    study = optuna.create_study(sampler=ClusterTPESampler(seed=0, known_constraints=again))
    study.optimize(_objective, n_trials=12)
    assert max(_violations(study, TIGHT)) <= 0


# -- any sampler ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: optuna.samplers.TPESampler(seed=seed),
        lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True),
        lambda seed: optuna.samplers.RandomSampler(seed=seed),
    ],
)
def test_wrapper_keeps_any_sampler_feasible(make: Any) -> None:
    for seed in range(4):
        study = optuna.create_study(sampler=KnownConstraintSampler(make(seed), TIGHT, seed=seed))
        study.optimize(_objective, n_trials=20)
        assert max(_violations(study, TIGHT)) <= 0
        key = _attrs.known_constraint_key("size")
        assert all(key in compat.trial_constraints(t) for t in study.trials)


def test_wrapper_needs_declared_parameters() -> None:
    with pytest.raises(ValueError, match="declare"):
        KnownConstraintSampler(optuna.samplers.TPESampler(), _sum_budget)
    with pytest.raises(ValueError, match="n_resamples"):
        KnownConstraintSampler(optuna.samplers.TPESampler(), TIGHT, n_resamples=-1)


def test_declared_parameter_of_one_value_is_passed_to_the_constraint() -> None:
    scope = {**SCOPE, "c": IntDistribution(2, 2)}

    def budget(params: dict[str, Any]) -> list[float]:
        return [params["x0"] + params["x1"] + params["y"] + params["c"] - 6.0]

    def objective(trial: optuna.Trial) -> float:
        return _sum_objective(trial) - trial.suggest_int("c", 2, 2)

    study = optuna.create_study(
        sampler=ClusterTPESampler(seed=0, known_constraints=KnownConstraint(budget, scope))
    )
    study.optimize(objective, n_trials=15)
    assert all(budget(t.params)[0] <= 0 for t in study.trials)
