"""ClusterTPESampler behaviour: which trials feed l(x) and g(x), arguments, priors, records."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial
from optuna.trial import TrialState
import pytest

from optuna_ctpe import _optuna_compat as compat
from optuna_ctpe import ClusterTPESampler
from optuna_ctpe.sampler._grouping import params_with_published


optuna.logging.set_verbosity(optuna.logging.WARNING)
X = FloatDistribution(0.0, 100.0)


def make_study(values, direction="minimize", sampler=None):
    study = optuna.create_study(direction=direction, sampler=sampler or ClusterTPESampler())
    for v in values:
        x = float(np.clip(np.nan_to_num(v, posinf=100.0, neginf=0.0), 0.0, 100.0))
        study.add_trial(create_trial(params={"x": x}, distributions={"x": X}, value=v))
    return study


def grouped_numbers(study, sampler=None, current=None):
    sampler = sampler or study.sampler
    trials = study.get_trials(deepcopy=False)
    if current is not None:
        trials = [t for t in trials if t.number != current]
    g = sampler._group_trials(study, trials)
    return sorted(t.number for t in g.good), sorted(t.number for t in g.bad), g


THREE_GROUPS = [5.0, 0.0, 100.0, 0.1, 5.1, 99.0, 0.2, 5.2, 98.0, 0.3]


def test_minimize_good_is_best_cluster_and_bad_is_worst():
    study = make_study(THREE_GROUPS, sampler=ClusterTPESampler(transform="none", max_good=None))
    good, bad, g = grouped_numbers(study)
    assert good == [1, 3, 6, 9]
    assert bad == [2, 5, 8]
    assert g.split.n_clusters == 3


def test_maximize_mirrors_minimize():
    values = [-v for v in THREE_GROUPS]
    study = make_study(
        values, "maximize", sampler=ClusterTPESampler(transform="none", max_good=None)
    )
    good, bad, _ = grouped_numbers(study)
    assert good == [1, 3, 6, 9]
    assert bad == [2, 5, 8]


def test_default_cap_is_tpe_good_set_size():
    study = make_study(THREE_GROUPS)  # 10 finished trials -> at most ceil(0.05 * 10) = 1 good
    good, _, _ = grouped_numbers(study)
    assert good == [1]


def test_infeasible_trials_go_to_bad_even_with_the_best_values():
    study = make_study(THREE_GROUPS, sampler=ClusterTPESampler(transform="none", max_good=None))
    for v in (-50.0, -40.0):
        study.add_trial(
            create_trial(
                params={"x": 1.0},
                distributions={"x": X},
                value=v,
                system_attrs={"constraints:size": 3.0},
            )
        )
    good, bad, _ = grouped_numbers(study)
    assert 10 not in good and 11 not in good
    assert {10, 11} <= set(bad)
    assert good == [1, 3, 6, 9]


def test_pruned_trials_go_to_bad_and_rank_by_last_intermediate_value_in_fallback():
    sampler = ClusterTPESampler(max_good=lambda n: 2)
    study = optuna.create_study(sampler=sampler)
    # No complete trial: the split falls back to TPE's ranking of pruned trials,
    # furthest step first, then the best last intermediate value.
    for steps in [{0: 5.0}, {0: 1.0, 1: 9.0}, {0: 0.5}, {0: 2.0, 1: 3.0}]:
        study.add_trial(
            create_trial(
                params={"x": 1.0},
                distributions={"x": X},
                state=TrialState.PRUNED,
                intermediate_values=steps,
            )
        )
    good, bad, g = grouped_numbers(study)
    assert good == [1, 3]  # reached step 1; 3.0 < 9.0 would order them but both fit
    assert bad == [0, 2]
    assert g.split.fallback_reason == "no feasible complete trial"

    sampler_one = ClusterTPESampler(max_good=lambda n: 1)
    good, _, _ = grouped_numbers(study, sampler_one)
    assert good == [3]


def test_pruned_trials_are_bad_when_clusters_decide():
    study = make_study(THREE_GROUPS, sampler=ClusterTPESampler(transform="none", max_good=None))
    study.add_trial(
        create_trial(
            params={"x": 1.0},
            distributions={"x": X},
            state=TrialState.PRUNED,
            intermediate_values={0: -1.0},
        )
    )
    good, bad, _ = grouped_numbers(study)
    assert 10 in bad and 10 not in good


@pytest.mark.parametrize("constant_liar", [True, False])
def test_running_trials_are_bad_only_with_constant_liar(constant_liar):
    sampler = ClusterTPESampler(constant_liar=constant_liar, transform="none", max_good=None)
    study = make_study(THREE_GROUPS, sampler=sampler)
    running = study.ask({"x": X})
    current = study.ask({"x": X})
    good, bad, _ = grouped_numbers(study, current=current.number)
    if constant_liar:
        # The sampler only reads RUNNING trials when constant_liar is on.
        trials = sampler._group_trials(
            study,
            [t for t in study.get_trials(deepcopy=False) if t.number != current.number],
        )
        assert running.number in {t.number for t in trials.bad}
    else:
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        trials = sampler._group_trials(study, finished)
        assert running.number not in {t.number for t in trials.bad + trials.good}


def test_multi_objective_good_group_is_on_the_first_front():
    study = optuna.create_study(
        directions=["minimize", "minimize"],
        sampler=ClusterTPESampler(transform="none", max_good=None),
    )
    points = [(0, 10), (10, 0), (5, 5), (6, 6), (7, 7), (20, 20), (21, 21), (22, 22), (1, 9)]
    for p in points:
        study.add_trial(create_trial(params={"x": 1.0}, distributions={"x": X}, values=p))
    good, bad, _ = grouped_numbers(study)
    first_front = {0, 1, 2, 8}
    assert set(good) <= first_front and good
    assert set(bad).isdisjoint(first_front)


def test_inf_values_do_not_crash_and_go_to_the_right_side():
    values = [np.inf, 1.0, 2.0, 3.0, 50.0, 60.0, 70.0, -np.inf, 1.5]
    study = make_study(values, sampler=ClusterTPESampler(max_good=None, transform="none"))
    good, bad, _ = grouped_numbers(study)
    assert 7 in good and 0 in bad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_startup_trials": -1}, "n_startup_trials"),
        ({"n_ei_candidates": 0}, "n_ei_candidates"),
        ({"n_clusters": 1}, "n_clusters"),
        ({"n_clusters": "many"}, "n_clusters"),
        ({"n_clusters": True}, "n_clusters"),
        ({"transform": "sqrt"}, "transform"),
        ({"middle_weight": 1.5}, "middle_weight"),
        ({"middle_weight": "all"}, "middle_weight"),
        ({"max_good": 5}, "max_good"),
        ({"group": True, "multivariate": False}, "group"),
        ({"prior_weight": -1.0}, "prior_weight"),
        ({"seed": 1.5}, "seed"),
        ({"prior_weights": {"a": [1.0, -1.0]}}, "prior_weights"),
        ({"prior_weights": {"a": []}}, "prior_weights"),
        ({"prior_weights": [1.0, 2.0]}, "prior_weights"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClusterTPESampler(**kwargs)


def test_every_argument_is_keyword_only():
    with pytest.raises(TypeError):
        ClusterTPESampler(0)  # type: ignore[misc]


def test_prior_weights_drive_startup_and_lean_l():
    choices = [2, 4, 8]
    sampler = ClusterTPESampler(seed=0, n_startup_trials=20, prior_weights={"b": [0.0, 0.0, 1.0]})
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: float(t.suggest_categorical("b", choices)), n_trials=20)
    assert all(t.params["b"] == 8 for t in study.trials)


def test_prior_weights_of_wrong_length_are_reported_with_the_parameter():
    sampler = ClusterTPESampler(prior_weights={"b": [1.0, 1.0]})
    study = optuna.create_study(sampler=sampler)
    with pytest.raises(ValueError, match="prior_weights\\['b'\\]"):
        study.optimize(lambda t: float(t.suggest_categorical("b", [1, 2, 3])), n_trials=1)


def test_prior_shifts_model_based_choices_towards_preferred_choice():
    # Flat objective: only the prior separates the choices once the model is in use.
    def run(prior):
        sampler = ClusterTPESampler(seed=1, n_startup_trials=5, prior_weights=prior)
        study = optuna.create_study(sampler=sampler)
        study.optimize(lambda t: float(t.suggest_categorical("b", ["a", "b", "c"]) != ""), 60)
        return sum(t.params["b"] == "c" for t in study.trials[5:])

    assert run({"b": [0.05, 0.05, 0.9]}) > run(None) + 10


def test_record_decisions_writes_ctpe_user_attrs():
    sampler = ClusterTPESampler(seed=0, n_startup_trials=3, record_decisions=True)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2, n_trials=8)
    assert study.trials[0].user_attrs["ctpe:mode"] == "startup"
    last = study.trials[-1].user_attrs
    assert last["ctpe:mode"] == "relative"
    assert last["ctpe:n_good"] >= 1 and last["ctpe:n_bad"] >= 1
    assert {"ctpe:n_clusters", "ctpe:threshold", "ctpe:fallback_reason"} <= last.keys()


def test_no_records_by_default():
    study = optuna.create_study(sampler=ClusterTPESampler(seed=0, n_startup_trials=2))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=5)
    assert not any(k.startswith("ctpe:") for t in study.trials for k in t.user_attrs)


def optimize_capturing_warnings(study, objective, n_trials, caplog):
    """Run the study and return the messages of the warnings Optuna's loggers emitted."""
    optuna.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="optuna"):
            study.optimize(objective, n_trials=n_trials)
    finally:
        optuna.logging.disable_propagation()
    return [r.getMessage() for r in caplog.records]


def test_dynamic_space_warns_about_independent_sampling(caplog):
    def objective(trial):
        kind = trial.suggest_categorical("kind", ["a", "b"])
        if kind == "a":
            return trial.suggest_float("xa", 0, 1)
        return trial.suggest_float("xb", 0, 1) + 1

    study = optuna.create_study(sampler=ClusterTPESampler(seed=0, n_startup_trials=4))
    messages = optimize_capturing_warnings(study, objective, 20, caplog)
    assert any("sampled independently" in m for m in messages)


def test_group_models_conditional_space_without_warnings(caplog):
    def objective(trial):
        kind = trial.suggest_categorical("kind", ["a", "b"])
        if kind == "a":
            return trial.suggest_float("xa", 0, 1)
        return trial.suggest_int("xb", 0, 10) + 1

    study = optuna.create_study(sampler=ClusterTPESampler(seed=0, n_startup_trials=4, group=True))
    messages = optimize_capturing_warnings(study, objective, 25, caplog)
    assert not any("sampled independently" in m for m in messages)
    kinds = {t.params["kind"] for t in study.trials}
    assert kinds == {"a", "b"}
    assert all("xa" in t.params or "xb" in t.params for t in study.trials)


def test_finds_a_better_optimum_than_random_on_a_simple_problem():
    def objective(trial):
        return sum((trial.suggest_float(f"x{i}", -5, 5) - 1.0) ** 2 for i in range(3))

    def best(sampler):
        study = optuna.create_study(sampler=sampler)
        study.optimize(objective, n_trials=80)
        return study.best_value

    ctpe = np.median([best(ClusterTPESampler(seed=s)) for s in range(3)])
    rand = np.median([best(optuna.samplers.RandomSampler(seed=s)) for s in range(3)])
    assert ctpe < rand


def test_median_pruner_study_uses_pruned_trials():
    def objective(trial):
        x = trial.suggest_float("x", -3, 3)
        for step in range(5):
            trial.report((x - 1) ** 2 + 1.0 / (step + 1), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return (x - 1) ** 2

    study = optuna.create_study(
        sampler=ClusterTPESampler(seed=0, n_startup_trials=5),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
    )
    study.optimize(objective, n_trials=40)
    states = [t.state for t in study.trials]
    assert TrialState.PRUNED in states
    assert study.best_value < 0.1


def test_threads_share_one_sampler():
    study = optuna.create_study(sampler=ClusterTPESampler(seed=0, n_startup_trials=5))
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=40, n_jobs=2)
    assert len(study.trials) == 40
    assert all(t.state == TrialState.COMPLETE for t in study.trials)


def test_importing_the_sampler_does_not_import_torch():
    code = (
        "import sys, optuna, optuna_ctpe\n"
        "s = optuna.create_study(sampler=optuna_ctpe.ClusterTPESampler(seed=0))\n"
        "s.optimize(lambda t: t.suggest_float('x', 0, 1), n_trials=12)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_categorical_with_mixed_types_returns_the_choice_objects():
    dist = CategoricalDistribution([None, "a", 3, 2.5, True])
    study = optuna.create_study(sampler=ClusterTPESampler(seed=0, n_startup_trials=2))
    study.optimize(lambda t: float(str(t.suggest_categorical("c", dist.choices)) == "a"), 15)
    assert all(t.params["c"] in dist.choices for t in study.trials)


@pytest.mark.parametrize("middle_weight", [0.0, 0.5, 1.0])
def test_middle_trials_enter_g_with_middle_weight(middle_weight):
    sampler = ClusterTPESampler(transform="none", max_good=None, middle_weight=middle_weight)
    study = make_study(THREE_GROUPS, sampler=sampler)
    g = sampler._group_trials(study, study.get_trials(deepcopy=False))
    weights = {t.number: w for t, w in zip(g.bad, g.bad_weights)}
    middle = [0, 4, 7]
    if middle_weight == 0:
        assert set(weights) == {2, 5, 8}
    else:
        assert set(weights) == {0, 2, 4, 5, 7, 8}
        assert all(weights[m] == middle_weight for m in middle)
    assert all(weights[b] == 1.0 for b in (2, 5, 8))


def test_avoid_duplicates_never_repeats_a_configuration_while_new_ones_exist():
    def objective(trial):
        return float(sum(trial.suggest_categorical(f"b{i}", [0, 1]) for i in range(5)))

    def n_distinct(avoid):
        sampler = ClusterTPESampler(seed=0, n_startup_trials=3, avoid_duplicates=avoid)
        study = optuna.create_study(sampler=sampler)
        study.optimize(objective, n_trials=25)
        return len({tuple(sorted(t.params.items())) for t in study.trials})

    # 32 configurations exist; start-up trials are random and may repeat, nothing after them.
    assert n_distinct(True) >= 25 - 3
    assert n_distinct(False) < n_distinct(True)


def test_relative_params_published_by_0_1_0_are_still_read():
    # 0.1.0 wrote `ctpe:relative_params:<i>` without a header, cutting the raw JSON text at
    # 2045 characters; a study a 0.1.0 worker left RUNNING must still count as seen.
    sampler = ClusterTPESampler(seed=0, n_startup_trials=2)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: t.suggest_float("x", 0, 100), n_trials=3)
    running = study.ask()
    text = json.dumps({"x": 42.0, "note": "n" * 3000})
    for i in range(0, len(text), 2045):
        compat.storage_of(study).set_trial_system_attr(
            compat.trial_id(running), f"ctpe:relative_params:{i // 2045}", text[i : i + 2045]
        )
    trials = study.get_trials(deepcopy=False)
    observations, row_of = sampler._observations(trials, {"x": FloatDistribution(0, 100)})
    assert observations["x"][row_of[running.number]] == 42.0
    study.optimize(lambda t: t.suggest_float("x", 0, 100), n_trials=2)
    assert len(study.trials) == 6


def test_published_relative_params_fit_the_rdb_attribute_limit():
    # JSON escaping makes a quote two characters: chunks cut from the raw text at 2045
    # characters (as 0.1.0 did) could exceed the 2048 of old RDB schemas.
    sampler = ClusterTPESampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    trial = study.ask()
    params = {f'quoted "{i}" ' + '"' * 500: float(i) for i in range(20)}
    sampler._publish_relative_params(study, study.trials[trial.number], params)
    attrs = study.trials[trial.number].system_attrs
    chunks = [v for k, v in attrs.items() if k.startswith("ctpe:relative_params:")]
    assert len(chunks) > 1
    assert all(len(json.dumps(chunk)) <= 2048 for chunk in chunks)
    assert params_with_published(study.trials[trial.number]) == params
