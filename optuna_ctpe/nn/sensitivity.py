"""Per-layer Hessian traces (Hutchinson) and empirical-Fisher traces of PyTorch models.

HAWQ-V2 (Dong et al., 2020) measures how sensitive a layer is to a weight perturbation ``ΔW`` by
the second-order change of the loss, averaged over directions:
``Ω = Tr̄(H) · ‖ΔW‖²`` with ``Tr̄(H) = Tr(H_W) / n`` the average eigenvalue of the layer's
weight Hessian block (:func:`choice_sensitivity`, defined torch-free in
:mod:`optuna_ctpe.space.omega`).

This module is the face of the four estimators, which share their arguments:

* :func:`hutchinson_traces` (:mod:`optuna_ctpe.nn.hutchinson`) estimates ``Tr(H_W)`` for every
  layer at once with Hutchinson's estimator over Rademacher probes;
* :func:`empirical_fisher_traces` (:mod:`optuna_ctpe.nn.fisher`) is a cheaper, always
  non-negative alternative: the trace of the empirical Fisher from per-sample gradients;
* :func:`ggn_traces` (:mod:`optuna_ctpe.nn.ggn`) estimates the trace of the generalised
  Gauss-Newton matrix, the Hessian without the model's own curvature: never negative, no
  cross-layer noise, one backward pass per probe, for a loss convex in the model's outputs;
* :func:`split_traces` (:mod:`optuna_ctpe.nn.split`) estimates the Hessian trace as the GGN's
  plus a Hutchinson estimate of the remainder, unbiased like Hutchinson's and far less noisy
  near a minimum, for the same losses.

Both evaluate the model in eval mode (batch norm uses its running statistics, dropout is off, so
the loss is a deterministic function of the weights) and leave the model exactly as they found
it: parameters, ``.grad`` fields, ``requires_grad`` flags and train/eval modes.

Requires the ``torch`` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

from optuna_ctpe.nn.fisher import empirical_fisher_traces
from optuna_ctpe.nn.ggn import ggn_traces
from optuna_ctpe.nn.hutchinson import hutchinson_traces
from optuna_ctpe.nn.hutchinson import hutchinson_traces_from_criterion
from optuna_ctpe.nn.split import split_traces
from optuna_ctpe.nn.traces import LayerTrace
from optuna_ctpe.space.omega import choice_sensitivity


__all__ = [
    "ESTIMATORS",
    "LayerTrace",
    "choice_sensitivity",
    "empirical_fisher_traces",
    "ggn_traces",
    "hutchinson_traces",
    "hutchinson_traces_from_criterion",
    "split_traces",
]

#: Estimator name (as ``HessianSearchSpace.from_model(estimator=)`` and the CLI's
#: ``--estimator`` take it) -> the function.
ESTIMATORS: Mapping[str, Callable[..., dict[str, LayerTrace]]] = {
    "hutchinson": hutchinson_traces,
    "fisher": empirical_fisher_traces,
    "ggn": ggn_traces,
    "split": split_traces,
}


def estimator(name: Any) -> Callable[..., dict[str, LayerTrace]]:
    """The estimator called ``name`` (``"hutchinson"``, ``"fisher"``, ``"ggn"`` or ``"split"``).

    Raises:
        ValueError: If ``name`` is not one of :data:`ESTIMATORS`.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {name!r}.")
    return ESTIMATORS[name]
