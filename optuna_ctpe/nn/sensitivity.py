"""The face of the four per-layer trace estimators of PyTorch models, and choosing one.

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

``"auto"`` (:func:`resolve_estimator`, the default of ``from_model`` and the CLI) takes the GGN
where the loss fits it and Hutchinson's otherwise. Our choice, from
``benchmarks/results/sensitivity_quality*.md``: in the piecewise-linear CNNs the GGN's
diagonal blocks are the Hessian's and it ranks resnet18's layers at Spearman 0.999 from 5
probes, where Hutchinson needs about 100 for 0.94; at a least-squares loss whose residual is
zero (the MiniLM task) the GGN is the Hessian; elsewhere near a minimum it is the positive
part of the Hessian that HAWQ's second-order model needs, without negative traces.

All four evaluate the model in eval mode (batch norm uses its running statistics, dropout is
off, so the loss is a deterministic function of the weights) and leave the model exactly as they
found it: parameters, ``.grad`` fields, ``requires_grad`` flags and train/eval modes.

Requires the ``torch`` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
import logging
from typing import Any

from optuna_ctpe.nn import ESTIMATOR_NAMES
from optuna_ctpe.nn.fisher import empirical_fisher_traces
from optuna_ctpe.nn.ggn import ggn_misfit
from optuna_ctpe.nn.ggn import ggn_traces
from optuna_ctpe.nn.hutchinson import hutchinson_traces
from optuna_ctpe.nn.hutchinson import hutchinson_traces_from_criterion
from optuna_ctpe.nn.split import split_traces
from optuna_ctpe.nn.traces import Layers
from optuna_ctpe.nn.traces import LayerTrace
from optuna_ctpe.nn.traces import LossFn
from optuna_ctpe.space.omega import choice_sensitivity


__all__ = [
    "ESTIMATORS",
    "ESTIMATOR_NAMES",
    "LayerTrace",
    "choice_sensitivity",
    "empirical_fisher_traces",
    "ggn_traces",
    "hutchinson_traces",
    "hutchinson_traces_from_criterion",
    "resolve_estimator",
    "split_traces",
]

_logger = logging.getLogger(__name__)

#: The function of each estimator by name, for every name of
#: :data:`optuna_ctpe.nn.ESTIMATOR_NAMES` (the one registry of names, torch-free for the
#: command line's parser; re-exported here) but ``"auto"``.
ESTIMATORS: Mapping[str, Callable[..., dict[str, LayerTrace]]] = {
    "hutchinson": hutchinson_traces,
    "fisher": empirical_fisher_traces,
    "ggn": ggn_traces,
    "split": split_traces,
}
# The registry of names (optuna_ctpe.nn, torch-free for the CLI's parser) and the functions
# must agree; ESTIMATOR_NAMES is re-exported here, where it was defined before 0.2.
if set(ESTIMATOR_NAMES) != {"auto", *ESTIMATORS}:
    raise ImportError(
        f"optuna_ctpe.nn.ESTIMATOR_NAMES {ESTIMATOR_NAMES} and the estimators "
        f"{sorted(ESTIMATORS)} disagree."
    )


def estimator(name: Any) -> Callable[..., dict[str, LayerTrace]]:
    """The estimator called ``name`` (``"hutchinson"``, ``"fisher"``, ``"ggn"`` or ``"split"``).

    Raises:
        ValueError: If ``name`` is not one of :data:`ESTIMATORS` (``"auto"`` included: it
            names no estimator until :func:`resolve_estimator` has seen the model and loss).
    """
    if name == "auto":
        raise ValueError(
            "estimator 'auto' depends on the model and loss: resolve it with "
            "resolve_estimator(name, model, loss_fn, batches) first."
        )
    if name not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATOR_NAMES)}, got {name!r}.")
    return ESTIMATORS[name]


def resolve_estimator(
    name: Any,
    model: Any,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    layers: Layers = None,
) -> str:
    """The estimator ``name`` stands for: itself, or for ``"auto"`` ``"ggn"`` when
    :func:`~optuna_ctpe.nn.ggn.ggn_misfit` finds that the GGN fits ``loss_fn`` (one model call,
    curved and convex in the outputs, an output Hessian it can form), else ``"hutchinson"``.
    The choice and its reason are logged at INFO level (logger ``optuna_ctpe.nn.sensitivity``).

    Example:
        .. code-block:: python

            from optuna_ctpe.nn.sensitivity import resolve_estimator
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task(seed=0)
            resolve_estimator("auto", task.model, task.loss_fn, task.calibration_batches)
            # "ggn": cross-entropy of the model's logits

    Args:
        name: One of :data:`ESTIMATOR_NAMES`.
        model, loss_fn, batches, layers: As the estimators take them; only ``"auto"`` reads
            them (one forward pass on the first batch).

    Raises:
        ValueError: If ``name`` is not one of :data:`ESTIMATOR_NAMES`.
    """
    if name != "auto":
        estimator(name)
        return str(name)
    misfit = ggn_misfit(model, loss_fn, batches, layers=layers)
    if misfit is None:
        _logger.info("estimator 'auto': the GGN fits the loss; using 'ggn'")
        return "ggn"
    _logger.info("estimator 'auto': using 'hutchinson', since for the GGN %s", misfit)
    return "hutchinson"
