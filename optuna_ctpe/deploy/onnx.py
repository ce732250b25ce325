"""A configuration -> an ONNX graph with real low-bit weights, which onnxruntime runs on CPU.

:func:`export_onnx` exports the width-pruned, fake-quantized copy that
:meth:`HessianSearchSpace.apply <optuna_ctpe.HessianSearchSpace.apply>` makes, with
``torch.onnx.export``'s dynamo exporter, then stores each quantized layer's weight as integers
(:mod:`optuna_ctpe.deploy._onnx_graph`): onnxruntime's ``MatMulNBits`` for the weights of
matrix products at 2, 4 or 8 bits (3 bits stored at 4, 5 to 7 at 8), ``DequantizeLinear`` with
per-channel scales for the others (convolutions; int4 containers from opset 21, int8, and int16
above 8 bits). Biases, normalisation and unquantized layers stay float32. The file is then
about the size :meth:`HessianSearchSpace.size` accounts, plus one float32 scale per output
channel (per block, for MatMulNBits), the padding of each container and the graph (without
the exporter's per-node stack traces, which are dropped).

The weights dequantize to the fake-quantized values (to a rounding step of float32), so
onnxruntime computes what the PyTorch copy computes up to the order of float32 sums:
:func:`export_onnx` checks this on ``example_inputs`` and reports the largest difference (a few
1e-7 relative to the largest output on the digits CNN and a tiny BERT; the tests allow 1e-5).
Activations stay float: a :class:`~optuna_ctpe.space.records.QuantConfig` holds no activation
bit-widths.

Speed on a CPU (``benchmarks/results/onnx_runtime.md``, digits CNN, one thread): onnxruntime
keeps DequantizeLinear of constant weights unfolded by default (for its QDQ fusions), so the
convolutions are not pre-packed and ran about twice as slow as FP32; the session option
``session.disable_quant_qdq = 1`` (``SessionOptions.add_session_config_entry``) folds them
into float32 weights when the session loads: FP32 speed from the small file. MatMulNBits ran
at FP32 speed at 4 bits and 3 to 4 times slower at 2 and 8 bits (batch 1).

**Weight formats**: :func:`export_onnx_formats` exports a model with one
:class:`~optuna_ctpe.space.formats.WeightFormat` per layer, quantized by a
:class:`~optuna_ctpe.nn.formats.FormatQuantizer`: matrix products as MatMulNBits with
``block_size`` = the group (or the largest power of two from 16 dividing it) and packed zero
points where the grid is asymmetric; convolutions as blocked DequantizeLinear (opset 21; before
it, one row per group, with a warning naming the layer); see
:mod:`optuna_ctpe.deploy._onnx_graph`. onnxruntime's outputs match the fake-quantized PyTorch
model within 1e-5 relative (tested on every grid, group size and rounding).

Requires the ``torch`` and ``deploy`` extras (``onnx``, ``onnxscript``, ``onnxruntime``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
import os
from pathlib import Path
import types
from typing import Any
from typing import TYPE_CHECKING
import warnings

import torch
from torch import nn
from torch.utils import _pytree as pytree

from optuna_ctpe._validation import check_integer
from optuna_ctpe.nn.apply import apply_config
from optuna_ctpe.nn.layers import resolve_layers
from optuna_ctpe.space.checks import check_config
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import spec_of
from optuna_ctpe.space.size import size_bits


if TYPE_CHECKING:
    from optuna_ctpe.deploy._onnx_graph import OnnxLayer
    from optuna_ctpe.nn.formats import FormatQuantizer
    from optuna_ctpe.space.formats import WeightFormat
    from optuna_ctpe.space.records import HasSpec
    from optuna_ctpe.space.records import SpaceSpec


__all__ = [
    "DEFAULT_OPSET",
    "OnnxExport",
    "call_arguments",
    "export_onnx",
    "export_onnx_formats",
    "export_proto",
]

#: The default ONNX opset, the first with int4 and int16 DequantizeLinear inputs.
DEFAULT_OPSET = 21
#: The oldest opset the dynamo exporter writes.
MIN_OPSET = 18
_INSTALL_HINT = 'pip install "optuna-ctpe[deploy]" (onnx, onnxscript, onnxruntime)'


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: The ONNX file.
        file_bytes: Its size in bytes.
        accounted_bytes: ``space.size(config) / 8``: the size the search accounted.
        opset: The default-domain opset of the graph.
        layers: Layer name -> how its weight is stored
            (:class:`~optuna_ctpe.deploy._onnx_graph.OnnxLayer`: operator, container bits,
            MatMulNBits block size), for every quantized layer.
        max_abs_diff: The largest absolute difference between onnxruntime's outputs and the
            fake-quantized PyTorch model's on ``example_inputs``; None without ``verify``.
        max_rel_diff: ``max_abs_diff`` divided by the largest absolute output of the PyTorch
            model; None without ``verify``.
    """

    path: Path
    file_bytes: int
    accounted_bytes: float
    opset: int
    layers: Mapping[str, OnnxLayer] = field(hash=False)
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", types.MappingProxyType(dict(self.layers)))

    @property
    def operators(self) -> dict[str, int]:
        """Operator (``"MatMulNBits"``, ``"DequantizeLinear"``, ``"float"``) -> its layers."""
        counts: dict[str, int] = {}
        for layer in self.layers.values():
            counts[layer.operator] = counts.get(layer.operator, 0) + 1
        return counts


def _checked_arguments(
    path: Any,
    example_inputs: Any,
    opset: Any,
    accuracy_level: Any,
    dynamic_batch: Any,
    verify: Any,
) -> tuple[Any, int, int]:
    """The arguments both exporters share, checked: ``(onnx module, opset, accuracy_level)``.

    Raises:
        ValueError: Naming the first bad argument and its value.
        ImportError: If ``onnx`` is missing.
    """
    onnx = _require("onnx")
    opset = check_integer(
        opset, "opset", minimum=MIN_OPSET, maximum=onnx.defs.onnx_opset_version()
    )
    accuracy_level = check_integer(accuracy_level, "accuracy_level", minimum=0, maximum=4)
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike, got {path!r}.")
    if example_inputs is None:
        raise ValueError("example_inputs is required: the exporter traces the model on them.")
    for flag, name in ((dynamic_batch, "dynamic_batch"), (verify, "verify")):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}.")
    return onnx, opset, accuracy_level


def export_onnx(
    space: SpaceSpec | HasSpec,
    model: nn.Module,
    config: QuantConfig,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    accuracy_level: int = 0,
    verify: bool = True,
    configured: nn.Module | None = None,
) -> OnnxExport:
    """Write ``model`` under ``config`` as an ONNX file with integer weights.

    The model exported is ``space.apply(model, config, example_inputs)`` in eval mode, on the
    CPU, traced on ``example_inputs`` by ``torch.onnx.export(dynamo=True)``; ``model`` is not
    modified. Each quantized layer's weight is stored as described in the module docstring; a
    layer whose weight the graph does not hold as one initializer (a weight the model's forward
    slices or reshapes) stays float32 with its fake-quantized values, and a warning names it.
    The file is one protobuf, so the graph must stay under protobuf's 2 GB.

    Example:
        .. code-block:: python

            import onnxruntime
            from optuna_ctpe import HessianSearchSpace
            from optuna_ctpe.deploy.onnx import export_onnx
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task(seed=0)
            space = HessianSearchSpace.from_model(
                task.model, task.loss_fn, task.calibration_batches,
                example_inputs=task.example_inputs,
            )
            report = export_onnx(
                space, task.model, space.uniform(4), "digits.onnx", task.example_inputs
            )
            print(report.file_bytes, report.accounted_bytes, report.operators)
            session = onnxruntime.InferenceSession("digits.onnx")

    Args:
        space: The search space ``config`` belongs to.
        model: The float model the space was measured on, float32.
        config: The configuration to export.
        path: The ONNX file to write (overwritten); its folder must exist.
        example_inputs: The model's inputs for tracing, pruning and the check: a tensor, a
            tuple of positional inputs, or a mapping of keyword inputs (``{"input_ids": ids}``).
        opset: The default-domain ONNX opset, an integer in [18, the installed ``onnx``'s
            newest]. From 21, weights of 4 bits or fewer that DequantizeLinear reads are stored
            in int4 and those above 8 bits in int16 (int8 and int32 before).
        dynamic_batch: Let the first dimension of every input vary (otherwise the graph only
            takes ``example_inputs``' shapes).
        accuracy_level: MatMulNBits' ``accuracy_level``, an integer in [0, 4]: 0 computes in
            float32 (outputs match PyTorch); 4 quantizes activations to int8 inside the
            product (faster on some CPUs, no longer the searched model's outputs).
        verify: Run the file with onnxruntime on ``example_inputs`` and report the largest
            difference to the PyTorch model (needs ``onnxruntime``).
        configured: The model to export instead of ``space.apply(model, config,
            example_inputs)``: an already configured model of that architecture whose
            quantized weights hold ``config``'s integer grid, e.g. after quantization-aware
            fine-tuning. ``model`` is then used for nothing else.

    Returns:
        The :class:`OnnxExport` report.

    Raises:
        ValueError: If ``config`` does not fit ``space``, ``model`` is not the measured model,
            ``example_inputs`` is None, a quantized weight is not float32, or an argument is
            out of range (named with its value).
        RuntimeError: With ``verify``, if the graph's inputs or outputs do not correspond to
            the model's.
        ImportError: If ``onnx``/``onnxscript`` (or, with ``verify``, ``onnxruntime``) is
            missing.
    """
    onnx, opset, accuracy_level = _checked_arguments(
        path, example_inputs, opset, accuracy_level, dynamic_batch, verify
    )
    _require("onnxscript")  # the dynamo exporter's dependency, named before a long trace
    if verify:
        _require("onnxruntime")
    from optuna_ctpe.deploy._onnx_graph import quantize_graph
    from optuna_ctpe.deploy._onnx_graph import strip_node_metadata

    spec = spec_of(space)
    if configured is None:
        configured = apply_config(spec, model, config, example_inputs)
    elif not isinstance(configured, nn.Module):
        raise ValueError(f"configured must be a torch.nn.Module, got {type(configured).__name__}.")
    net = configured.cpu().eval()
    args, kwargs = call_arguments(example_inputs)
    weights = _integer_weights(net, config)
    proto = export_proto(net, args, kwargs, opset, dynamic_batch)
    strip_node_metadata(proto.graph)
    layers = quantize_graph(proto, weights, opset=opset, accuracy_level=accuracy_level)
    left = [name for name, layer in layers.items() if layer.operator == "float"]
    if left:
        warnings.warn(
            f"layers {left} are not one weight initializer of the exported graph (the "
            "exporter sliced or reshaped them); they stay float32 with fake-quantized values.",
            stacklevel=2,
        )
    path = Path(path)
    onnx.save_model(proto, path)
    abs_diff = rel_diff = None
    if verify:
        abs_diff, rel_diff = _difference(path, net, args, kwargs)
    return OnnxExport(
        path=path,
        file_bytes=path.stat().st_size,
        accounted_bytes=size_bits(spec, check_config(spec, config)) / 8,
        opset=opset,
        layers=layers,
        max_abs_diff=abs_diff,
        max_rel_diff=rel_diff,
    )


def export_onnx_formats(
    model: nn.Module,
    formats: Mapping[str, WeightFormat | str | int],
    quantizer: FormatQuantizer,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    accuracy_level: int = 0,
    verify: bool = True,
) -> OnnxExport:
    """Write ``model`` with each named layer's weight in its format as an ONNX file with
    integer weights, codes, scales and zero points as ``quantizer`` made them.

    The model exported is ``model`` inside :func:`~optuna_ctpe.nn.formats.formats_in_place`
    ``(model, formats, quantizer)``, in eval mode on the CPU (``model`` is left as it was).
    Matrix products take MatMulNBits, the other weights DequantizeLinear (see the module
    docstring); a float format's layer (``fp16``, ``fp32``) stays a float32 initializer of its
    values.

    Example:
        .. code-block:: python

            import torch
            from optuna_ctpe.deploy.onnx import export_onnx_formats
            from optuna_ctpe.nn.formats import FormatQuantizer

            model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                        torch.nn.Linear(32, 4))
            batches = [torch.randn(16, 64) for _ in range(4)]
            quantizer = FormatQuantizer(model, calibration_batches=batches)
            formats = {"0": "int4-g32-asym-gptq", "2": "int8-pc-sym-rtn"}
            report = export_onnx_formats(model, formats, quantizer, "net.onnx", batches[0])
            report.layers["0"].block_size, report.max_rel_diff  # 32, about 1e-7

    Args:
        model: The float32 model ``quantizer`` was built on.
        formats: Layer name -> format (a :class:`~optuna_ctpe.space.formats.WeightFormat`,
            its name, or a bit-width meaning the legacy format). Layers not named stay float.
        quantizer: The store of quantized weights.
        path: The ONNX file to write (overwritten); its folder must exist.
        example_inputs: The model's inputs for tracing and the check (a tensor, a tuple, or
            a mapping of keyword inputs).
        opset: The default-domain ONNX opset, an integer in [18, the installed ``onnx``'s
            newest]; blocked DequantizeLinear and int4/uint4/int16/uint16 containers need 21.
        dynamic_batch: Let the first dimension of every input vary.
        accuracy_level: MatMulNBits' ``accuracy_level``, an integer in [0, 4] (0: float32).
        verify: Run the file with onnxruntime on ``example_inputs`` and report the largest
            difference to the fake-quantized PyTorch model.

    Returns:
        The :class:`OnnxExport` report; ``accounted_bytes`` is
        :func:`~optuna_ctpe.space.formats.format_bits` of each named layer plus 32 bits per
        element of every other parameter, over 8.

    Raises:
        ValueError: If ``quantizer`` belongs to another model, on unknown layers or bad
            formats, if a quantized weight is not float32, ``example_inputs`` is None, or an
            argument is out of range.
        ImportError: If ``onnx``/``onnxscript`` (or, with ``verify``, ``onnxruntime``) is
            missing.
    """
    from optuna_ctpe.nn.formats import formats_in_place
    from optuna_ctpe.space.formats import as_format
    from optuna_ctpe.space.formats import format_bits

    onnx, opset, accuracy_level = _checked_arguments(
        path, example_inputs, opset, accuracy_level, dynamic_batch, verify
    )
    if not isinstance(formats, Mapping):
        raise ValueError(f"formats must be a mapping of layer names to formats, got {formats!r}.")
    _require("onnxscript")
    if verify:
        _require("onnxruntime")
    from optuna_ctpe.deploy._onnx_graph import quantize_graph
    from optuna_ctpe.deploy._onnx_graph import strip_node_metadata

    checked = {n: as_format(f, f"formats[{n!r}]") for n, f in formats.items()}
    layers_of = resolve_layers(model, list(checked), "formats")
    args, kwargs = call_arguments(example_inputs)
    training = model.training
    path = Path(path)
    # Read before the weights are swapped: inside the block the quantizer would see a changed
    # weight and quantize the quantized one again.
    weights = _format_weights(layers_of, checked, quantizer)
    try:
        with formats_in_place(model.eval(), checked, quantizer) as net:
            proto = export_proto(net, args, kwargs, opset, dynamic_batch)
            strip_node_metadata(proto.graph)
            layers = quantize_graph(proto, weights, opset=opset, accuracy_level=accuracy_level)
            unblocked = [
                n
                for n, layer in layers.items()
                if layer.operator == "DequantizeLinear"
                and weights[n].scale.ndim == 2
                and weights[n].scale.shape[1] > 1
                and opset < 21
            ]
            if unblocked:
                warnings.warn(
                    f"layers {unblocked} have groups, which DequantizeLinear takes as blocks "
                    f"from opset 21 only; at opset {opset} each group is stored as a row of "
                    "a per-channel DequantizeLinear (exact, the last group padded).",
                    stacklevel=2,
                )
            left = [n for n, layer in layers.items() if layer.operator == "float"]
            if left:
                warnings.warn(
                    f"layers {left} are not one weight initializer of the exported graph (the "
                    "exporter sliced or reshaped them); they stay float32 with fake-quantized "
                    "values.",
                    stacklevel=2,
                )
            onnx.save_model(proto, path)
            abs_diff = rel_diff = None
            if verify:
                abs_diff, rel_diff = _difference(path, net, args, kwargs)
    finally:
        model.train(training)
    accounted = 0
    named = {id(layers_of[n].weight): (layers_of[n], checked[n]) for n in checked}
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) not in named:
            accounted += 32 * p.numel()
            continue
        layer, fmt = named[id(p)]
        rows = p.shape[layer.out_axis] if p.dim() > 1 else p.numel()
        accounted += format_bits(fmt, rows, max(p.numel() // max(rows, 1), 1))
    return OnnxExport(
        path=path,
        file_bytes=path.stat().st_size,
        accounted_bytes=accounted / 8,
        opset=opset,
        layers=layers,
        max_abs_diff=abs_diff,
        max_rel_diff=rel_diff,
    )


def _format_weights(
    layers: Mapping[str, Any], formats: Mapping[str, WeightFormat], quantizer: FormatQuantizer
) -> dict[str, Any]:
    """Layer name -> :class:`~optuna_ctpe.deploy._onnx_graph.IntegerWeight` of every layer of a
    quantized format, from ``quantizer``'s values, codes and grids."""
    from optuna_ctpe.deploy._onnx_graph import IntegerWeight

    weights = {}
    for name, fmt in formats.items():
        if not fmt.quantized:
            continue
        layer = layers[name]
        weight = quantizer.get(layer, fmt)
        if weight.dtype != torch.float32:
            raise ValueError(
                f"export_onnx_formats needs float32 weights; layer {name!r} is {weight.dtype}: "
                "convert the model with model.float() first."
            )
        codes, fit = quantizer.codes(layer, fmt)
        axis = layer.out_axis
        moved = list(weight.shape)
        moved[0], moved[axis] = moved[axis], moved[0]
        if weight.dim() > 1:
            q = codes.reshape(moved).transpose(0, axis).numpy()
        else:
            q = codes.reshape(weight.shape).numpy()
        weights[name] = IntegerWeight(
            name,
            fmt.bits,
            axis,
            weight.cpu().numpy(),
            q,
            fit.scale.numpy(),
            None if fmt.grid != "asym" else fit.zero.numpy().astype("int64"),
            fit.group_size if fmt.group_size is not None else None,
        )
    return weights


def _require(module: str) -> Any:
    """``import module``, or an ImportError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"export_onnx needs {_INSTALL_HINT}: {e}", name=module) from e


def call_arguments(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword inputs on the CPU, from a tensor, a tuple or a mapping: how
    every exporter and timer of :mod:`optuna_ctpe.deploy` calls a model on example inputs.

    Example:
        .. code-block:: python

            import torch
            from optuna_ctpe.deploy.onnx import call_arguments

            call_arguments({"input_ids": torch.ones(1, 8, dtype=torch.long)})
            # ((), {"input_ids": tensor([[1, 1, 1, 1, 1, 1, 1, 1]])})

    Args:
        example_inputs: A tensor (one positional input), a tuple or list of positional inputs,
            or a mapping of keyword inputs.

    Returns:
        ``(args, kwargs)`` with every tensor moved to the CPU.
    """
    if isinstance(example_inputs, Mapping):
        args: tuple[Any, ...] = ()
        kwargs = dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    return pytree.tree_map(_to_cpu, args), pytree.tree_map(_to_cpu, kwargs)


def _to_cpu(value: Any) -> Any:
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _integer_weights(net: nn.Module, config: QuantConfig) -> dict[str, Any]:
    """Layer name -> :class:`~optuna_ctpe.deploy._onnx_graph.IntegerWeight` of ``net``.

    The integers and scales are those the packed artifact stores (:mod:`~optuna_ctpe.deploy.
    _codec`): their product is the fake-quantized weight bit for bit.
    """
    from optuna_ctpe.deploy._codec import exact_integers
    from optuna_ctpe.deploy._onnx_graph import IntegerWeight

    layers = resolve_layers(net, list(config.bits), "config")
    weights = {}
    for name, bits in config.bits.items():
        weight = layers[name].weight.detach()
        if weight.dtype != torch.float32:
            raise ValueError(
                f"export_onnx needs float32 weights; layer {name!r} is {weight.dtype}: "
                "convert the model with model.float() first."
            )
        axis = layers[name].out_axis
        q, scale = exact_integers(name, weight, bits, axis)
        weights[name] = IntegerWeight(name, bits, axis, weight.numpy(), q.numpy(), scale.numpy())
    return weights


def export_proto(
    net: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    opset: int,
    dynamic_batch: bool,
) -> Any:
    """The ONNX ``ModelProto`` of ``net`` traced on the inputs by the dynamo exporter, with the
    weights as they are (no integer storage: :func:`export_onnx` adds that).

    Args:
        net: The model, on the CPU, in the mode to export (eval for inference).
        args, kwargs: Its inputs, as :func:`call_arguments` returns them.
        opset: The default-domain ONNX opset.
        dynamic_batch: Let the first dimension of every input vary.

    Raises:
        ImportError: If ``onnxscript`` (the exporter's dependency) is missing.
    """
    dynamic = None
    if dynamic_batch:

        def batch_dim(value: Any) -> Any:
            is_batched = isinstance(value, torch.Tensor) and value.dim() > 0
            return {0: torch.export.Dim.DYNAMIC} if is_batched else None

        dynamic = pytree.tree_map(batch_dim, kwargs if kwargs else args)
    program = torch.onnx.export(
        net,
        args,
        kwargs=kwargs or None,
        dynamo=True,
        opset_version=opset,
        dynamic_shapes=dynamic,
        verbose=False,
    )
    return program.model_proto


def _difference(
    path: Path, net: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[float, float]:
    """Largest absolute and relative output difference of onnxruntime and ``net``."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(leaves):
        # The exporter drops inputs the graph does not use: the order no longer tells which.
        raise RuntimeError(
            f"the graph takes inputs {names} but example_inputs hold {len(leaves)} tensors; "
            "pass only the inputs the model uses, or verify=False."
        )
    feed = {name: t.numpy() for name, t in zip(names, leaves)}
    got = session.run(None, feed)
    with torch.no_grad():
        outputs = net(*args, **kwargs)
    expected = [t.numpy() for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
        raise RuntimeError(
            f"onnxruntime returned outputs of shapes {[g.shape for g in got]} where the model "
            f"returns {[e.shape for e in expected]}."
        )
    abs_diff = max(float(np.abs(g - e).max(initial=0.0)) for g, e in zip(got, expected))
    scale = max(float(np.abs(e).max(initial=0.0)) for e in expected)
    return abs_diff, abs_diff / scale if scale > 0 else abs_diff
