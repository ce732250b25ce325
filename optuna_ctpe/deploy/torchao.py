"""A configuration -> torchao's per-layer weight-only quantization (torchao 0.18), for GPU users.

:func:`torchao_config` maps each quantized ``nn.Linear`` to a torchao configuration, keyed by its
module name in a ``FqnToConfig``:

* 8 bits: ``Int8WeightOnlyConfig`` (per-row int8);
* 4 bits or fewer on a CUDA device of compute capability 8.0 or more, with a bfloat16 model
  and an input size divisible by 32: ``Int4WeightOnlyConfig`` with the ``tile_packed_to_4d``
  format, torch's own tinygemm int4 kernel (group-wise, asymmetric: 2- and 3-bit layers then
  run at 4 bits, which is more precise than the searched model);
* otherwise 2 to 7 bits: ``IntxWeightOnlyConfig(weight_dtype=torch.intN,
  granularity=PerAxis(0))`` (one scale per output channel, values kept one per int8).

torchao chooses its own scales (symmetric over ``[-2^(b-1), 2^(b-1) - 1]``), so its weights are
close to, not equal to, this package's fake-quantized ones. Other layers (convolutions,
``nn.MultiheadAttention``'s projections, GPT-2's ``Conv1D``, embeddings) and widths above 8
bits have no torchao weight-only path here: :func:`torchao_config` names them in a warning,
and :func:`quantize_with_torchao` keeps them float with fake-quantized values. On this project's
CPU machines torchao stores sub-8-bit weights one byte each and runs slower than float32
(issue 11): it is the route to GPU kernels, not a CPU speed-up.

**Weight formats** (:mod:`optuna_ctpe.space.formats`):

* :func:`quantize_with_torchao_formats` gives each Linear of a quantized format up to 8 bits
  torchao's ``IntxUnpackedToInt8Tensor`` built from the codes, scales and zero points of a
  :class:`~optuna_ctpe.nn.formats.FormatQuantizer` (GPTQ's included): per-channel
  (``block_size = (1, in_features)``) or per group (``(1, g)``), asymmetric grids with their
  zero points. It dequantizes to the fake-quantized weight bit for bit, so the copy computes
  what :func:`~optuna_ctpe.nn.formats.formats_in_place` computes.
* :func:`torchao_format_config` maps round-to-nearest formats to torchao's own
  ``IntxWeightOnlyConfig(granularity=PerGroup(g) or PerAxis(0), mapping_type=...)``, where
  torchao fits the scales itself: ``"asym"`` is ``MappingType.ASYMMETRIC`` and ``"fullsym"``
  ``MappingType.SYMMETRIC`` (the same grids; torchao's scales are float32 where a group's are
  float16 here, so values differ by rounding). ``"sym"`` (``[-q_max, q_max]``) and GPTQ's
  rounding have no torchao config: a ValueError names the layer and format, and points to
  :func:`quantize_with_torchao_formats`.

Both refuse (a ValueError naming the layer and format) what torchao cannot hold: more than 8
bits, and groups that do not divide a row (torchao's blocks must tile the weight); layers that
are not ``nn.Linear`` keep fake-quantized float weights, named in a warning.

Requires the ``torch`` and ``deploy`` extras (``torchao``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from typing import TYPE_CHECKING
import warnings

import copy

import torch
from torch import nn

from optuna_ctpe.nn.layers import resolve_layers
from optuna_ctpe.nn.quantize import quantize_weight
from optuna_ctpe.nn.apply import apply_config
from optuna_ctpe.space.records import QuantConfig


if TYPE_CHECKING:
    from optuna_ctpe.nn.formats import FormatQuantizer
    from optuna_ctpe.space.formats import WeightFormat
    from optuna_ctpe.space.records import HasSpec
    from optuna_ctpe.space.records import SpaceSpec


__all__ = [
    "quantize_with_torchao",
    "quantize_with_torchao_formats",
    "torchao_config",
    "torchao_format_config",
]

_INSTALL_HINT = 'pip install "optuna-ctpe[deploy]" (torchao)'
#: Group sizes of the tinygemm int4 kernel, the torchao default first.
_INT4_GROUP_SIZES = (128, 64, 32)
_INT8_BITS = 8
_INT4_BITS = 4
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def torchao_config(
    model: nn.Module,
    config: QuantConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """torchao's ``FqnToConfig`` quantizing ``model``'s Linear layers to ``config``'s bits.

    Example:
        .. code-block:: python

            from torchao.quantization import quantize_
            from optuna_ctpe import HessianSearchSpace
            from optuna_ctpe.deploy.torchao import torchao_config
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task(seed=0)
            space = HessianSearchSpace.from_model(
                task.model, task.loss_fn, task.calibration_batches
            )
            config = space.uniform(4)
            net = space.prune(task.model, config)
            mapping = torchao_config(net, config)  # warns: the convolutions stay float
            quantize_(net, mapping, filter_fn=None)

    Args:
        model: The model as it will be quantized: pruned to ``config``'s widths
            (:meth:`HessianSearchSpace.prune <optuna_ctpe.HessianSearchSpace.prune>`) when one
            is below 1, since the int4 group size depends on the pruned input sizes.
        config: The configuration (its ``bits``; layer names are ``model``'s).
        device: Where the model will run; the int4 kernel needs ``"cuda"``.
        dtype: The floating dtype the model will run in (float32, bfloat16 or float16); the
            int4 kernel needs bfloat16.

    Returns:
        A ``torchao.quantization.FqnToConfig`` naming only the layers it quantizes; pass it to
        ``quantize_`` with ``filter_fn=None``.

    Raises:
        ValueError: If ``config`` is not a QuantConfig, names layers ``model`` lacks, or
            ``device``/``dtype`` is not usable (CUDA asked for without a GPU).
        ImportError: If torchao is not installed.
    """
    quantization = _torchao_quantization()
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {config!r}.")
    device = _check_device(device)
    dtype = _check_dtype(dtype)
    int4 = _has_int4_kernel(device, dtype)
    layers = resolve_layers(model, list(config.bits), "config")
    # nn.MultiheadAttention applies its out_proj's weight itself, through an op torchao's
    # tensors do not implement (aten.t).
    attention = {
        f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
    }
    mapped: dict[str, Any] = {}
    for name, bits in config.bits.items():
        layer = layers[name]
        linear = isinstance(layer.module, nn.Linear) and layer.module_name not in attention
        if not linear or bits > _INT8_BITS:
            continue
        group = _int4_group_size(layer.weight.shape[1])
        if bits == _INT8_BITS:
            mapped[name] = quantization.Int8WeightOnlyConfig()
        elif int4 and bits <= _INT4_BITS and group is not None:
            mapped[name] = quantization.Int4WeightOnlyConfig(
                group_size=group, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D
            )
        else:
            mapped[name] = quantization.IntxWeightOnlyConfig(
                weight_dtype=getattr(torch, f"int{bits}"), granularity=PerAxis(0)
            )
    left = {name: bits for name, bits in config.bits.items() if name not in mapped}
    if left:
        warnings.warn(
            f"torchao has no weight-only configuration here for layers {_describe(layers, left)}"
            ": only nn.Linear at 2 to 8 bits is mapped; they stay float (quantize_with_torchao "
            "fake-quantizes them).",
            stacklevel=2,
        )
    return quantization.FqnToConfig(mapped)


def quantize_with_torchao(
    space: SpaceSpec | HasSpec,
    model: nn.Module,
    config: QuantConfig,
    example_inputs: Any = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A copy of ``model`` pruned to ``config``'s widths and quantized by torchao.

    The copy is ``space.prune(model, config, example_inputs)`` moved to ``device`` and
    ``dtype``, in eval mode; its Linear layers are quantized by ``torchao.quantization.quantize_``
    with :func:`torchao_config`, and every other layer of ``config`` gets this package's
    fake-quantized weights (float storage), so the copy computes ``config`` throughout. ``model``
    is not modified.

    Example:
        .. code-block:: python

            from optuna_ctpe import HessianSearchSpace
            from optuna_ctpe.deploy.torchao import quantize_with_torchao
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task(seed=0)
            space = HessianSearchSpace.from_model(
                task.model, task.loss_fn, task.calibration_batches
            )
            net = quantize_with_torchao(space, task.model, space.uniform(8))
            print(task.evaluate(net))  # on a GPU: device="cuda", dtype=torch.bfloat16

    Args:
        space: The search space ``config`` belongs to, or its
            :class:`~optuna_ctpe.space.records.SpaceSpec`.
        model: The float model the space was measured on.
        config: The configuration.
        example_inputs: Inputs for dependency tracing; required when a width is below 1.
        device: Where the copy goes and runs (see :func:`torchao_config`).
        dtype: The copy's floating dtype (see :func:`torchao_config`).

    Raises:
        ValueError: If ``config`` does not fit ``space``, ``model`` is not the measured one, a
            width below 1 is requested without ``example_inputs``, or ``device``/``dtype`` is
            not usable.
        RuntimeError: If torchao left a mapped layer unquantized.
        ImportError: If torchao is not installed.
    """
    device = _check_device(device)
    dtype = _check_dtype(dtype)
    _torchao_quantization()
    net = apply_config(space, model, config, example_inputs, quantize=False)
    net = net.to(device=device, dtype=dtype).eval()
    with warnings.catch_warnings():
        # Named once here, as what happens to them: fake-quantized below.
        warnings.filterwarnings("ignore", message="torchao has no weight-only configuration")
        mapping = torchao_config(net, config, device=device, dtype=dtype)
    layers = resolve_layers(net, list(config.bits), "config")
    left = {n: b for n, b in config.bits.items() if n not in mapping.fqn_to_config}
    if left:
        warnings.warn(
            f"layers {_describe(layers, left)} have no torchao weight-only path: they keep "
            "fake-quantized float weights.",
            stacklevel=2,
        )
    with torch.no_grad():
        for name, bits in left.items():
            weight = layers[name].weight
            weight.copy_(quantize_weight(weight.detach(), bits, layers[name].out_axis))
    from torchao.quantization import quantize_

    quantize_(net, mapping, filter_fn=None)
    skipped = [name for name in mapping.fqn_to_config if type(layers[name].weight) is nn.Parameter]
    if skipped:
        raise RuntimeError(f"torchao left layers {skipped} unquantized.")
    return net


def torchao_format_config(model: nn.Module, formats: Mapping[str, Any]) -> Any:
    """torchao's ``FqnToConfig`` of ``IntxWeightOnlyConfig`` for the Linear layers of
    round-to-nearest formats: ``PerGroup(g)`` or ``PerAxis(0)``, ``ASYMMETRIC`` for ``"asym"``
    and ``SYMMETRIC`` for ``"fullsym"`` (see the module docstring).

    Example:
        .. code-block:: python

            import torch
            from torchao.quantization import quantize_
            from optuna_ctpe.deploy.torchao import torchao_format_config

            model = torch.nn.Sequential(torch.nn.Linear(64, 32))
            quantize_(model, torchao_format_config(model, {"0": "int4-g32-asym-rtn"}),
                      filter_fn=None)

    Args:
        model: The model as it will be quantized.
        formats: Layer name -> format (a :class:`~optuna_ctpe.space.formats.WeightFormat`,
            its name, or a bit-width). Float formats and layers other than ``nn.Linear`` are
            not mapped (the latter named in a warning).

    Returns:
        A ``torchao.quantization.FqnToConfig``; pass it to ``quantize_`` with
        ``filter_fn=None``.

    Raises:
        ValueError: Naming the layer and format, for a ``"sym"`` grid or GPTQ rounding (no
            torchao config: use :func:`quantize_with_torchao_formats`), more than 8 bits, or
            groups that do not divide the layer's inputs.
        ImportError: If torchao is not installed.
    """
    quantization = _torchao_quantization()
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    checked, layers, linear = _format_layers(model, formats)
    mapped: dict[str, Any] = {}
    for name in linear:
        fmt = checked[name]
        if fmt.rounding != "rtn" or fmt.grid == "sym":
            what = "GPTQ's rounding" if fmt.rounding != "rtn" else "the grid [-q_max, q_max]"
            raise ValueError(
                f"layer {name!r}, format {fmt.name!r}: torchao's IntxWeightOnlyConfig fits "
                f"and rounds itself and has no config for {what}; quantize_with_torchao_formats"
                " stores this package's codes exactly."
            )
        group = _torchao_group(name, fmt, layers[name].weight.shape[1])
        mapped[name] = quantization.IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{fmt.bits}"),
            granularity=PerAxis(0) if group is None else PerGroup(group),
            mapping_type=MappingType.ASYMMETRIC if fmt.grid == "asym" else MappingType.SYMMETRIC,
        )
    return quantization.FqnToConfig(mapped)


def quantize_with_torchao_formats(
    model: nn.Module,
    formats: Mapping[str, WeightFormat | str | int],
    quantizer: FormatQuantizer,
) -> nn.Module:
    """A copy of ``model`` whose Linear layers hold torchao ``IntxUnpackedToInt8Tensor``
    weights made of ``quantizer``'s codes, scales and zero points (see the module docstring),
    every other named layer its fake-quantized float weight.

    The copy computes what ``formats_in_place(model, formats, quantizer)`` computes; ``model``
    is not modified.

    Example:
        .. code-block:: python

            import torch
            from optuna_ctpe.deploy.torchao import quantize_with_torchao_formats
            from optuna_ctpe.nn.formats import FormatQuantizer

            model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                        torch.nn.Linear(32, 4))
            batches = [torch.randn(16, 64) for _ in range(4)]
            quantizer = FormatQuantizer(model, calibration_batches=batches)
            net = quantize_with_torchao_formats(
                model, {"0": "int3-g32-asym-gptq", "2": "int4-pc-sym-rtn"}, quantizer
            )

    Args:
        model: The float model ``quantizer`` was built on (float32).
        formats: Layer name -> format (a :class:`~optuna_ctpe.space.formats.WeightFormat`,
            its name, or a bit-width).
        quantizer: The store of quantized weights.

    Returns:
        The copy, in eval mode, on ``model``'s device.

    Raises:
        ValueError: If ``quantizer`` belongs to another model, on unknown layers or bad
            formats, and naming the layer and format for a Linear layer of more than 8 bits or
            with groups that do not divide its inputs.
        ImportError: If torchao is not installed.
    """
    _torchao_quantization()
    from torchao.quantization import IntxUnpackedToInt8Tensor

    if quantizer.model is not model:
        raise ValueError("quantizer was built on another model.")
    checked, layers, linear = _format_layers(model, formats)
    for name in linear:  # refused before anything is computed
        _torchao_group(name, checked[name], layers[name].weight.shape[1])
    values = {name: quantizer.get(layers[name], fmt) for name, fmt in checked.items()}
    tensors = {}
    for name in linear:
        fmt = checked[name]
        codes, fit = quantizer.codes(layers[name], fmt)
        # torchao's int{b} holds [-2^(b-1), 2^(b-1) - 1]: an asymmetric grid's unsigned codes
        # and zero points are shifted down by 2^(b-1), which leaves q - z as it is.
        offset = 2 ** (fmt.bits - 1) if fmt.grid == "asym" else 0
        tensors[name] = IntxUnpackedToInt8Tensor(
            (codes - offset).to(torch.int8),
            fit.scale.float(),
            (fit.zero - offset).to(torch.int8),
            getattr(torch, f"int{fmt.bits}"),
            (1, fit.group_size),
            values[name].dtype,
            None,
        )
    net = copy.deepcopy(model).eval()
    copied = resolve_layers(net, list(checked), "formats")
    with torch.no_grad():
        for name in checked:
            layer = copied[name]
            if name in tensors:
                setattr(layer.module, layer.attr, nn.Parameter(tensors[name], requires_grad=False))
            else:
                layer.weight.copy_(values[name])
    return net


def _format_layers(
    model: nn.Module, formats: Mapping[str, Any]
) -> tuple[dict[str, WeightFormat], dict[str, Any], list[str]]:
    """The checked formats, the layers, and the names of those torchao takes (nn.Linear of a
    quantized format; the others named in a warning)."""
    from optuna_ctpe.space.formats import as_format

    if not isinstance(formats, Mapping):
        raise ValueError(f"formats must be a mapping of layer names to formats, got {formats!r}.")
    checked = {n: as_format(f, f"formats[{n!r}]") for n, f in formats.items()}
    layers = resolve_layers(model, list(checked), "formats")
    attention = {
        f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
    }
    linear, other = [], []
    for name, fmt in checked.items():
        if not fmt.quantized:
            continue
        layer = layers[name]
        if isinstance(layer.module, nn.Linear) and layer.module_name not in attention:
            linear.append(name)
        else:
            other.append(f"{name!r} ({type(layer.module).__name__}, {fmt.name})")
    if other:
        warnings.warn(
            f"torchao has no weight-only path here for layers {', '.join(other)}: only "
            "nn.Linear is mapped; they keep fake-quantized float weights.",
            stacklevel=3,
        )
    return checked, layers, linear


def _torchao_group(name: str, fmt: WeightFormat, in_features: int) -> int | None:
    """torchao's group size for ``fmt`` on rows of ``in_features`` (None: per channel, also
    for a group longer than the row), or a ValueError naming the layer and format."""
    if fmt.bits > _INT8_BITS:
        raise ValueError(
            f"layer {name!r}, format {fmt.name!r}: torchao's integer weights hold at most "
            f"{_INT8_BITS} bits."
        )
    if fmt.group_size is None or fmt.group_size >= in_features:
        return None
    if in_features % fmt.group_size:
        raise ValueError(
            f"layer {name!r}, format {fmt.name!r}: torchao's groups must divide the "
            f"{in_features} inputs of a row; {fmt.group_size} does not."
        )
    return fmt.group_size


def _torchao_quantization() -> Any:
    try:
        import torchao.quantization
    except ImportError as e:
        raise ImportError(f"the torchao export needs {_INSTALL_HINT}: {e}") from e
    return torchao.quantization


def _check_device(device: Any) -> torch.device:
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device, got {device!r}: {e}") from e
    if checked.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {device!r} but CUDA is not available.")
    return checked


def _check_dtype(dtype: Any) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}.")
    return dtype


def _has_int4_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's tinygemm int4 kernel runs there: CUDA >= 8.0 in bfloat16."""
    return (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


def _int4_group_size(in_features: int) -> int | None:
    """The largest tinygemm group size dividing ``in_features`` (torchao skips the layer
    silently otherwise)."""
    return next((g for g in _INT4_GROUP_SIZES if in_features % g == 0), None)


def _describe(layers: Mapping[str, Any], bits: Mapping[str, int]) -> str:
    return ", ".join(
        f"{name!r} ({type(layers[name].module).__name__}, {b} bits)" for name, b in bits.items()
    )
