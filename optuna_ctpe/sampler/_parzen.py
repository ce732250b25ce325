"""The Parzen estimators l(x) and g(x): mixtures of one kernel per observation plus a prior kernel.

TPE (Bergstra et al. 2011, "Algorithms for Hyper-Parameter Optimization", Sec. 4) models the good
and the bad trials by Parzen estimators; Watanabe 2023 ("Tree-Structured Parzen Estimator:
Understanding Its Algorithm Components and Their Roles for Better Empirical Performance",
arXiv:2304.11127, Sec. 3) describes the components Optuna implements. This module is our own
implementation of the estimator Optuna 5.0 computes (``optuna/samplers/_tpe/parzen_estimator.py``
and ``probability_distributions.py``), with the options ClusterTPE fixes taken out and one added:

* **Mixture weights.** Observation ``i`` has weight ``w_i`` (:func:`default_weights` unless given)
  and the prior kernel ``prior_weight``, normalised to sum to one.
* **Numerical kernels** (float and int, on a log scale when the distribution is, on bounds
  widened by half a step when it has one): truncated normals centred on the observations. The
  bandwidth of a kernel is the larger of the distances to its two neighbours among the sorted
  observations and the bounds (Bergstra et al., Sec. 4.2), except that the outermost kernels use
  the distance to their inner neighbour only (Optuna's ``consider_endpoints=False``); it is clipped
  to ``[(high - low) / min(100, n + 2), high - low]`` (the "magic clip", with ``n + 1`` kernels
  counting the prior). The prior kernel sits at the midpoint with bandwidth ``high - low``.
* **Categorical kernels**: observation ``i`` puts mass ``1`` on its choice plus
  ``prior_weight / (n + 1)`` on every choice, normalised; the prior kernel is uniform.
  Where ``prior_probs`` gives a parameter's choice probabilities ``p``, the spread mass and the
  prior kernel follow ``p`` instead (``n_choices * p_c * prior_weight / (n + 1)`` on choice
  ``c``), so the search leans on ``p`` while few trials are observed and the observations take
  over as they accumulate. Without priors this is exactly Optuna's kernel.

The kernels are shared by every parameter (one mixture over joint configurations, multivariate
TPE). :func:`fit_parzen_estimator` builds the estimator; sampling draws the same random numbers in
the same order as Optuna 5.0's estimator, so a seeded study proposes what it proposed when
ClusterTPE used Optuna's class (``tests/sampler/test_parzen.py`` checks both against the installed
Optuna).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import math
from typing import NamedTuple

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.distributions import CategoricalDistribution
from optuna.distributions import FloatDistribution
from optuna.distributions import IntDistribution

from optuna_ctpe.sampler import _truncnorm


# Optuna's TPE keeps the 25 newest observations at full weight (its ``default_weights``).
_N_FLAT_WEIGHTS = 25
# The magic clip's floor is the range divided by min(100, number of kernels + 1).
_MAGIC_CLIP_MAX_DIVISOR = 100.0


def default_weights(n: int) -> np.ndarray:
    """Weights of ``n`` observations in time order: the newest 25 weigh 1, older ones ramp down.

    The observation ``k`` places before the newest 25 weighs ``1/n`` at the oldest rising
    linearly towards 1, so old trials fade out as the study moves on (Optuna's
    ``default_weights``; Hyperopt's linear forgetting).

    Args:
        n: Number of observations (``>= 0``).
    """
    if n == 0:
        return np.asarray([])
    if n < _N_FLAT_WEIGHTS:
        return np.ones(n)
    ramp = np.linspace(1.0 / n, 1.0, num=n - _N_FLAT_WEIGHTS)
    return np.concatenate([ramp, np.ones(_N_FLAT_WEIGHTS)], axis=0)


class CategoricalKernels(NamedTuple):
    """Categorical kernels of one parameter.

    Attributes:
        probs: ``(n_kernels, n_choices)`` choice probabilities, one row per kernel.
    """

    probs: np.ndarray


class NumericalKernels(NamedTuple):
    """Truncated-normal kernels of one numerical parameter, on its (log) scale.

    Attributes:
        mu: ``(n_kernels,)`` centres on the (log) scale.
        sigma: ``(n_kernels,)`` bandwidths on the (log) scale.
        low: Lower truncation bound on the (log) scale, widened by half a step.
        high: Upper truncation bound on the (log) scale, widened by half a step.
        log: Whether the scale is logarithmic.
        step: The grid step of the values, or 0.0 for a continuous parameter.
        value_low: The distribution's ``low`` (the first grid point).
        value_high: The distribution's ``high``.
    """

    mu: np.ndarray
    sigma: np.ndarray
    low: float
    high: float
    log: bool
    step: float
    value_low: float
    value_high: float


Kernels = CategoricalKernels | NumericalKernels


class ParzenEstimator(NamedTuple):
    """A mixture of product kernels over the parameters of a search space.

    Values are Optuna's internal representations (choice indices for categorical parameters),
    one array per parameter name.

    Attributes:
        weights: ``(n_kernels,)`` mixture weights summing to one; the last kernel is the prior.
        kernels: Parameter name -> that parameter's kernels, in search-space order.
    """

    weights: np.ndarray
    kernels: dict[str, Kernels]

    def sample(self, rng: np.random.RandomState, size: int) -> dict[str, np.ndarray]:
        """Draw ``size`` configurations: a kernel by weight, then each parameter from it.

        Args:
            rng: The random state (draws in the order of Optuna's estimator).
            size: Number of configurations.
        """
        active = rng.choice(len(self.weights), p=self.weights, size=size)
        samples: dict[str, np.ndarray] = {}
        numerical: dict[str, NumericalKernels] = {}
        for name, kernels in self.kernels.items():
            if isinstance(kernels, CategoricalKernels):
                samples[name] = _sample_categorical(kernels.probs[active], rng)
            else:
                numerical[name] = kernels
        if numerical:
            # One batch of uniforms for all numerical parameters, as Optuna draws them.
            mus = np.asarray([k.mu[active] for k in numerical.values()])
            sigmas = np.asarray([k.sigma[active] for k in numerical.values()])
            lows = np.asarray([k.low for k in numerical.values()])[:, np.newaxis]
            highs = np.asarray([k.high for k in numerical.values()])[:, np.newaxis]
            draws = _truncnorm.rvs((lows - mus) / sigmas, (highs - mus) / sigmas, mus, sigmas, rng)
            for (name, kernels), x in zip(numerical.items(), draws):
                samples[name] = _to_value(x, kernels)
        return {name: samples[name] for name in self.kernels}

    def log_pdf(self, samples: Mapping[str, np.ndarray]) -> np.ndarray:
        """Log density of each configuration: over the (log) scale of each numerical parameter,
        as probability mass on grids and for categorical parameters.

        Args:
            samples: Parameter name -> ``(n,)`` values, for every parameter of the estimator.
        """
        n = len(next(iter(samples.values()))) if samples else 0
        log_kernel = np.zeros((n, len(self.weights)))
        continuous: list[tuple[np.ndarray, NumericalKernels]] = []
        for name, kernels in self.kernels.items():
            x = np.asarray(samples[name])
            if isinstance(kernels, CategoricalKernels):
                log_kernel += np.log(kernels.probs.T[x.astype(np.int64)])
            elif kernels.step == 0.0:
                continuous.append((np.log(x) if kernels.log else x, kernels))
            else:
                log_kernel += _log_grid_mass(x, kernels)
        if continuous:
            xs = np.asarray([x for x, _ in continuous]).T[:, np.newaxis, :]
            mus = np.asarray([k.mu for _, k in continuous]).T
            sigmas = np.asarray([k.sigma for _, k in continuous]).T
            lows = np.asarray([k.low for _, k in continuous])
            highs = np.asarray([k.high for _, k in continuous])
            log_kernel += _truncnorm.logpdf(
                xs, (lows - mus) / sigmas, (highs - mus) / sigmas, mus, sigmas
            ).sum(axis=-1)
        return _log_sum_exp(log_kernel + np.log(self.weights[np.newaxis]))


def fit_parzen_estimator(
    observations: Mapping[str, np.ndarray],
    search_space: Mapping[str, BaseDistribution],
    prior_weight: float,
    weights: np.ndarray | None = None,
    prior_probs: Mapping[str, np.ndarray] | None = None,
) -> ParzenEstimator:
    """The Parzen estimator of a set of observations.

    Args:
        observations: Parameter name -> ``(n,)`` internal representations of the observed
            trials, for every parameter of ``search_space``.
        search_space: The distributions being modelled (float, int or categorical).
        prior_weight: Weight of the prior kernel, and the spread of categorical kernels
            (``>= 0``).
        weights: ``(n,)`` non-negative weights of the observations, or ``None`` for
            :func:`default_weights` (the observations in time order).
        prior_probs: Parameter name -> probabilities over that categorical parameter's choices
            (summing to one, see :func:`normalise_priors`); parameters missing here keep the
            uniform prior.

    Raises:
        ValueError: If ``prior_weight`` is negative or ``weights`` does not have one entry per
            observation.
    """
    if not prior_weight >= 0:
        raise ValueError(f"prior_weight must be >= 0, got {prior_weight!r}.")
    n = len(next(iter(observations.values()))) if observations else 0
    if weights is None:
        weights = default_weights(n)
    elif len(weights) != n:
        raise ValueError(f"weights must have one entry per observation ({n}), got {len(weights)}.")
    mixture = np.array([1.0]) if n == 0 else np.append(weights, [prior_weight])
    mixture = mixture / mixture.sum()
    prior_probs = prior_probs or {}
    kernels: dict[str, Kernels] = {}
    for name, distribution in search_space.items():
        obs = np.asarray(observations[name], dtype=float)
        if isinstance(distribution, CategoricalDistribution):
            kernels[name] = categorical_kernels(
                obs.astype(int), len(distribution.choices), prior_weight, prior_probs.get(name)
            )
        else:
            kernels[name] = numerical_kernels(obs, distribution)
    return ParzenEstimator(mixture, kernels)


def categorical_kernels(
    observed: np.ndarray,
    n_choices: int,
    prior_weight: float,
    probs: np.ndarray | None = None,
) -> CategoricalKernels:
    """One kernel per observed choice index plus the prior kernel (see the module docstring).

    Args:
        observed: ``(n,)`` observed choice indices.
        n_choices: Number of choices.
        prior_weight: Smoothing mass, shared out over ``n + 1`` kernels.
        probs: ``(n_choices,)`` prior choice probabilities, or ``None`` for uniform.
    """
    if len(observed) == 0:
        if probs is None:
            return CategoricalKernels(np.full((1, n_choices), fill_value=1.0 / n_choices))
        return CategoricalKernels(probs[np.newaxis, :].copy())
    n_kernels = len(observed) + 1
    if probs is None:
        table = np.full((n_kernels, n_choices), fill_value=prior_weight / n_kernels)
    else:
        table = np.tile(probs * n_choices * prior_weight / n_kernels, (n_kernels, 1))
    table[np.arange(len(observed)), observed] += 1
    row_sums = table.sum(axis=1, keepdims=True)
    table /= np.where(row_sums == 0, 1, row_sums)
    return CategoricalKernels(table)


def numerical_kernels(
    observed: np.ndarray, distribution: FloatDistribution | IntDistribution
) -> NumericalKernels:
    """Truncated-normal kernels on the observed values plus the prior kernel.

    Args:
        observed: ``(n,)`` observed values.
        distribution: The parameter's distribution.
    """
    step = 0.0 if distribution.step is None else float(distribution.step)
    low, high = distribution.low - step / 2, distribution.high + step / 2
    mus = np.asarray(observed, dtype=float)
    if distribution.log:
        mus, low, high = np.log(mus), np.log(low), np.log(high)
    sigmas = _bandwidths(mus, low, high)
    # The bounds the kernels are truncated to are computed as in Optuna's distributions
    # (math.log of the widened bounds), so both estimators share every bit of them.
    trunc_low = distribution.low - step / 2
    trunc_high = distribution.high + step / 2
    if distribution.log:
        trunc_low, trunc_high = math.log(trunc_low), math.log(trunc_high)
    return NumericalKernels(
        mu=np.append(mus, [0.5 * (low + high)]),
        sigma=np.append(sigmas, [high - low]),
        low=float(trunc_low),
        high=float(trunc_high),
        log=bool(distribution.log),
        step=step,
        value_low=float(distribution.low),
        value_high=float(distribution.high),
    )


def _bandwidths(mus: np.ndarray, low: float, high: float) -> np.ndarray:
    """Each kernel's bandwidth: the larger gap to its neighbours, magic-clipped (module docs)."""
    order = np.argsort(mus)
    points = np.concatenate([[low], mus[order], [high]])
    gaps = np.diff(points)
    sorted_sigmas = np.maximum(gaps[:-1], gaps[1:])
    if len(mus) >= 2:
        # The outermost kernels ignore the gap to the bound (consider_endpoints=False).
        sorted_sigmas[0] = points[2] - points[1]
        sorted_sigmas[-1] = points[-2] - points[-3]
    sigmas = sorted_sigmas[np.argsort(order)]
    n_kernels = len(mus) + 1  # the prior kernel counts
    min_sigma = (high - low) / min(_MAGIC_CLIP_MAX_DIVISOR, 1.0 + n_kernels)
    return np.asarray(np.clip(sigmas, min_sigma, high - low))


def _sample_categorical(probs: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """One choice index per row of ``probs``, by inversion of one uniform draw each."""
    quantiles = rng.rand(len(probs))
    cumulative = np.cumsum(probs, axis=-1)
    cumulative[:, -1] = 1  # rounding must not leave the last choice out of reach
    return np.sum(cumulative < quantiles[:, np.newaxis], axis=-1).astype(float)


def _to_value(x: np.ndarray, kernels: NumericalKernels) -> np.ndarray:
    """Draws on the kernels' scale -> parameter values (exp for log, snapped to the grid)."""
    if kernels.log:
        x = np.exp(x)
    if kernels.step != 0.0:
        low, step = kernels.value_low, kernels.step
        x = np.clip(low + np.round((x - low) / step) * step, low, kernels.value_high)
    return x


def _log_grid_mass(x: np.ndarray, kernels: NumericalKernels) -> np.ndarray:
    """``(n, n_kernels)`` log mass each kernel puts on the grid cell of each value of ``x``."""
    left, right = x - kernels.step / 2, x + kernels.step / 2
    if kernels.log:
        left, right = np.log(left), np.log(right)
    mu, sigma = kernels.mu, kernels.sigma
    cell = _truncnorm.log_gauss_mass(
        (left[:, np.newaxis] - mu) / sigma, (right[:, np.newaxis] - mu) / sigma
    )
    total = _truncnorm.log_gauss_mass((kernels.low - mu) / sigma, (kernels.high - mu) / sigma)
    return cell - total


def _log_sum_exp(a: np.ndarray) -> np.ndarray:
    """``log(sum(exp(a), axis=1))`` by rows, ``-inf`` for rows of zero probability."""
    top = a.max(axis=1)
    top[np.isneginf(top)] = 0  # avoid (-inf) - (-inf)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(a - top[:, np.newaxis]).sum(axis=1)) + top


def normalise_priors(
    prior_weights: Mapping[str, Sequence[float]] | None,
) -> dict[str, np.ndarray]:
    """The sampler's ``prior_weights`` as probabilities per parameter.

    Args:
        prior_weights: Parameter name -> non-negative weights over its choices, or ``None``.

    Raises:
        ValueError: If ``prior_weights`` is not a mapping, or a parameter's weights are empty,
            negative, not finite or sum to zero (the message names the parameter).
    """
    if prior_weights is None:
        return {}
    if not isinstance(prior_weights, Mapping):
        raise ValueError(
            f"prior_weights must be a mapping of parameter name to weights, got {prior_weights!r}."
        )
    probs = {}
    for name, weights in prior_weights.items():
        w = np.asarray(weights, dtype=float)
        if (
            w.ndim != 1
            or w.size == 0
            or not np.all(np.isfinite(w))
            or np.any(w < 0)
            or w.sum() <= 0
        ):
            raise ValueError(
                f"prior_weights[{name!r}] must be a non-empty sequence of finite non-negative "
                f"weights with a positive sum, got {weights!r}."
            )
        probs[name] = w / w.sum()
    return probs
