"""Choices priced by their measured loss increase instead of a second-order estimate.

HAWQ-V2's Ω of a width ratio, ``mean trace × ‖removed weights‖²``, is a second-order Taylor term
around the trained weights. Removing whole channels without fine-tuning is no small step:
``benchmarks/results/omega_prediction.md`` measures that Ω/2 under-predicts the calibration
loss increase of single-group width changes by one to two orders of magnitude at ratio 0.5 on
the digits CNN and resnet18, and ranks them worse than it ranks bit-widths, so a joint ILP that
trusts it trades bits for widths on a false prediction.

Pruning one group alone to each ratio and running the calibration batches costs ``groups ×
(ratios − 1)`` forward passes, far fewer than the Hessian probes. :func:`calibrate_groups`
stores each measurement in :attr:`~optuna_ctpe.space.records.WidthGroupSensitivity.loss_increase`,
and :func:`optuna_ctpe.space.omega.omega_table` then prices a ratio at
``max(2 × measured increase, Ω)``: the measured loss where it exceeds the estimate, never less
than the estimate, so noise in a small calibration set (a measured *decrease*) cannot make a
width change look free.

Ω of a whole configuration is still a sum of single choices; :func:`loss_increase_meter`
measures a configuration itself, which is what
:meth:`optuna_ctpe.HessianSearchSpace.warm_starts` checks its ILP answers with.

Requires the ``torch`` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import math
from typing import Any

import torch
from torch import nn

from optuna_ctpe.nn.apply import applied_config
from optuna_ctpe.nn.apply import WeightCache
from optuna_ctpe.nn.layers import eval_mode
from optuna_ctpe.nn.width import prune_widths
from optuna_ctpe.space.records import HasSpec
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import spec_of
from optuna_ctpe.space.records import SpaceSpec
from optuna_ctpe.space.records import WidthGroupSensitivity


__all__ = ["calibrate_groups", "calibration_loss", "loss_increase_meter"]


def calibration_loss(model: nn.Module, loss_fn: Any, batches: Sequence[Any]) -> float:
    """``loss_fn`` averaged over ``batches``, in eval mode and without gradients.

    Example:
        .. code-block:: python

            from optuna_ctpe.nn.width_calibration import calibration_loss
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task(seed=0)
            calibration_loss(task.model, task.loss_fn, task.calibration_batches)  # about 0.05

    Args:
        model: The network; its train/eval flags are restored afterwards.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: A non-empty sequence of batches ``loss_fn`` accepts.

    Raises:
        ValueError: If ``batches`` is empty or the loss is not finite.
    """
    if not len(batches):
        raise ValueError("batches must hold at least one batch, got none.")
    with torch.no_grad(), eval_mode(model):
        total = sum(float(loss_fn(model, batch)) for batch in batches)
    loss = total / len(batches)
    if not math.isfinite(loss):
        raise ValueError(f"loss_fn gave a non-finite calibration loss ({loss!r}).")
    return loss


def calibrate_groups(
    model: nn.Module,
    loss_fn: Any,
    batches: Sequence[Any],
    example_inputs: Any,
    groups: Sequence[WidthGroupSensitivity],
) -> list[WidthGroupSensitivity]:
    """``groups`` with their measured loss increase at every ratio of their perturbations.

    Each group is pruned alone (:func:`optuna_ctpe.nn.width.prune_widths`, no fine-tuning) to
    each ratio below 1, and the increase of :func:`calibration_loss` over the unpruned model's
    is recorded, negative values included (they are noise or a real gain; the Ω table floors
    them at the second-order estimate). Ratio 1 removes nothing and records 0.

    Example:
        .. code-block:: python

            from optuna_ctpe import HessianSearchSpace
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task(seed=0)
            space = HessianSearchSpace.from_model(
                task.model, task.loss_fn, task.calibration_batches,
                example_inputs=task.example_inputs, estimator="ggn", calibrate_widths=True,
            )
            space.groups["conv1"].loss_increase  # {0.5: ..., 0.75: ..., 1.0: 0.0}

    Args:
        model: The trained model the groups were measured on; it is not modified.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: The calibration batches.
        example_inputs: Inputs for the dependency tracing of the pruner.
        groups: The measured width groups (:func:`optuna_ctpe.nn.measure.measure_groups`).

    Returns:
        New records, in the order of ``groups``.

    Raises:
        ValueError: If ``batches`` is empty, ``example_inputs`` is None while ``groups`` is not
            empty, or a loss is not finite.
    """
    if groups and example_inputs is None:
        raise ValueError("example_inputs is required to calibrate width groups, got None.")
    base = calibration_loss(model, loss_fn, batches)
    out = []
    for group in groups:
        increase = {
            w: 0.0
            if w >= 1
            else calibration_loss(
                prune_widths(model, example_inputs, {group.name: w}), loss_fn, batches
            )
            - base
            for w in group.perturbations
        }
        out.append(dataclasses.replace(group, loss_increase=increase))
    return out


def loss_increase_meter(
    space: SpaceSpec | HasSpec,
    model: nn.Module,
    loss_fn: Any,
    batches: Sequence[Any],
    example_inputs: Any = None,
) -> Callable[[QuantConfig], float]:
    """``measure(config)``: the :func:`calibration_loss` of ``model`` under ``config`` minus the
    unconfigured model's, for :meth:`~optuna_ctpe.HessianSearchSpace.warm_starts`.

    The unconfigured loss is computed once, here. Each call configures ``model`` as
    :meth:`~optuna_ctpe.HessianSearchSpace.applied` does
    (:func:`optuna_ctpe.nn.apply.applied_config`: in place when no width is below 1, with one
    weight cache across calls) and runs ``batches`` once.

    Example:
        .. code-block:: python

            from optuna_ctpe import HessianSearchSpace
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task(seed=0)
            args = (task.model, task.loss_fn, task.calibration_batches, task.example_inputs)
            space = HessianSearchSpace.from_model(*args[:3], example_inputs=args[3])
            measure = space.loss_increase(*args)
            measure(space.uniform(8))  # about 0: 8 bits barely move the loss

    Args:
        space: The search space measured on ``model``, or its
            :class:`~optuna_ctpe.space.records.SpaceSpec`.
        model: The trained model; configured only inside each call, then restored.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: The calibration batches.
        example_inputs: Inputs for the dependency tracing of the pruner; required to measure a
            configuration with a width below 1.

    Raises:
        ValueError: If ``batches`` is empty or the loss of ``model`` is not finite; a call, if
            its configuration does not fit ``space`` or its loss is not finite.
    """
    spec = spec_of(space)
    base = calibration_loss(model, loss_fn, batches)
    cache = WeightCache()

    def measure(config: QuantConfig) -> float:
        with applied_config(spec, model, config, example_inputs, cache=cache) as net:
            return calibration_loss(net, loss_fn, batches) - base

    return measure
