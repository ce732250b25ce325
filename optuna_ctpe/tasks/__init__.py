"""Tasks: a trained model plus the data and functions a quantization search needs.

A task is what the command line's ``--task module:factory`` option loads: ``factory`` is called
with keyword arguments (at least ``seed``) and must return a :class:`Task`. The package embeds
one default task, :func:`optuna_ctpe.tasks.digits.digits_task`, a small CNN on scikit-learn's
``load_digits`` that trains in seconds on a CPU.

This module does not import torch, so the CLI can describe the contract before torch is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


__all__ = ["CACHE_ENV", "Task", "digits_task"]

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


def __getattr__(name: str) -> Any:
    # The embedded task needs torch; import it only when asked so that ``Task`` stays torch-free.
    if name == "digits_task":
        from optuna_ctpe.tasks.digits import digits_task

        return digits_task
    raise AttributeError(f"module 'optuna_ctpe.tasks' has no attribute {name!r}")
