"""One-layer ONNX graphs of a model's layers, and their timing: the cells of a latency table.

A *cell* is one layer at one combination of the width ratios of the groups that prune it: its
width-pruned weight, bias and hyper-parameters, and the shape of its input, captured by a
forward hook on the pruned model. :func:`time_cell` builds the cell's graph as the dynamo
exporter writes the layer (``Conv``/``ConvTranspose``; ``Gemm`` with ``transB`` for a Linear
on a matrix, ``MatMul`` by the transposed weight plus ``Add`` otherwise; ``MatMul`` plus
``Add`` for a Hugging Face ``Conv1D``), stores its weight with
:func:`~optuna_ctpe.deploy._onnx_graph.quantize_graph` as :func:`export_onnx` does, and times
one graph per distinct storage interleaved with the float one.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
import itertools
from typing import Any
from typing import TYPE_CHECKING

import numpy as np


if TYPE_CHECKING:
    import onnx
    import torch

    from optuna_ctpe.deploy.latency import OrtRuntime
    from optuna_ctpe.deploy.latency import Timing
    from optuna_ctpe.space.records import SpaceSpec


#: The IR version of the graphs: the first that opset 21 needs, which onnxruntime 1.32 reads.
_IR_VERSION = 10
#: The layer types a one-layer graph is built for (:data:`optuna_ctpe.nn.layers.LAYER_TYPES`).
_CONV = "Conv1d/Conv2d/Conv3d"
_CONV_TRANSPOSE = "ConvTranspose1d/2d/3d"
_LINEAR = "Linear"
_HF_CONV1D = "transformers Conv1D"


@dataclass(frozen=True)
class Cell:
    """One layer at one combination of width ratios.

    Attributes:
        layer: The layer name.
        groups: The width groups that prune its weight.
        ratios: One width ratio per group.
        kind: Its type's name in :data:`~optuna_ctpe.nn.layers.LAYER_TYPES`.
        out_axis: The weight axis holding the output channels.
        weight: The width-pruned float32 weight.
        bias: The float32 bias, or None.
        attributes: The ONNX attributes of a convolution (empty for matrix products).
        input_shape: The shape of the layer's input.
    """

    layer: str
    groups: tuple[str, ...]
    ratios: tuple[float, ...]
    kind: str
    out_axis: int
    weight: np.ndarray
    bias: np.ndarray | None
    attributes: Mapping[str, Any]
    input_shape: tuple[int, ...]


def layer_groups(spec: SpaceSpec) -> dict[str, tuple[str, ...]]:
    """Layer name -> the width groups pruning its weight (either dimension), for every layer."""
    groups: dict[str, tuple[str, ...]] = {name: () for name in spec.layers}
    for tensor in spec.tensors:
        if tensor.layer in groups:
            found = (tensor.out_group, tensor.in_group)
            groups[tensor.layer] = tuple(dict.fromkeys(g for g in found if g is not None))
    return groups


def layer_cells(spec: SpaceSpec, model: torch.nn.Module, inputs: Any) -> list[Cell]:
    """Every layer of ``spec`` at every combination of ``spec.widths`` over its groups.

    The model is pruned once per distinct combination (the other groups at full width) and run
    on ``inputs``, whose shapes the layers' inputs then have.

    Raises:
        ValueError: If a layer is of a type without a one-layer graph, or the model's forward
            pass does not call it.
    """
    import torch

    from optuna_ctpe.deploy.onnx import call_arguments
    from optuna_ctpe.nn.apply import apply_config
    from optuna_ctpe.nn.layers import layer_type
    from optuna_ctpe.nn.layers import resolve_layers
    from optuna_ctpe.space.params import uniform_config

    groups = layer_groups(spec)
    # Width assignment -> the (layer, ratios) cells it serves.
    wanted: dict[tuple[tuple[str, float], ...], list[tuple[str, tuple[float, ...]]]] = {}
    for name, names in groups.items():
        for ratios in itertools.product(spec.widths, repeat=len(names)):
            key = tuple(sorted(zip(names, ratios)))
            wanted.setdefault(key, []).append((name, tuple(float(r) for r in ratios)))
    full = uniform_config(spec, max(spec.bits))
    args, kwargs = call_arguments(inputs)
    cells = []
    for assignment, served in wanted.items():
        config = type(full)(full.bits, {**full.widths, **dict(assignment)})
        net = apply_config(spec, model, config, inputs, quantize=False).cpu().eval()
        layers = resolve_layers(net, [name for name, _ in served], "space")
        shapes: dict[str, tuple[int, ...]] = {}
        hooks = [
            layers[name].module.register_forward_hook(_shape_hook(shapes, name))
            for name, _ in served
        ]
        try:
            with torch.no_grad():
                net(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        for name, ratios in served:
            layer = layers[name]
            kind = layer_type(layer.module)
            if layer.attr != "weight" or kind is None:
                raise ValueError(
                    f"layer {name!r} ({type(layer.module).__name__}.{layer.attr}) has no "
                    "one-layer latency graph (Conv, ConvTranspose, Linear and Conv1D do): "
                    "time whole models instead (ModelTimer, --latency-source measured)."
                )
            if name not in shapes:
                raise ValueError(
                    f"the model's forward pass on example_inputs never calls {name!r}."
                )
            bias = getattr(layer.module, "bias", None)
            cells.append(
                Cell(
                    layer=name,
                    groups=groups[name],
                    ratios=ratios,
                    kind=kind.name,
                    out_axis=layer.out_axis,
                    weight=layer.weight.detach().float().numpy().copy(),
                    bias=None if bias is None else bias.detach().float().numpy().copy(),
                    attributes=(
                        _conv_attributes(layer.module)
                        if kind.name in (_CONV, _CONV_TRANSPOSE)
                        else {}
                    ),
                    input_shape=shapes[name],
                )
            )
    return cells


def _shape_hook(shapes: dict[str, tuple[int, ...]], name: str) -> Any:
    def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
        shapes.setdefault(name, tuple(args[0].shape))

    return hook


def _conv_attributes(module: Any) -> dict[str, Any]:
    """The ONNX attributes of a torch convolution (zero padding: another ``padding_mode``
    adds a Pad node, left to the remainder)."""
    kernel = list(module.kernel_size)
    dilation = list(module.dilation)
    if isinstance(module.padding, str):  # "valid", or "same" (onnx's SAME_UPPER split)
        total = [d * (k - 1) if module.padding == "same" else 0 for d, k in zip(dilation, kernel)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        pads = list(module.padding) * 2
    attrs = {
        "kernel_shape": kernel,
        "strides": list(module.stride),
        "dilations": dilation,
        "pads": pads,
        "group": int(module.groups),
    }
    if module.transposed:
        attrs["output_padding"] = list(module.output_padding)
    return attrs


def float_graph(cell: Cell, opset: int) -> onnx.ModelProto:
    """The cell's one-layer graph with a float32 weight, as the dynamo exporter writes it."""
    from onnx import helper
    from onnx import numpy_helper
    from onnx import TensorProto

    inits = []
    nodes = []
    bias = [] if cell.bias is None else ["bias"]
    if cell.bias is not None:
        inits.append(numpy_helper.from_array(cell.bias, "bias"))
    if cell.kind in (_CONV, _CONV_TRANSPOSE):
        op = "Conv" if cell.kind == _CONV else "ConvTranspose"
        inits.append(numpy_helper.from_array(cell.weight, "weight"))
        nodes.append(helper.make_node(op, ["x", "weight", *bias], ["y"], **cell.attributes))
    elif cell.kind == _LINEAR and len(cell.input_shape) == 2:
        inits.append(numpy_helper.from_array(cell.weight, "weight"))
        nodes.append(helper.make_node("Gemm", ["x", "weight", *bias], ["y"], transB=1))
    elif cell.kind in (_LINEAR, _HF_CONV1D):
        # The exporter folds a Linear's transpose into a (K, N) initializer.
        w = cell.weight.T if cell.kind == _LINEAR else cell.weight
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w), "weight"))
        product = "y" if cell.bias is None else "product"
        nodes.append(helper.make_node("MatMul", ["x", "weight"], [product]))
        if cell.bias is not None:
            nodes.append(helper.make_node("Add", [product, "bias"], ["y"]))
    else:  # layer_cells admits no other kind
        raise ValueError(f"no one-layer graph for layer {cell.layer!r} of kind {cell.kind!r}.")
    graph = helper.make_graph(
        nodes,
        f"latency_{cell.layer}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(cell.input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = _IR_VERSION
    return model


def quantized_graph(cell: Cell, bits: int, opset: int) -> tuple[onnx.ModelProto, tuple[Any, ...]]:
    """The cell's graph with its weight stored at ``bits`` as :func:`export_onnx` stores it,
    and the storage (operator, container bits, block size): equal storages run equal graphs."""
    from optuna_ctpe.deploy._onnx_graph import integer_weight
    from optuna_ctpe.deploy._onnx_graph import quantize_graph

    model = float_graph(cell, opset)
    weight = integer_weight(cell.layer, cell.weight, bits, cell.out_axis)
    (stored,) = quantize_graph(model, {cell.layer: weight}, opset=opset).values()
    return model, (stored.operator, stored.container_bits, stored.block_size)


def time_cell(
    cell: Cell,
    bits: Sequence[int],
    runtime: OrtRuntime,
    opset: int,
    *,
    repeats: int,
    warmup: int,
) -> tuple[dict[int, Timing], Timing]:
    """Time the cell's graphs, one per distinct storage, interleaved with each other and with
    an ``Identity`` graph on the same input, whose time is the runtime's cost of a call.

    Returns:
        Bit-width (and :data:`FLOAT_BITS`) -> the timing of its graph, and the call's timing.
    """
    from optuna_ctpe.deploy.latency import time_calls
    from optuna_ctpe.space.size import FLOAT_BITS

    graphs: dict[Any, bytes] = {
        "call": _identity_graph(cell.input_shape, opset).SerializeToString(),
        "float": float_graph(cell, opset).SerializeToString(),
    }
    storage_of: dict[int, Any] = {FLOAT_BITS: "float"}
    for b in bits:
        model, storage = quantized_graph(cell, b, opset)
        storage_of[b] = storage
        graphs.setdefault(storage, model.SerializeToString())
    x = np.random.default_rng(0).standard_normal(cell.input_shape).astype(np.float32)
    calls = []
    for graph in graphs.values():
        session = runtime.session(graph)
        calls.append(lambda session=session: session.run(None, {"x": x}))
    timings = dict(
        zip(graphs, time_calls(calls, repeats=repeats, warmup=warmup, rounds=min(10, repeats)))
    )
    return {b: timings[storage] for b, storage in storage_of.items()}, timings["call"]


def _identity_graph(shape: tuple[int, ...], opset: int) -> onnx.ModelProto:
    """A graph that returns its input: what a call costs before any layer runs."""
    from onnx import helper
    from onnx import TensorProto

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "latency_call",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = _IR_VERSION
    return model
