"""Quantization-aware fine-tuning of a configured model.

Quantizing every weight of a trained model to a few bits (and pruning channels) costs accuracy
that a little training recovers. :func:`finetune_quantized` trains the float weights of a
(width-pruned) copy while every forward pass sees them quantized: each quantized layer's weight
is parametrized by :func:`optuna_ctpe.nn.quantize.quantize_weight`, whose straight-through
gradient passes the quantizer unchanged. When it returns, the quantized values are baked into
plain parameters, so the result is an ordinary module whose weights hold the configuration's
integer grid (what :func:`optuna_ctpe.deploy.artifact.save_packed` and
:func:`optuna_ctpe.deploy.onnx.export_onnx` store, via their ``configured=`` argument).

On a CPU the fine-tuning is deterministic (one ordered pass over the batches per epoch, Adam), so
the command line's ``export`` rebuilds the exact model a trial scored.

Requires the ``torch`` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from optuna_ctpe._validation import check_integer
from optuna_ctpe._validation import check_real
from optuna_ctpe.nn.layers import resolve_layers
from optuna_ctpe.nn.quantize import quantize_weight


__all__ = ["FINETUNE_LR", "finetune_quantized"]

#: Adam's default learning rate here, small since it only repairs quantization damage.
FINETUNE_LR = 1e-4


class _Quantize(nn.Module):
    """The parametrization of one layer's weight: its quantized value in the forward pass."""

    def __init__(self, bits: int, axis: int) -> None:
        super().__init__()
        self.bits = bits
        self.axis = axis

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return quantize_weight(weight, self.bits, self.axis)


def finetune_quantized(
    net: nn.Module,
    bits: Mapping[str, int],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Sequence[Any],
    *,
    epochs: int,
    lr: float = FINETUNE_LR,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Fine-tune ``net`` in place with its layers quantized to ``bits``; return it in eval mode.

    Each epoch is one pass over ``batches`` in train mode with Adam at ``lr``; then ``net``
    goes to eval mode and ``on_epoch(epoch, net)`` is called, its weights quantized as the
    forward pass sees them (evaluate it there; raise, e.g. :class:`optuna.TrialPruned`, to
    stop early). Whether the loop ends or ``on_epoch`` raises, the quantized values are baked
    into plain parameters: ``net`` keeps its parameter names and state-dict keys.

    Example:
        .. code-block:: python

            from optuna_ctpe import HessianSearchSpace
            from optuna_ctpe.nn.finetune import finetune_quantized
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task(seed=0)
            space = HessianSearchSpace.from_model(
                task.model, task.loss_fn, task.calibration_batches,
                example_inputs=task.example_inputs,
            )
            config = space.uniform(3, 0.75)
            net = space.prune(task.model, config, task.example_inputs)  # float, pruned copy
            finetune_quantized(net, config.bits, task.loss_fn, task.calibration_batches, epochs=2)
            task.evaluate(net)  # above task.evaluate(space.apply(task.model, config, ...))

    Args:
        net: The model to train, typically :meth:`~optuna_ctpe.HessianSearchSpace.prune`'s
            float copy; it is modified.
        bits: Layer name -> bit-width (a configuration's ``bits``); each layer's weight is
            quantized per output channel along its type's axis
            (:data:`optuna_ctpe.nn.layers.LAYER_TYPES`).
        loss_fn: ``loss_fn(net, batch) -> scalar tensor``, differentiable in the weights.
        batches: The training batches, a non-empty sequence.
        epochs: Passes over ``batches``, an integer >= 0 (0 only quantizes).
        lr: Adam's learning rate, > 0.
        on_epoch: Called as ``on_epoch(epoch, net)`` after each epoch, in eval mode.

    Returns:
        ``net``, in eval mode, its quantized layers holding the quantized values.

    Raises:
        ValueError: If ``bits`` names a layer ``net`` does not have, ``batches`` is empty, or
            ``epochs`` or ``lr`` is out of range.
    """
    epochs = check_integer(epochs, "epochs", minimum=0)
    lr = check_real(lr, "lr", minimum=0.0, open_minimum=True)
    if not len(batches):
        raise ValueError("batches must hold at least one batch, got none.")
    # A layer is a tensor on a module: ``weight`` of a Linear or convolution, or a parameter such
    # as MultiheadAttention's ``in_proj_weight``, quantized along its type's output axis.
    layers = resolve_layers(net, list(bits), "config.bits")
    for name, b in bits.items():
        layer = layers[name]
        quantizer = _Quantize(b, layer.out_axis)
        parametrize.register_parametrization(layer.module, layer.attr, quantizer)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    try:
        for epoch in range(epochs):
            net.train()
            for batch in batches:
                optimiser.zero_grad()
                loss_fn(net, batch).backward()
                optimiser.step()
            net.eval()
            if on_epoch is not None:
                on_epoch(epoch, net)
    finally:
        # Bake the quantized weights into plain parameters: the result is an ordinary module
        # whose state dict loads with torch.load(weights_only=True).
        for layer in layers.values():
            parametrize.remove_parametrizations(layer.module, layer.attr, leave_parametrized=True)
    return net.eval()
