"""What the torch wing knows of modules: the supported layer types and the eval-mode context.

Every part of the wing (sensitivities, quantization, size, BOPs, width groups, measurement)
works on the same layers, listed once here (:data:`LAYER_TYPES`), each with the axis of its
weight that holds the output channels (the axis of per-channel quantization).

A *layer* is one quantized weight tensor, and it is named so that a configuration reads as the
model does:

* a module whose quantized tensor is its ``weight`` (Conv, ConvTranspose, Linear, GPT-2's
  ``Conv1D``, and, when asked for, Embedding) is named after the module: ``"features.0"``;
* a weight held as another parameter of a module (``nn.MultiheadAttention``'s fused
  ``in_proj_weight``, or its separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``)
  is named after the parameter: ``"encoder.layers.0.self_attn.in_proj_weight"``.

A tensor shared by several modules (tied weights: GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``) is one layer, named after its first module in module order: it is
measured once, counted once in size and quantized once, at one bit-width.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import contextlib
from dataclasses import dataclass
import warnings

from torch import nn


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (GPT-2's linear layer, weight (in, out)).

    Recognised by class name and attributes, so that ``transformers`` is never imported here.
    """
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), nn.Parameter)
        and module.weight.dim() == 2
    )


@dataclass(frozen=True)
class LayerType:
    """One supported layer type.

    Attributes:
        name: How messages name the type.
        matches: Whether a module is of the type.
        out_axis: The weight axis holding the output channels.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    out_axis: int


def _of(*types: type[nn.Module]) -> Callable[[nn.Module], bool]:
    return lambda m: isinstance(m, types)


#: The modules whose ``weight`` is quantized and traced, each with its output-channel axis.
#: ConvTranspose weights are ``(in, out / groups, *kernel)``, so their output channels are axis 1
#: (per-channel scales of a grouped transposed convolution are then shared across its groups).
LAYER_TYPES: tuple[LayerType, ...] = (
    LayerType("Conv1d/Conv2d/Conv3d", _of(nn.Conv1d, nn.Conv2d, nn.Conv3d), 0),
    LayerType(
        "ConvTranspose1d/2d/3d",
        _of(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
        1,
    ),
    LayerType("Linear", _of(nn.Linear), 0),
    LayerType("transformers Conv1D", is_hf_conv1d, 1),
)
#: Embeddings, quantized per row (one scale per token) when embeddings are searched.
EMBEDDING_TYPE = LayerType("Embedding", _of(nn.Embedding), 0)
#: ``nn.MultiheadAttention``'s projection weights that no Linear holds, each (out, in).
MHA_PARAMETERS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

#: The torch module types among :data:`LAYER_TYPES` (what torch-pruning can root groups at and
#: what ``layers=(types)`` selections default to).
WEIGHTED_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


@dataclass(frozen=True)
class LayerWeight:
    """One layer: a quantized weight tensor and where the model holds it.

    Attributes:
        name: The layer name (see the module docstring).
        module_name: Name of the module holding the tensor.
        attr: The tensor's attribute on that module (``"weight"``, ``"in_proj_weight"``, ...).
        module: The module.
        out_axis: The weight axis holding the output channels.
    """

    name: str
    module_name: str
    attr: str
    module: nn.Module
    out_axis: int

    @property
    def param_name(self) -> str:
        """The tensor's name in ``model.named_parameters()``."""
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr

    @property
    def weight(self) -> nn.Parameter:
        """The weight parameter."""
        return getattr(self.module, self.attr)


def weight_of(module: nn.Module) -> nn.Parameter | None:
    """``module.weight`` if it is a parameter (a layer may have none, or a buffer by that name)."""
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, nn.Parameter) else None


def layer_type(module: nn.Module, *, include_embeddings: bool = False) -> LayerType | None:
    """The supported type of ``module``, or None."""
    types = (*LAYER_TYPES, EMBEDDING_TYPE) if include_embeddings else LAYER_TYPES
    return next((t for t in types if t.matches(module)), None)


def out_channels(module: nn.Module) -> int:
    """The output channels of a supported layer (``out_channels``, ``out_features`` or ``nf``)."""
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if is_hf_conv1d(module):
        return int(module.nf)
    return int(module.out_channels)


def model_layers(
    model: nn.Module, *, include_embeddings: bool = False, warn: bool = False
) -> dict[str, LayerWeight]:
    """Every layer of ``model`` the wing quantizes, by layer name, in module order.

    Tied tensors appear once, under their first module; without ``include_embeddings``, a
    layer tied to an embedding (GPT-2's LM head) is not listed either. With ``warn``, a module
    holding a weight matrix of a type the wing cannot quantize is named in a warning (never
    skipped silently); one-dimensional weights (normalisation scales) are left float by design.

    Args:
        model: The network.
        include_embeddings: Also list ``nn.Embedding`` modules (quantized per row).
        warn: Warn about unsupported modules with a weight of two or more dimensions.
    """
    layers: dict[str, LayerWeight] = {}
    # Without embeddings, a layer tied to an embedding (an LM head) is left out too:
    # quantizing it would quantize the embedding.
    seen = set() if include_embeddings else _embedding_weights(model)
    unsupported: list[str] = []
    for name, module in model.named_modules():
        for attr, axis in _module_weights(module, include_embeddings):
            weight = getattr(module, attr)
            if id(weight) in seen:
                continue
            seen.add(id(weight))
            layer = name if attr == "weight" else (f"{name}.{attr}" if name else attr)
            layers[layer] = LayerWeight(layer, name, attr, module, axis)
        if warn and not _handled(module, include_embeddings):
            unsupported.append(f"{name!r} ({type(module).__name__})")
    if unsupported:
        warnings.warn(
            f"modules {', '.join(unsupported)} hold a weight of a type this package cannot "
            "quantize; they stay in float32. Supported: "
            f"{', '.join(t.name for t in LAYER_TYPES)}, nn.MultiheadAttention and, with "
            "include_embeddings=True, nn.Embedding.",
            stacklevel=3,
        )
    return layers


def _embedding_weights(model: nn.Module) -> set[int]:
    """The ids of the embedding tables of ``model``."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _module_weights(module: nn.Module, include_embeddings: bool) -> list[tuple[str, int]]:
    """``(attribute, output axis)`` of each quantized tensor ``module`` itself holds."""
    if isinstance(module, nn.MultiheadAttention):
        return [
            (a, 0) for a in MHA_PARAMETERS if isinstance(getattr(module, a, None), nn.Parameter)
        ]
    kind = layer_type(module, include_embeddings=include_embeddings)
    if kind is None or weight_of(module) is None:
        return []
    return [("weight", kind.out_axis)]


def _handled(module: nn.Module, include_embeddings: bool) -> bool:
    """Whether ``module``'s weights (if any) are quantized, or left float by design.

    A weight is a parameter the module holds itself with ``weight`` in its name (``weight``,
    an LSTM's ``weight_ih_l0``); one-dimensional ones are normalisation scales.
    """
    if isinstance(module, (nn.MultiheadAttention, nn.Embedding)):
        return True  # embeddings are searched on request only (include_embeddings)
    if layer_type(module, include_embeddings=include_embeddings) is not None:
        return True
    return not any(
        "weight" in name and p.dim() >= 2 for name, p in module.named_parameters(recurse=False)
    )


def resolve_layers(
    model: nn.Module, names: list[str], what: str, *, need_weight: bool = True
) -> dict[str, LayerWeight]:
    """The layers called ``names``: supported layers, parameter layers or any module's weight.

    A name outside :func:`model_layers` may still be any module with a ``weight`` parameter
    (quantized along axis 0, or along its type's output axis).

    Raises:
        ValueError: Listing the names the model lacks, then (with ``need_weight``) the modules
            without a weight parameter.
    """
    known = model_layers(model, include_embeddings=True)
    modules = dict(model.named_modules())
    unknown = sorted(n for n in names if n not in known and n not in modules)
    if unknown:
        raise ValueError(f"{what} names layers the model lacks: {unknown}.")
    out: dict[str, LayerWeight] = {}
    missing = []
    for n in names:
        if n in known:
            out[n] = known[n]
        elif weight_of(modules[n]) is not None:
            kind = layer_type(modules[n], include_embeddings=True)
            out[n] = LayerWeight(n, n, "weight", modules[n], 0 if kind is None else kind.out_axis)
        else:
            missing.append(n)
    if missing and need_weight:
        raise ValueError(f"{what} names modules without a weight parameter: {sorted(missing)}.")
    return out


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
