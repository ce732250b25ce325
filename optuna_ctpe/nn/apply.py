"""A configuration -> a width-pruned (and weight-quantized) copy of a model.

The other direction of :mod:`optuna_ctpe.nn.measure`: what :meth:`HessianSearchSpace.apply`
and :meth:`HessianSearchSpace.prune` do with a model. Widths are pruned first
(dependency-aware, :func:`optuna_ctpe.nn.width.prune_widths`), then every layer's weight is
fake-quantized to its bit-width (:func:`optuna_ctpe.nn.quantize.quantize_model`).

Requires the ``torch`` extra.
"""

from __future__ import annotations

from collections.abc import Mapping
import copy
from typing import Any

from torch import nn

from optuna_ctpe.nn.layers import model_layers
from optuna_ctpe.nn.layers import weight_of
from optuna_ctpe.nn.quantize import quantize_model
from optuna_ctpe.nn.width import prune_widths
from optuna_ctpe.space.records import LayerSensitivity
from optuna_ctpe.space.records import QuantConfig


__all__ = ["check_model", "configured_copy"]


def check_model(model: nn.Module, layers: Mapping[str, LayerSensitivity]) -> None:
    """Refuse a model whose measured ``layers`` are missing or differ in size.

    Names alone are not enough: another architecture can reuse them, and the space's size
    accounting and sensitivities would then silently describe a different model.
    """
    known = model_layers(model, include_embeddings=True)
    modules = dict(model.named_modules())
    missing = sorted(name for name in layers if name not in known and name not in modules)
    if missing:
        raise ValueError(f"the search space names layers the model lacks: {missing}.")
    for name, layer in layers.items():
        weight = known[name].weight if name in known else weight_of(modules[name])
        numel = weight.numel() if weight is not None else None
        if numel != layer.n_params:
            raise ValueError(
                f"layer {name!r} has {numel} weights but the search space was measured with "
                f"{layer.n_params}: the model is not the one the space was built for."
            )


def _pruned(
    model: nn.Module,
    layers: Mapping[str, LayerSensitivity],
    config: QuantConfig,
    example_inputs: Any,
) -> nn.Module:
    """``model`` pruned to ``config``'s widths; ``model`` itself when no width is below 1."""
    check_model(model, layers)
    pruned = {g: w for g, w in config.widths.items() if w < 1}
    if not pruned:
        return model
    if example_inputs is None:
        raise ValueError("example_inputs is required to prune widths below 1.")
    return prune_widths(model, example_inputs, pruned)


def configured_copy(
    model: nn.Module,
    layers: Mapping[str, LayerSensitivity],
    config: QuantConfig,
    example_inputs: Any = None,
    *,
    quantize: bool,
) -> nn.Module:
    """A copy of ``model`` pruned to ``config``'s widths and, with ``quantize``, fake-quantized
    to its bit-widths; ``model`` is not modified.

    Without ``quantize`` the result is a deep copy even when no width is below 1, so the caller
    may always modify it (fine-tune it, say).

    Args:
        model: The model the space was measured on.
        layers: The space's layer sensitivities (checked against ``model``).
        config: A configuration of the space.
        example_inputs: Inputs for dependency tracing; required when a width is below 1.
        quantize: Quantize the weights (``HessianSearchSpace.apply``) or only prune
            (``HessianSearchSpace.prune``).

    Raises:
        ValueError: If ``model`` does not match ``layers``, or a width below 1 is requested
            without ``example_inputs``.
    """
    net = _pruned(model, layers, config, example_inputs)
    if quantize:
        return quantize_model(net, dict(config.bits))
    return copy.deepcopy(model) if net is model else net
