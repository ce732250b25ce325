"""The task contract (:class:`Task`) and the cache variable, without torch.

Kept apart from the package's ``__init__``, which imports the task modules (``digits``,
``vision``, ``minilm``) lazily: they import this module, not the package, so no import goes in a
circle. Users import both names from :mod:`optuna_ctpe.tasks`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


__all__ = ["CACHE_ENV", "Task"]

#: The environment variable that overrides the weight cache folder of the embedded tasks.
CACHE_ENV = "OPTUNA_CTPE_CACHE_DIR"


@dataclass(frozen=True)
class Task:
    """A trained model with the data and functions that a mixed-precision search needs.

    A factory ``f(*, seed=0, **kwargs) -> Task`` is what ``optuna-ctpe --task module:f`` loads.
    The search measures Hessian sensitivities with ``loss_fn`` on ``calibration_batches``,
    applies a configuration to a copy of ``model`` and scores the copy with ``evaluate``; it never
    modifies ``model`` itself.

    Attributes:
        name: Short identifier used in study names and reports, e.g. ``"digits-cnn"``.
        model: The trained full-precision ``torch.nn.Module``, in eval mode.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``: the training loss of ``model`` on one
            element of ``calibration_batches``; it must be twice differentiable in the weights
            (Hutchinson's estimator differentiates its gradient).
        calibration_batches: Batches (any objects ``loss_fn`` accepts, typically ``(x, y)``
            tuples) for sensitivity estimation and activation calibration. Kept disjoint from the
            validation data so that the search does not fit its own score.
        validation_batches: Batches ``evaluate`` scores a model on.
        example_inputs: One input tensor (or tuple of tensors) of the right shape, for the
            dependency tracing that width pruning needs.
        evaluate: ``evaluate(model) -> float``: the task metric of a model (for the embedded
            tasks, top-1 accuracy on ``validation_batches`` in [0, 1]); higher is better.
    """

    name: str
    model: Any
    loss_fn: Callable[[Any, Any], Any]
    calibration_batches: Sequence[Any]
    validation_batches: Sequence[Any]
    example_inputs: Any
    evaluate: Callable[[Any], float]
