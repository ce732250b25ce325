"""What the torch wing knows of modules: the supported layer types and the eval-mode context.

Every part of the wing (sensitivities, quantization, BOPs, width groups, measurement) works on
the same layer types, listed once here.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib

from torch import nn


#: The layers whose weights are quantized, traced and width-pruned: convolutions of every
#: dimension and linear layers (a weight with output channels along dimension 0).
WEIGHTED_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def weight_of(module: nn.Module) -> nn.Parameter | None:
    """``module.weight`` if it is a parameter (a layer may have none, or a buffer by that name)."""
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, nn.Parameter) else None


def out_channels(module: nn.Module) -> int:
    """The output channels of a supported layer (``out_channels`` or ``out_features``)."""
    return int(module.out_features if isinstance(module, nn.Linear) else module.out_channels)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside; every submodule's own train/eval flag restored after.

    Batch norm then uses its running statistics (and does not update them) and dropout is off.
    Flags are restored module by module, so a model that was partly in eval mode (a frozen
    backbone) comes back exactly as it was.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
