"""Mixed-precision fake quantization and size accounting on PyTorch's own quantization ops.

Weights are quantized symmetrically per output channel with
``torch.fake_quantize_per_channel_affine``: channel ``c`` gets the scale
``s_c = max|W_c| / q_max`` with ``q_max = 2^(b-1) - 1``, zero point 0 and the integer range
``[-q_max, q_max]`` (``2^b - 1`` levels, symmetric around 0). Scales are float32 and clamped to
at least ``1e-8``, because a zero scale (an all-zero channel) makes the op return garbage
without an error. Activations (optional) are quantized per tensor and asymmetrically, with the
min/max range observed on calibration data, by ``torch.fake_quantize_per_tensor_affine`` in
forward pre-hooks.

Fake quantization keeps float tensors holding the quantized values, so a quantized model runs
on any device and its accuracy is that of the integer model. The deprecated
``torch.ao.quantization`` workflow is not used.

Requires the ``torch`` extra.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
import copy
from dataclasses import dataclass
from dataclasses import field
import math
from typing import Any

import torch
from torch import nn

from optuna_ctpe._validation import check_bits
from optuna_ctpe._validation import check_integer
from optuna_ctpe._validation import MAX_BITS
from optuna_ctpe.nn.layers import eval_mode
from optuna_ctpe.nn.layers import LayerWeight
from optuna_ctpe.nn.layers import model_layers
from optuna_ctpe.nn.layers import resolve_layers


__all__ = [
    "ModelSize",
    "bops",
    "model_size",
    "quantization_error",
    "quantize_model",
    "quantize_weight",
    "weight_scales",
]

_MIN_SCALE = 1e-8
_FP32_BITS = 32
#: Activations are quantized to at most this many bits (a float32 activation is "32 bits").
_MAX_ACTIVATION_BITS = 32


def quantize_weight(weight: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """Symmetric per-output-channel fake quantization of a weight to ``bits`` bits.

    Gradients pass straight through inside the clipping range (the op's STE); the scales are
    computed without gradient.

    Args:
        weight: Floating-point tensor; a 0-d tensor is treated as a single channel.
        bits: Integer bit-width in [2, 16].
        axis: The axis holding the output channels, one scale each: 0 for Conv, Linear and
            Embedding weights, 1 for ConvTranspose and GPT-2's ``Conv1D``
            (:data:`optuna_ctpe.nn.layers.LAYER_TYPES`).

    Returns:
        A tensor of ``weight``'s shape and dtype holding the quantized values.

    Raises:
        ValueError: If ``bits`` is not an integer in [2, 16], or ``axis`` is not an axis of
            ``weight``.
        TypeError: If ``weight`` is not a floating-point tensor.
    """
    w32, bits, axis = _checked_weight(weight, bits, axis)
    scale = _scales(w32, bits, axis)
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    qmax = 2 ** (bits - 1) - 1
    q = torch.fake_quantize_per_channel_affine(w32, scale, zero_point, axis, -qmax, qmax)
    return q.to(weight.dtype).reshape(weight.shape)


def weight_scales(weight: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """The float32 per-channel scales :func:`quantize_weight` uses: ``max|W_c| / q_max``,
    clamped to at least ``1e-8``; one per index of ``axis`` (one for a 0-d tensor).

    A packed artifact (:mod:`optuna_ctpe.deploy.artifact`) stores these scales beside the
    integers, so they are computed in one place.

    Args:
        weight: Floating-point tensor.
        bits: Integer bit-width in [2, 16].
        axis: The output-channel axis of ``weight`` (see :func:`quantize_weight`).

    Raises:
        ValueError: If ``bits`` is not an integer in [2, 16], or ``axis`` is not an axis of
            ``weight``.
        TypeError: If ``weight`` is not a floating-point tensor.
    """
    return _scales(*_checked_weight(weight, bits, axis))


def _checked_weight(weight: Any, bits: Any, axis: Any) -> tuple[torch.Tensor, int, int]:
    """``weight`` in float32 (a 0-d tensor as one channel), and the checked bits and axis."""
    bits = check_bits(bits, "bits")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {_describe(weight)}.")
    # The op requires float32 scales; half/bfloat16/float64 weights are quantized in float32.
    w32 = (weight.reshape(1) if weight.dim() == 0 else weight).float()
    return w32, bits, check_integer(axis, "axis", minimum=0, maximum=w32.dim() - 1)


def _scales(w32: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        amax = w32.abs().transpose(0, axis).flatten(1).amax(1) if w32.dim() > 1 else w32.abs()
        return (amax / qmax).clamp_min(_MIN_SCALE)


def quantization_error(weight: torch.Tensor, bits: int, axis: int = 0) -> float:
    """``‖Q_b(W) − W‖²``: the squared Frobenius norm of the quantization error.

    Args:
        weight: Floating-point weight tensor (see :func:`quantize_weight`).
        bits: Integer bit-width in [2, 16].
        axis: The output-channel axis of ``weight`` (see :func:`quantize_weight`).

    Raises:
        ValueError: If ``bits`` is not an integer in [2, 16].
    """
    with torch.no_grad():
        w = weight.detach()
        return float((quantize_weight(w, bits, axis).double() - w.double()).pow(2).sum())


def quantize_model(
    model: nn.Module,
    bits: Mapping[str, int],
    *,
    activation_bits: int | Mapping[str, int] | None = None,
    calibration_batches: Iterable[Any] | None = None,
) -> nn.Module:
    """A deep copy of ``model`` with mixed-precision fake-quantized weights (and activations).

    ``model`` is never modified. Each named layer's weight is replaced by
    :func:`quantize_weight` at its bit-width, along its output-channel axis; biases and all
    other parameters stay float. A tied tensor is quantized once (its layers must agree).

    With ``activation_bits``, the input of each chosen layer is fake-quantized per tensor,
    asymmetrically over ``[min(0, lo), max(0, hi)]`` with ``2^b`` levels, where ``lo``/``hi``
    are the smallest/largest input values seen while running the weight-quantized copy (in eval
    mode, without gradients) on ``calibration_batches``. The quantizers are forward pre-hooks of
    the copy and are deep-copyable.

    Args:
        model: The network.
        bits: Layer name -> weight bit-width (integer in [2, 16]): a module with a ``weight``
            parameter, or an ``nn.MultiheadAttention`` projection parameter such as
            ``"attn.in_proj_weight"`` (:mod:`optuna_ctpe.nn.layers`). Layers not named keep
            float weights.
        activation_bits: None (float activations), one bit-width for the inputs of every layer
            in ``bits``, or layer name -> bit-width for chosen layers (a parameter layer's
            activations are its module's first input).
        calibration_batches: Required with ``activation_bits``: each batch is an input tensor,
            or a tuple/list whose first element is the input tensor (``(inputs, targets)``).

    Returns:
        The quantized copy, in the same train/eval modes as ``model``.

    Raises:
        ValueError: On unknown layer names (all listed), modules without a weight, tied layers
            given different bit-widths, bit-widths outside [2, 16], ``activation_bits``
            without ``calibration_batches`` (or with an empty one), or non-finite calibration
            activations.
    """
    checked, _ = resolve_quantized_layers(model, bits)
    act = _activation_bits(activation_bits, checked)
    act = _activation_modules(model, act)
    if act and calibration_batches is None:
        raise ValueError("calibration_batches is required when activation_bits is given.")

    net = copy.deepcopy(model)
    layers = resolve_layers(net, list(checked), "bits")
    with torch.no_grad():
        for name, b in checked.items():
            weight, axis = layers[name].weight, layers[name].out_axis
            weight.copy_(quantize_weight(weight.detach(), b, axis))
    if act:
        modules = dict(net.named_modules())
        _calibrate(net, modules, act, calibration_batches)  # type: ignore[arg-type]
    return net


class _ActivationFakeQuant:
    """Forward pre-hook fake-quantizing a module's first input per tensor."""

    def __init__(self, scale: float, zero_point: int, qmax: int) -> None:
        self.scale = scale
        self.zero_point = zero_point
        self.qmax = qmax

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        q = torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, self.qmax)
        return (q, *args[1:])


class _RangeObserver:
    """Forward pre-hook recording the min and max of a module's first input."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))


def _calibrate(
    net: nn.Module,
    modules: Mapping[str, nn.Module],
    act: Mapping[str, int],
    batches: Iterable[Any],
) -> None:
    observers = {name: _RangeObserver() for name in act}
    handles = [modules[n].register_forward_pre_hook(o) for n, o in observers.items()]
    n_batches = 0
    try:
        # Eval mode: batch-norm statistics of the copy must not move during calibration.
        with eval_mode(net), torch.no_grad():
            for batch in batches:
                net(batch[0] if isinstance(batch, (tuple, list)) else batch)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise ValueError("calibration_batches is empty: at least one batch is needed.")
    for name, b in act.items():
        obs = observers[name]
        if not (math.isfinite(obs.lo) and math.isfinite(obs.hi)):
            raise ValueError(
                f"the calibration inputs of layer {name!r} are not finite "
                f"(range [{obs.lo}, {obs.hi}]), or the layer was never called."
            )
        # The range must contain 0 so that zero (padding, ReLU outputs) is represented exactly.
        lo, hi = min(obs.lo, 0.0), max(obs.hi, 0.0)
        qmax = 2**b - 1
        scale = max((hi - lo) / qmax, _MIN_SCALE)
        zero_point = min(qmax, max(0, round(-lo / scale)))
        modules[name].register_forward_pre_hook(_ActivationFakeQuant(scale, zero_point, qmax))


@dataclass(frozen=True)
class ModelSize:
    """Storage size of a (mixed-precision) model.

    Attributes:
        total_bits: Bits to store every parameter (each counted once).
        n_params: Number of parameter elements.
        layer_bits: Module name -> bits of the module's own parameters (weight and bias), for
            every module that owns parameters.
        bytes: ``total_bits / 8``.
        compression_ratio: ``32 * n_params / total_bits``, the size ratio to an FP32 model.
    """

    total_bits: int
    n_params: int
    layer_bits: dict[str, int] = field(default_factory=dict, hash=False)

    @property
    def bytes(self) -> float:
        return self.total_bits / 8

    @property
    def compression_ratio(self) -> float:
        return _FP32_BITS * self.n_params / self.total_bits if self.total_bits else math.inf


def model_size(
    model: nn.Module,
    bits: Mapping[str, int] | None = None,
    *,
    default_bits: int = 32,
    scales: bool = False,
) -> ModelSize:
    """Storage size of ``model`` with the weights of ``bits``' layers at their bit-widths.

    Every parameter is counted once: the ``weight`` of each layer in ``bits`` at its
    bit-width, every other parameter (biases, norm scales, unquantized layers) at
    ``default_bits``. Buffers (batch-norm running statistics) are not counted: at inference they
    fold into the preceding layer. Per-channel scales are counted only with ``scales``, as
    :meth:`HessianSearchSpace.size <optuna_ctpe.HessianSearchSpace.size>` counts them for
    spaces measured by ``from_model``: they are a few percent of a small model at low bits.

    Args:
        model: The network (its actual, possibly pruned, parameter shapes are counted).
        bits: Layer name -> weight bit-width in [2, 16]; None or empty counts everything at
            ``default_bits``.
        default_bits: Bit-width of every other parameter, an integer in [1, 64].
        scales: Also count each quantized weight's float32 scales, one per index of its
            output-channel axis (what a packed artifact stores beside the integers).

    Raises:
        ValueError: On unknown layer names, modules without a weight, or bad bit-widths.
    """
    default_bits = check_integer(default_bits, "default_bits", minimum=1, maximum=64)
    checked, layers = resolve_quantized_layers(model, {} if bits is None else bits)
    modules = dict(model.named_modules())
    weight_bits = {id(layers[n].weight): b for n, b in checked.items()}
    scale_bits = {
        id(layer.weight): _FP32_BITS * layer.weight.shape[layer.out_axis] if scales else 0
        for layer in layers.values()
    }
    seen: set[int] = set()
    total = n_params = 0
    layer_bits: dict[str, int] = {}
    for name, module in modules.items():
        own = 0
        for p in module.parameters(recurse=False):
            if id(p) in seen:  # shared parameters are stored once
                continue
            seen.add(id(p))
            own += p.numel() * weight_bits.get(id(p), default_bits) + scale_bits.get(id(p), 0)
            n_params += p.numel()
        if own:
            layer_bits[name] = own
            total += own
    return ModelSize(total_bits=total, n_params=n_params, layer_bits=layer_bits)


def bops(
    model: nn.Module,
    bits: Mapping[str, int],
    example_input: Any,
    activation_bits: int | Mapping[str, int] = 32,
) -> int:
    """Bit operations per sample: ``Σ MACs × weight bits × activation bits`` over the layers.

    MACs are counted by forward hooks on one eval-mode, no-grad pass over ``example_input``
    and divided by its batch size (:func:`layer_macs`), for every supported layer
    (:func:`optuna_ctpe.nn.layers.model_layers`) and every layer of ``bits``. Layers not in
    ``bits`` count at 32 weight bits. ``model`` is left in its original modes.

    Args:
        model: The network.
        bits: Layer name -> weight bit-width in [2, 16].
        example_input: Input tensor (batch first), or a tuple of positional inputs whose first
            element fixes the batch size.
        activation_bits: One activation bit-width for every layer, or layer name -> bit-width
            (others at 32); integers in [2, 32].

    Raises:
        ValueError: On unknown layer names or bad bit-widths.
    """
    checked = check_layer_bits(bits, "bits")
    layers = {**model_layers(model), **resolve_layers(model, list(checked), "bits")}
    if isinstance(activation_bits, Mapping):
        act = check_layer_bits(activation_bits, "activation_bits", maximum=_MAX_ACTIVATION_BITS)
        _activation_modules(model, act)
        default_act = _FP32_BITS
    else:
        act = {}
        default_act = check_bits(activation_bits, "activation_bits", maximum=_MAX_ACTIVATION_BITS)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    macs: dict[str, int] = {}
    modules = dict(model.named_modules())
    # nn.MultiheadAttention applies its out_proj's weight without calling it: its MACs are
    # counted on the attention module's call.
    host = {f"{n}.out_proj": n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    by_module: dict[str, list[LayerWeight]] = {}
    for layer in layers.values():
        by_module.setdefault(host.get(layer.name, layer.module_name), []).append(layer)

    def counter(own: list[LayerWeight]) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            for layer in own:
                n = layer_macs(layer, module, args, kwargs, output)
                macs[layer.name] = macs.get(layer.name, 0) + n

        return hook

    handles = [
        modules[n].register_forward_hook(counter(own), with_kwargs=True)
        for n, own in by_module.items()
    ]
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return sum(
        n * checked.get(name, _FP32_BITS) * act.get(name, default_act) for name, n in macs.items()
    )


def layer_macs(
    layer: LayerWeight,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Any,
) -> int:
    """Multiply-accumulates per sample of one call of ``module`` (a forward hook's arguments)
    for ``layer``: its module, or the ``nn.MultiheadAttention`` whose ``out_proj`` it is.

    A Conv's are ``output elements × in_channels / groups × kernel elements``, a
    ConvTranspose's ``input elements × out_channels / groups × kernel elements``, a Linear's
    (and a ``Conv1D``'s) ``output elements × input features``, an ``nn.MultiheadAttention``
    projection's ``input elements × embed_dim`` (its output projection's inputs are as many
    as the queries'); an embedding lookup has none.
    """
    if isinstance(module, nn.MultiheadAttention):
        inputs = [*args, *(kwargs.get(k) for k in ("query", "key", "value"))][:3]
        which = {"in_proj_weight": (0, 1, 2), "k_proj_weight": (1,), "v_proj_weight": (2,)}
        used = [inputs[i] for i in which.get(layer.attr, (0,))]
        query = inputs[0]
        batch = 1 if query.dim() == 2 else query.shape[0 if module.batch_first else 1]
        return sum(x.numel() for x in used) * module.embed_dim // batch
    out = output[0] if isinstance(output, tuple) else output
    if isinstance(module, nn.Embedding) or not isinstance(out, torch.Tensor) or out.dim() == 0:
        return 0
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size)
        if module.transposed:
            x = args[0]
            return x.numel() * module.out_channels // module.groups * kernel // x.shape[0]
        per_output = module.in_channels // module.groups * kernel
    else:  # Linear (in_features = weight.shape[1]) or Conv1D (weight (in, out))
        per_output = layer.weight.shape[1 - layer.out_axis]
    return out.numel() * per_output // out.shape[0]


def _activation_bits(
    activation_bits: int | Mapping[str, int] | None, bits: Mapping[str, int]
) -> dict[str, int]:
    if activation_bits is None:
        return {}
    if isinstance(activation_bits, Mapping):
        return check_layer_bits(activation_bits, "activation_bits")
    b = check_bits(activation_bits, "activation_bits")
    return dict.fromkeys(bits, b)


def _activation_modules(model: nn.Module, act: Mapping[str, int]) -> dict[str, int]:
    """``act`` keyed by module: a parameter layer's activations are its module's inputs."""
    modules = dict(model.named_modules())
    known = model_layers(model, include_embeddings=True)
    unknown = sorted(n for n in act if n not in modules and n not in known)
    if unknown:
        raise ValueError(f"activation_bits names layers the model lacks: {unknown}.")
    return {(n if n in modules else known[n].module_name): b for n, b in act.items()}


def check_layer_bits(bits: Any, what: str = "bits", *, maximum: int = MAX_BITS) -> dict[str, int]:
    """``bits`` (layer name -> bit-width) with every bit-width checked, as plain ints.

    Raises:
        TypeError: If ``bits`` is not a mapping.
        ValueError: ``"<what>[<name>] must be an integer bit-width in [2, maximum]"``.
    """
    if not isinstance(bits, Mapping):
        raise TypeError(f"{what} must be a mapping of layer names to bit-widths, got {bits!r}.")
    return {name: check_bits(b, f"{what}[{name!r}]", maximum=maximum) for name, b in bits.items()}


def resolve_quantized_layers(
    model: nn.Module, bits: Any
) -> tuple[dict[str, int], dict[str, LayerWeight]]:
    """The checked bit-widths of ``bits`` and the layers of ``model`` they name.

    What every function that quantizes or counts ``bits``' layers checks first: a mapping of
    valid bit-widths, names ``model`` has (:func:`~optuna_ctpe.nn.layers.resolve_layers`) and
    one bit-width per tied tensor.

    Raises:
        TypeError: If ``bits`` is not a mapping.
        ValueError: On bad bit-widths, unknown layer names, modules without a weight, or tied
            layers given different bit-widths.
    """
    checked = check_layer_bits(bits)
    layers = resolve_layers(model, list(checked), "bits")
    _check_tied(layers, checked)
    return checked, layers


def _check_tied(layers: Mapping[str, LayerWeight], bits: Mapping[str, int]) -> None:
    """Refuse two bit-widths for one tensor (tied weights are stored, and quantized, once)."""
    by_tensor: dict[int, dict[str, int]] = {}
    for name, layer in layers.items():
        by_tensor.setdefault(id(layer.weight), {})[name] = bits[name]
    for named in by_tensor.values():
        if len(set(named.values())) > 1:
            raise ValueError(
                f"bits gives the layers {sorted(named)} different bit-widths {named}, but they "
                "share one (tied) weight tensor, which is stored and quantized once."
            )


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of dtype {x.dtype}"
    return type(x).__name__
