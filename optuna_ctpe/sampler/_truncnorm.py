"""The truncated normal distribution in the standardised form the Parzen kernels need.

A kernel with mean ``mu`` and bandwidth ``sigma`` on ``[low, high]`` is the standard normal
truncated to ``[a, b] = [(low - mu) / sigma, (high - mu) / sigma]``. Everything is computed from
``log Phi`` (``scipy.special.log_ndtr``) and its inverse (``scipy.special.ndtri_exp``), following
the formulation of Optuna's ``samplers/_tpe/_truncnorm.py`` (itself taken from SciPy's
``truncnorm``): masses far in a tail are computed in the left tail, where ``log Phi`` keeps its
precision, and central masses as ``1 - Phi(a) - Phi(-b)`` to avoid cancellation. The results agree
with Optuna's to about 1e-13 (``tests/sampler/test_parzen.py``); Optuna evaluates ``erf`` and the
inverse with its own code, so the last bits may differ.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special


_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def log_gauss_mass(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``log(Phi(b) - Phi(a))`` elementwise, for ``a <= b`` of the same shape.

    Args:
        a: Lower bounds in standard units.
        b: Upper bounds in standard units.
    """
    a, b = np.broadcast_arrays(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
    out = np.empty(a.shape)
    left = b <= 0
    right = a > 0
    central = ~(left | right)
    # In the right tail, mirror the interval into the left one:
    # Phi(b) - Phi(a) = Phi(-a) - Phi(-b).
    out[left] = _log_diff(special.log_ndtr(b[left]), special.log_ndtr(a[left]))
    out[right] = _log_diff(special.log_ndtr(-a[right]), special.log_ndtr(-b[right]))
    out[central] = np.log1p(-special.ndtr(a[central]) - special.ndtr(-b[central]))
    return out


def _log_diff(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """``log(p - q)`` from ``log p`` and ``log q`` (``p >= q``)."""
    return log_p + np.log1p(-np.exp(log_q - log_p))


def ppf(q: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The quantile ``q`` of the standard normal truncated to ``[a, b]``.

    Solves ``Phi(x) = Phi(a) + q (Phi(b) - Phi(a))`` in log space; for ``a >= 0`` the mirrored
    problem ``Phi(-x) = Phi(-b) + (1 - q) (Phi(b) - Phi(a))``, where ``log Phi`` is accurate.

    Args:
        q: Quantiles in ``[0, 1]``.
        a: Lower bounds in standard units, broadcastable with ``q``.
        b: Upper bounds in standard units, broadcastable with ``q``.
    """
    q, a, b = np.broadcast_arrays(*np.atleast_1d(q, a, b))
    log_mass = log_gauss_mass(a, b)
    out = np.empty(q.shape)
    left = a < 0
    right = ~left
    out[left] = special.ndtri_exp(
        np.logaddexp(special.log_ndtr(a[left]), np.log(q[left]) + log_mass[left])
    )
    out[right] = -special.ndtri_exp(
        np.logaddexp(special.log_ndtr(-b[right]), np.log1p(-q[right]) + log_mass[right])
    )
    out[q == 0] = a[q == 0]
    out[q == 1] = b[q == 1]
    out[a == b] = math.nan
    return out


def rvs(
    a: np.ndarray,
    b: np.ndarray,
    loc: np.ndarray,
    scale: np.ndarray,
    rng: np.random.RandomState,
) -> np.ndarray:
    """Draws from normals ``N(loc, scale^2)`` truncated to ``[loc + a scale, loc + b scale]``.

    One uniform draw per element, by inversion, so a seeded ``rng`` gives the same draws as
    Optuna's TPE (which draws ``rng.uniform`` of the same shape).

    Args:
        a: Lower bounds in standard units.
        b: Upper bounds in standard units, of the same shape.
        loc: Means, of the same shape.
        scale: Standard deviations, of the same shape.
        rng: The random state to draw from.
    """
    quantiles = rng.uniform(low=0, high=1, size=np.broadcast(a, b, loc, scale).shape)
    return ppf(quantiles, a, b) * scale + loc


def logpdf(
    x: np.ndarray, a: np.ndarray, b: np.ndarray, loc: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    """Log density at ``x`` of ``N(loc, scale^2)`` truncated to ``[loc + a scale, loc + b scale]``.

    ``-inf`` outside the interval, ``nan`` where it is empty.

    Args:
        x: Points, broadcastable with the other arguments.
        a: Lower bounds in standard units.
        b: Upper bounds in standard units.
        loc: Means.
        scale: Standard deviations.
    """
    z = (x - loc) / scale
    # The mass per kernel once, before broadcasting over the points.
    out = -(z**2) / 2.0 - _LOG_SQRT_2PI - log_gauss_mass(a, b) - np.log(scale)
    z, a, b = np.broadcast_arrays(*np.atleast_1d(z, a, b))
    return np.select([a == b, (z < a) | (z > b)], [np.nan, -np.inf], default=out)
