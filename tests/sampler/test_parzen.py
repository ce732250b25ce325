"""Our Parzen estimator against Optuna's ``_ParzenEstimator`` on shared cases, and on its own.

The reference is Optuna's private estimator of the installed version (5.x, or 4.9 in ``.ci/run``'s
second environment), configured as ClusterTPE configured it before it owned the estimator:
magic clip on, endpoints off, prior kernel always present. Optuna 4.0 to 4.8 model differently
(the prior's centre entered the bandwidths before 4.9, log-int densities before 4.7) and Optuna
6.0 drops the options; there the comparison is skipped and only the self-contained tests run.
"""

from __future__ import annotations

import math

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.distributions import FloatDistribution
from optuna.distributions import IntDistribution
import pytest
from scipy import stats

from optuna_ctpe import ClusterTPESampler
from optuna_ctpe.sampler import _parzen
from optuna_ctpe.sampler import _sampler
from optuna_ctpe.sampler import _truncnorm


optuna.logging.set_verbosity(optuna.logging.WARNING)

_OPTUNA_VERSION = tuple(int(p) for p in optuna.__version__.split(".")[:2])


def _optuna_estimator_class():
    """Optuna's estimator and parameters, or a skip where they are not the reference."""
    if not (4, 9) <= _OPTUNA_VERSION < (6, 0):
        pytest.skip(f"Optuna {optuna.__version__}'s estimator is not the reference (4.9 to 5.x).")
    from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator
    from optuna.samplers._tpe.parzen_estimator import _ParzenEstimatorParameters

    return _ParzenEstimator, _ParzenEstimatorParameters


def _optuna_estimator(observations, search_space, prior_weight, weights=None):
    estimator_class, parameters_class = _optuna_estimator_class()
    fields = {
        "prior_weight": prior_weight,
        "consider_magic_clip": True,
        "consider_endpoints": False,
        "weights": _parzen.default_weights,
        # 5.x ignores it; 4.9 uses Scott's rule when True, the 5.x rule when False.
        "multivariate": False,
        "consider_prior": True,
        "categorical_distance_func": {},
    }
    parameters = parameters_class(
        **{k: v for k, v in fields.items() if k in parameters_class._fields}
    )
    return estimator_class(
        observations, search_space, parameters, None if weights is None else weights.copy()
    )


SPACES = {
    "float": FloatDistribution(-3.0, 5.0),
    "float_log": FloatDistribution(1e-4, 10.0, log=True),
    "float_step": FloatDistribution(0.0, 1.0, step=0.1),
    "int": IntDistribution(0, 20),
    "int_log": IntDistribution(1, 256, log=True),
    "int_step": IntDistribution(-10, 50, step=5),
    "categorical": CategoricalDistribution(["a", "b", "c", "d", "e"]),
}


def _observations(search_space, n, seed):
    """``n`` random observed internal representations per parameter."""
    rng = np.random.RandomState(seed)
    sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(sampler=sampler)
    rows = {name: [] for name in search_space}
    for _ in range(n):
        trial = study.ask(search_space)
        for name, dist in search_space.items():
            rows[name].append(dist.to_internal_repr(trial.params[name]))
        study.tell(trial, float(rng.rand()))
    return {name: np.asarray(values, dtype=float) for name, values in rows.items()}


CASES = [
    *[({name: dist}, n) for name, dist in SPACES.items() for n in (0, 1, 2, 7)],
    (SPACES, 0),
    (SPACES, 3),
    (SPACES, 40),  # beyond 25 observations the default weights ramp down
]


@pytest.mark.parametrize("prior_weight", [1.0, 0.05])
@pytest.mark.parametrize("search_space, n", CASES, ids=[f"{'+'.join(s)}-{n}" for s, n in CASES])
def test_equal_to_optunas_estimator(search_space, n, prior_weight):
    observations = _observations(search_space, n, seed=n)
    ours = _parzen.fit_parzen_estimator(observations, search_space, prior_weight)
    theirs = _optuna_estimator(observations, search_space, prior_weight)

    ours_draws = ours.sample(np.random.RandomState(1), 200)
    theirs_draws = theirs.sample(np.random.RandomState(1), 200)
    for name, dist in search_space.items():
        if isinstance(dist, CategoricalDistribution) or dist.step is not None:
            np.testing.assert_array_equal(ours_draws[name], theirs_draws[name])
        else:
            np.testing.assert_allclose(ours_draws[name], theirs_draws[name], rtol=1e-10)
    # Densities at both sets of draws and at every observation.
    for points in (ours_draws, theirs_draws, observations if n else ours_draws):
        np.testing.assert_allclose(
            ours.log_pdf(points), theirs.log_pdf(points), rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_equal_to_optunas_estimator_with_given_weights(seed):
    observations = _observations(SPACES, 12, seed=seed)
    weights = np.random.RandomState(seed).uniform(0.1, 2.0, size=12)
    ours = _parzen.fit_parzen_estimator(observations, SPACES, 0.3, weights)
    theirs = _optuna_estimator(observations, SPACES, 0.3, weights)
    draws = ours.sample(np.random.RandomState(seed), 100)
    np.testing.assert_allclose(ours.log_pdf(draws), theirs.log_pdf(draws), rtol=1e-10, atol=1e-10)
    theirs_draws = theirs.sample(np.random.RandomState(seed), 100)
    for name in SPACES:
        np.testing.assert_allclose(draws[name], theirs_draws[name], rtol=1e-10)


def test_sampler_proposes_what_it_did_with_optunas_estimator(monkeypatch):
    # The whole sampler, once with our estimator and once with Optuna's in its place: a seeded
    # study keeps its proposals, so a study started before the change resumes the same way.
    def objective(trial):
        x = trial.suggest_float("x", -5, 5)
        y = trial.suggest_float("y", 1e-3, 10, log=True)
        i = trial.suggest_int("i", 1, 64, log=True)
        c = trial.suggest_categorical("c", ["a", "b", "c"])
        return x**2 + math.log(y) ** 2 + abs(math.log2(i) - 3) + {"a": 1, "b": 0, "c": 2}[c]

    def run():
        study = optuna.create_study(sampler=ClusterTPESampler(seed=3, n_startup_trials=5))
        study.optimize(objective, n_trials=30)
        return [t.params for t in study.trials]

    ours = run()
    _optuna_estimator_class()  # skips where Optuna's estimator is not the reference

    def optuna_fit(observations, search_space, prior_weight, weights=None, prior_probs=None):
        assert not prior_probs
        return _optuna_estimator(observations, search_space, prior_weight, weights)

    monkeypatch.setattr(_sampler, "fit_parzen_estimator", optuna_fit)
    theirs = run()
    assert [{k: v for k, v in p.items() if k not in "xy"} for p in ours] == [
        {k: v for k, v in p.items() if k not in "xy"} for p in theirs
    ]
    for name in "xy":
        np.testing.assert_allclose([p[name] for p in ours], [p[name] for p in theirs], rtol=1e-9)


# -- on its own ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["float", "float_log"])
def test_continuous_density_integrates_to_one(name):
    dist = SPACES[name]
    space = {name: dist}
    estimator = _parzen.fit_parzen_estimator(_observations(space, 6, seed=2), space, 0.5)
    if dist.log:
        # The density is over log x (as Optuna's): it integrates to one in d(log x).
        grid = np.linspace(math.log(dist.low), math.log(dist.high), 200_001)
        density = np.exp(estimator.log_pdf({name: np.exp(grid)}))
    else:
        grid = np.linspace(dist.low, dist.high, 200_001)
        density = np.exp(estimator.log_pdf({name: grid}))
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", ["float_step", "int", "int_log", "int_step", "categorical"])
def test_mass_on_the_grid_sums_to_one(name):
    dist = SPACES[name]
    space = {name: dist}
    estimator = _parzen.fit_parzen_estimator(_observations(space, 5, seed=4), space, 1.0)
    if isinstance(dist, CategoricalDistribution):
        grid = np.arange(len(dist.choices), dtype=float)
    elif isinstance(dist, IntDistribution):
        grid = np.arange(dist.low, dist.high + 1, dist.step, dtype=float)
    else:
        grid = np.round(np.arange(dist.low, dist.high + dist.step / 2, dist.step), 10)
    assert np.exp(estimator.log_pdf({name: grid})).sum() == pytest.approx(1.0, rel=1e-12)


def test_draws_follow_the_density():
    dist = SPACES["int_step"]
    space = {"k": dist}
    estimator = _parzen.fit_parzen_estimator(_observations(space, 4, seed=5), space, 1.0)
    grid = np.arange(dist.low, dist.high + 1, dist.step, dtype=float)
    expected = np.exp(estimator.log_pdf({"k": grid}))
    draws = estimator.sample(np.random.RandomState(0), 40_000)["k"]
    assert set(draws) <= set(grid)
    observed = np.array([(draws == g).sum() for g in grid])
    assert stats.chisquare(observed, expected * len(draws)).pvalue > 1e-4


def test_categorical_prior_probabilities():
    probs = np.array([0.7, 0.2, 0.1])
    empty = _parzen.categorical_kernels(np.array([], dtype=int), 3, 0.5, probs)
    np.testing.assert_array_equal(empty.probs, [probs])
    kernels = _parzen.categorical_kernels(np.array([2, 0]), 3, 0.5, probs)
    # Each observed kernel: 1 on its choice plus prior_weight / 3 kernels spread by probs * 3.
    spread = probs * 3 * 0.5 / 3
    expected_first = spread + np.array([0.0, 0.0, 1.0])
    np.testing.assert_allclose(kernels.probs[0], expected_first / expected_first.sum())
    np.testing.assert_allclose(kernels.probs[2], probs)  # the prior kernel follows probs
    uniform = _parzen.categorical_kernels(np.array([2, 0]), 3, 0.5, np.full(3, 1 / 3))
    plain = _parzen.categorical_kernels(np.array([2, 0]), 3, 0.5)
    np.testing.assert_allclose(uniform.probs, plain.probs, rtol=1e-15)


def test_bandwidths_are_magic_clipped_neighbour_gaps():
    kernels = _parzen.numerical_kernels(np.array([0.0, 1.0, 4.0, 10.0]), FloatDistribution(0, 10))
    # Inner kernels: the larger gap to a neighbour; outer ones: the gap to the inner neighbour;
    # floor 10 / min(100, 4 + 2).
    floor = 10 / 6
    np.testing.assert_allclose(kernels.sigma[:4], [max(1.0, floor), 3.0, 6.0, 6.0])
    assert (kernels.mu[-1], kernels.sigma[-1]) == (5.0, 10.0)  # the prior kernel


def test_default_weights_ramp_the_oldest_observations():
    assert _parzen.default_weights(0).size == 0
    np.testing.assert_array_equal(_parzen.default_weights(10), np.ones(10))
    w = _parzen.default_weights(40)
    np.testing.assert_array_equal(w[-25:], np.ones(25))
    assert w[0] == pytest.approx(1 / 40) and np.all(np.diff(w[:15]) > 0)


def test_arguments_are_checked():
    obs = {"x": np.array([0.5, 0.2])}
    space = {"x": FloatDistribution(0, 1)}
    with pytest.raises(ValueError, match="prior_weight"):
        _parzen.fit_parzen_estimator(obs, space, -1.0)
    with pytest.raises(ValueError, match="one entry per observation"):
        _parzen.fit_parzen_estimator(obs, space, 1.0, np.ones(3))


@pytest.mark.parametrize("seed", range(3))
def test_truncnorm_matches_scipy_stats(seed):
    rng = np.random.RandomState(seed)
    a = rng.uniform(-12, 8, size=500)
    b = a + rng.exponential(2.0, size=500)
    q = rng.uniform(size=500)
    x = a + (b - a) * rng.uniform(size=500)
    np.testing.assert_allclose(_truncnorm.ppf(q, a, b), stats.truncnorm.ppf(q, a, b), rtol=1e-9)
    np.testing.assert_allclose(
        _truncnorm.logpdf(x, a, b, 0.0, 1.0), stats.truncnorm.logpdf(x, a, b), rtol=1e-9
    )
