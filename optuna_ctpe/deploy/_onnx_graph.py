"""Integer weights in an exported ONNX graph: the graph surgery behind :func:`export_onnx`.

The exporter writes every weight as a float32 initializer. Each initializer holding a quantized
layer's fake-quantized weight (or its transpose: MatMul weights are folded to ``(K, N)``) is
found by content and replaced by integers and per-channel scales:

* a weight that only ever feeds MatMul (as ``B``) or Gemm (as ``B``, plain ``alpha = beta = 1``,
  no ``transA``, a 1-D bias) becomes onnxruntime's ``com.microsoft.MatMulNBits``, which
  onnxruntime 1.32 accepts at 2, 4 and 8 bits only: other widths up to 8 are stored in the next
  larger of those, where the same integers dequantize to the same values;
* any other weight (convolutions, embeddings, wider than 8 bits, odd consumers) becomes an
  integer initializer feeding ``DequantizeLinear`` with per-channel scales, whose output keeps
  the initializer's name, so every consumer reads the same values as before.

Our quantization is symmetric per output channel (``w = q * s``, ``|q| <= 2^(b-1) - 1``), which
both operators represent exactly: MatMulNBits with its default zero point ``2^(c-1)`` of a
``c``-bit container and the channel's scale repeated in every block of the row, DequantizeLinear
with a signed container and no zero point. Pure numpy and ``onnx``: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import hashlib

import ml_dtypes  # onnx's own dependency: numpy arrays of int4
import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper
from onnx import TensorProto


#: The bit-widths onnxruntime 1.32's MatMulNBits accepts.
MATMUL_NBITS_BITS = (2, 4, 8)
#: Block sizes of MatMulNBits' CPU kernels (a 2-bit block may not exceed 256).
_BLOCK_SIZES = (16, 32, 64, 128, 256)
_SCALE_BYTES = 4
#: DequantizeLinear takes int4 and int16 inputs from opset 21 on.
_OPSET_INT4_INT16 = 21
_MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class IntegerWeight:
    """One layer's fake-quantized weight as integers and per-channel scales.

    Attributes:
        name: The layer name.
        bits: The layer's bit-width.
        axis: The weight axis holding the output channels.
        values: The fake-quantized float32 weight, as the exported graph holds it.
        q: The integers, of ``values``' shape: ``values ≈ q * scale`` along ``axis``.
        scale: One float32 scale per output channel.
    """

    name: str
    bits: int
    axis: int
    values: np.ndarray
    q: np.ndarray
    scale: np.ndarray


@dataclass(frozen=True)
class OnnxLayer:
    """How one quantized layer is stored in an exported graph.

    Attributes:
        name: The layer name.
        bits: The layer's bit-width in the configuration.
        operator: ``"MatMulNBits"``, ``"DequantizeLinear"``, or ``"float"`` when no initializer
            of the graph holds the layer's weight (it then stays float32, fake-quantized).
        container_bits: Bits each weight takes in the file: the operator's container (2, 4, 8,
            16 or 32), 32 for ``"float"``.
        block_size: MatMulNBits' block size (None for the other operators).
    """

    name: str
    bits: int
    operator: str
    container_bits: int
    block_size: int | None = None


def integer_weight(name: str, values: np.ndarray, bits: int, axis: int) -> IntegerWeight:
    """The integers and scales of a weight fake-quantized symmetrically per output channel.

    The scale of a channel is recovered as ``max|w| / q_max``: the largest weight of a channel
    is ``±q_max`` steps, so dividing by this scale and rounding gives the integers back exactly
    (the scale itself may differ from the quantizer's by a rounding step of float32). An
    all-zero channel gets scale 1.

    Args:
        name: The layer name.
        values: The fake-quantized float32 weight.
        bits: The bit-width it was quantized to, in [2, 16].
        axis: The axis holding the output channels.
    """
    qmax = np.float32(2 ** (bits - 1) - 1)
    rows = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    amax = np.abs(rows).max(axis=1) if rows.size else np.zeros(len(rows), np.float32)
    scale = np.where(amax > 0, amax / qmax, np.float32(1)).astype(np.float32)
    q = np.rint(rows / scale[:, None]).astype(np.int32)
    q = np.moveaxis(q.reshape(np.moveaxis(values, axis, 0).shape), 0, axis)
    return IntegerWeight(name, bits, axis, values, q, scale)


def quantize_graph(
    model: onnx.ModelProto,
    weights: Mapping[str, IntegerWeight],
    *,
    opset: int,
    accuracy_level: int = 0,
) -> dict[str, OnnxLayer]:
    """Replace the float initializers of ``weights`` in ``model`` by integers, in place.

    Args:
        model: The exported model (its main graph is rewritten).
        weights: Layer name -> its integers.
        opset: The model's default-domain opset (int4 and int16 containers need 21).
        accuracy_level: MatMulNBits' ``accuracy_level`` (0: compute in float32).

    Returns:
        Layer name -> how the layer is stored, for every layer of ``weights``.
    """
    graph = model.graph
    # An initializer that is also a graph input may be fed at run time: it is left alone.
    overridable = {i.name for i in graph.input}
    found = {k: v for k, v in _match(graph, weights).items() if k not in overridable}
    uses = _uses(graph)
    pinned = _nested_inputs(graph) | {o.name for o in graph.output}
    ranks = {i.name: len(i.dims) for i in graph.initializer}
    replaced: dict[int, onnx.NodeProto] = {}  # node position -> its MatMulNBits
    front: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    layers: dict[str, OnnxLayer] = {}
    for init_name, (layer, transposed) in found.items():
        w = weights[layer]
        # The integers as the initializer lays them out, and its output-channel axis.
        q = w.q.T if transposed else w.q
        axis = 1 - w.axis if transposed else w.axis
        users = uses.get(init_name, [])
        container = next((c for c in MATMUL_NBITS_BITS if c >= w.bits), None)
        if (
            container is not None
            and users
            and init_name not in pinned
            and all(_feeds_matmul(graph.node[at], i, axis, ranks) for at, i in users)
        ):
            q_nk = np.moveaxis(q, axis, 0)  # (N, K): MatMulNBits' layout
            blob, scales, block = _pack(q_nk, w.scale, container)
            new_inits += [
                numpy_helper.from_array(blob, f"{init_name}_nbits"),
                numpy_helper.from_array(scales, f"{init_name}_nbits_scales"),
            ]
            for at, _ in users:
                replaced[at] = _matmul_nbits(
                    graph.node[at], init_name, q_nk.shape, container, block, accuracy_level
                )
            layers.setdefault(layer, OnnxLayer(layer, w.bits, "MatMulNBits", container, block))
        else:
            dtype, container = _dq_container(w.bits, opset)
            new_inits += [
                numpy_helper.from_array(q.astype(dtype), f"{init_name}_quantized"),
                numpy_helper.from_array(w.scale, f"{init_name}_scale"),
            ]
            front.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{init_name}_quantized", f"{init_name}_scale"],
                    [init_name],
                    name=f"{init_name}_DequantizeLinear",
                    axis=axis,
                )
            )
            layers.setdefault(layer, OnnxLayer(layer, w.bits, "DequantizeLinear", container))
    nodes = front + [replaced.get(at, n) for at, n in enumerate(graph.node)]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [i for i in graph.initializer if i.name not in found]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if any(layer.operator == "MatMulNBits" for layer in layers.values()):
        if not any(o.domain == _MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
    for name, w in weights.items():
        layers.setdefault(name, OnnxLayer(name, w.bits, "float", 32))
    return {name: layers[name] for name in weights}


def strip_node_metadata(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node debugging metadata, in place.

    The dynamo exporter annotates every node with its Python stack trace and FX node text:
    source paths the user may not want to ship, and a quarter of a small model's file.
    """
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def _key(array: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    data = np.ascontiguousarray(array, dtype=np.float32)
    return data.shape, hashlib.blake2b(data.tobytes(), digest_size=16).digest()


def _match(
    graph: onnx.GraphProto, weights: Mapping[str, IntegerWeight]
) -> dict[str, tuple[str, bool]]:
    """Initializer name -> (layer, whether it holds the transposed weight), found by content.

    Names do not survive export (folded MatMul weights become ``val_37``), values do.
    """
    index: dict[tuple[tuple[int, ...], bytes], tuple[str, bool]] = {}
    for w in weights.values():
        index.setdefault(_key(w.values), (w.name, False))
        if w.values.ndim == 2:
            index.setdefault(_key(w.values.T), (w.name, True))
    shapes = {shape for shape, _ in index}
    found = {}
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and tuple(init.dims) in shapes:
            hit = index.get(_key(numpy_helper.to_array(init)))
            if hit is not None:
                found[init.name] = hit
    return found


def _uses(graph: onnx.GraphProto) -> dict[str, list[tuple[int, int]]]:
    """Tensor name -> every (node position, input index) of the main graph reading it."""
    uses: dict[str, list[tuple[int, int]]] = {}
    for at, node in enumerate(graph.node):
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((at, i))
    return uses


def _nested_inputs(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a subgraph (If, Loop, Scan bodies) reads, at any depth."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= {n for inner in sub.node for n in inner.input}
                names |= _nested_inputs(sub)
    return names


def _feeds_matmul(node: onnx.NodeProto, index: int, axis: int, ranks: Mapping[str, int]) -> bool:
    """Whether ``node`` reads the weight as a MatMulNBits can: the right-hand matrix, output
    channels along the product's N (``ranks``: initializer name -> number of dimensions)."""
    if node.domain not in ("", "ai.onnx") or index != 1:
        return False
    if node.op_type == "MatMul":
        return axis == 1
    if node.op_type != "Gemm":
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
    if not plain or attrs.get("transA", 0) != 0 or axis != (0 if attrs.get("transB", 0) else 1):
        return False
    # A bias becomes MatMulNBits' bias input, which must be a 1-D tensor of N values.
    if len(node.input) < 3 or not node.input[2]:
        return True
    return ranks.get(node.input[2]) == 1


def _block_size(k: int, bits: int) -> int:
    """The block size storing a row of ``k`` weights in the fewest bytes (the larger on ties)."""

    def row_bytes(block: int) -> int:
        n_blocks = -(-k // block)
        return n_blocks * (block * bits // 8 + _SCALE_BYTES)

    return min(reversed(_BLOCK_SIZES), key=row_bytes)


def _pack(q_nk: np.ndarray, scale: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    """MatMulNBits' ``B`` (uint8, ``(N, blocks, block * bits / 8)``) and ``scales``.

    Values are stored unsigned with the operator's default zero point ``2^(bits-1)``, the first
    value of a byte in its lowest bits; the padding past ``K`` dequantizes to 0.
    """
    n, k = q_nk.shape
    block = _block_size(k, bits)
    n_blocks = -(-k // block)
    zero_point = 1 << (bits - 1)
    unsigned = np.full((n, n_blocks * block), zero_point, np.uint8)
    unsigned[:, :k] = q_nk + zero_point
    per_byte = 8 // bits
    values = unsigned.reshape(n, n_blocks, block // per_byte, per_byte)
    blob = np.zeros(values.shape[:-1], np.uint8)
    for i in range(per_byte):
        blob |= values[..., i] << np.uint8(bits * i)
    return blob, np.repeat(scale, n_blocks).astype(np.float32), block


def _matmul_nbits(
    node: onnx.NodeProto,
    weight: str,
    shape: tuple[int, int],
    bits: int,
    block: int,
    accuracy_level: int,
) -> onnx.NodeProto:
    """The MatMulNBits node computing what the MatMul or Gemm ``node`` computes."""
    n, k = shape
    inputs = [node.input[0], f"{weight}_nbits", f"{weight}_nbits_scales"]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        inputs += ["", "", node.input[2]]  # zero points and g_idx left out; bias
    return helper.make_node(
        "MatMulNBits",
        inputs,
        list(node.output),
        name=f"{node.name or weight}_MatMulNBits",
        domain=_MS_DOMAIN,
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )


def _dq_container(bits: int, opset: int) -> tuple[type, int]:
    """The signed integer type DequantizeLinear reads ``bits``-bit weights from, and its bits."""
    if bits <= 4 and opset >= _OPSET_INT4_INT16:
        return ml_dtypes.int4, 4
    if bits <= 8:
        return np.int8, 8
    if opset >= _OPSET_INT4_INT16:
        return np.int16, 16
    return np.int32, 32
