"""Optuna's Parzen estimator with an optional informative prior over categorical choices.

Optuna's estimator smooths every categorical kernel with a uniform prior of weight
``prior_weight`` and adds one uniform prior kernel. :class:`PriorParzenEstimator` replaces that
uniform distribution by user-given probabilities per parameter (for example the preference of a
sensitivity analysis for safe bit-widths), so the good density l(x) leans towards them while few
trials are observed and the observations take over as they accumulate. Without priors it is
exactly Optuna's estimator.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.distributions import CategoricalDistribution

from optuna_ctpe._optuna_compat import BatchedCategoricalDistributions
from optuna_ctpe._optuna_compat import ParzenEstimator
from optuna_ctpe._optuna_compat import ParzenEstimatorParameters


class PriorParzenEstimator(ParzenEstimator):
    """A ``_ParzenEstimator`` whose categorical prior follows ``prior_probs`` where given.

    Args:
        observations: Internal representations per parameter, as for Optuna's estimator.
        search_space: The distributions being modelled.
        parameters: Optuna's estimator parameters.
        prior_probs: Parameter name -> probabilities over that parameter's choices (summing to
            one); parameters missing here keep the uniform prior.
        predetermined_weights: Kernel weights, as for Optuna's estimator.
    """

    def __init__(
        self,
        observations: dict[str, np.ndarray],
        search_space: dict[str, BaseDistribution],
        parameters: ParzenEstimatorParameters,
        prior_probs: Mapping[str, np.ndarray],
        predetermined_weights: np.ndarray | None = None,
    ) -> None:
        # Read by _calculate_categorical_distributions during the parent's construction.
        self._prior_probs = prior_probs
        super().__init__(observations, search_space, parameters, predetermined_weights)

    def _calculate_categorical_distributions(
        self,
        observations: np.ndarray,
        param_name: str,
        search_space: CategoricalDistribution,
        parameters: ParzenEstimatorParameters,
    ) -> BatchedCategoricalDistributions:
        probs = self._prior_probs.get(param_name)
        if probs is None:
            return super()._calculate_categorical_distributions(
                observations, param_name, search_space, parameters
            )
        if len(observations) == 0:
            return BatchedCategoricalDistributions(weights=probs[np.newaxis, :].copy())
        # Same smoothing mass as Optuna (prior_weight / n_kernels per kernel, +1 for the
        # observed choice), but spread by ``probs`` instead of uniformly.
        n_kernels = len(observations) + 1
        n_choices = len(search_space.choices)
        weights = np.tile(probs * n_choices * parameters.prior_weight / n_kernels, (n_kernels, 1))
        weights[np.arange(len(observations)), observations.astype(int)] += 1
        row_sums = weights.sum(axis=1, keepdims=True)
        weights /= np.where(row_sums == 0, 1, row_sums)
        return BatchedCategoricalDistributions(weights)


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
