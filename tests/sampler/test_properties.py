"""Property tests: random search spaces and hostile objective values never break the sampler."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.distributions import CategoricalDistribution
from optuna.distributions import FloatDistribution
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from optuna_ctpe import _optuna_compat as compat
from optuna_ctpe import ClusterTPESampler
from optuna_ctpe.sampler._cluster_split import cluster_split


optuna.logging.set_verbosity(optuna.logging.ERROR)


@st.composite
def distributions(draw) -> BaseDistribution:
    kind = draw(st.sampled_from(["float", "logfloat", "stepfloat", "int", "logint", "cat"]))
    if kind == "cat":
        choices = draw(
            st.lists(
                st.one_of(st.integers(-5, 5), st.text(max_size=3), st.none(), st.booleans()),
                min_size=1,
                max_size=6,
                unique_by=lambda c: (type(c), c),
            )
        )
        return CategoricalDistribution(choices)
    if kind in ("int", "logint"):
        low = draw(st.integers(1, 20))
        high = low + draw(st.integers(0, 40))
        if kind == "logint":
            return IntDistribution(low, high, log=True)
        return IntDistribution(low, high, step=draw(st.integers(1, 3)) if high > low else 1)
    low = draw(st.floats(1e-3, 10.0))
    width = draw(st.floats(0.0, 100.0))
    if kind == "logfloat":
        return FloatDistribution(low, low + width, log=True)
    if kind == "stepfloat":
        return FloatDistribution(low, low + math.floor(width), step=1.0)
    return FloatDistribution(low - 5.0, low + width)


values = st.one_of(
    st.floats(-1e6, 1e6),
    st.just(math.inf),
    st.just(-math.inf),
    st.just(math.nan),
    st.just(0.0),
)
outcomes = st.tuples(st.sampled_from(["complete", "pruned", "fail", "infeasible"]), values)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    space=st.dictionaries(st.sampled_from("abcdef"), distributions(), min_size=1, max_size=4),
    plan=st.lists(outcomes, min_size=1, max_size=25),
    options=st.fixed_dictionaries(
        {
            "n_clusters": st.sampled_from([2, 3, 4, "auto"]),
            "transform": st.sampled_from(["log", "rank", "none"]),
            "middle_weight": st.sampled_from([0.0, 0.3, 1.0]),
            "avoid_duplicates": st.booleans(),
            "multivariate": st.booleans(),
            "constant_liar": st.booleans(),
            "n_startup_trials": st.integers(0, 3),
        }
    ),
    direction=st.sampled_from(["minimize", "maximize"]),
)
def test_suggestions_always_lie_in_their_distributions(space, plan, options, direction):
    study = optuna.create_study(direction=direction, sampler=ClusterTPESampler(seed=0, **options))
    for outcome, value in plan:
        trial = study.ask(space)
        for name, dist in space.items():
            assert dist._contains(dist.to_internal_repr(trial.params[name])), (name, dist)
        if outcome == "pruned":
            trial.report(value, step=0)
            study.tell(trial, state=TrialState.PRUNED)
        elif outcome == "fail":
            study.tell(trial, state=TrialState.FAIL)
        else:
            compat.set_constraint(trial, "c", 1.0 if outcome == "infeasible" else -1.0)
            study.tell(trial, value)  # NaN values make Optuna fail the trial itself.
    assert len(study.trials) == len(plan)


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(
        st.one_of(st.floats(-1e9, 1e9), st.just(math.inf), st.just(-math.inf)),
        min_size=1,
        max_size=60,
    ),
    n_clusters=st.sampled_from([2, 3, 5, "auto"]),
    transform=st.sampled_from(["log", "rank", "none"]),
    n_good_max=st.integers(1, 30),
)
def test_split_groups_are_disjoint_bounded_and_ordered(scores, n_clusters, transform, n_good_max):
    arr = np.asarray(scores, dtype=float)
    s = cluster_split(
        arr,
        n_clusters=n_clusters,
        transform_method=transform,
        n_good_max=n_good_max,
    )
    groups = [set(g.tolist()) for g in (s.good, s.near_miss, s.middle, s.bad)]
    good, near_miss, middle, bad = groups
    assert good
    assert len(good) <= n_good_max
    # Every observation is in exactly one group.
    assert set().union(*groups) == set(range(len(arr)))
    assert sum(len(g) for g in groups) == len(arr)
    # The groups are ordered: good <= near misses <= middle <= bad.
    non_empty = [arr[list(g)] for g in groups if g]
    for better, worse in zip(non_empty, non_empty[1:]):
        assert better.max() <= worse.min()
    if s.fallback_reason:
        assert not middle and not near_miss
