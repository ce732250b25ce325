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

A bit-width's quantization is symmetric per output channel (``w = q * s``,
``|q| <= 2^(b-1) - 1``), which both operators represent exactly: MatMulNBits with its default
zero point ``2^(c-1)`` of a ``c``-bit container and the channel's scale repeated in every block
of the row, DequantizeLinear with a signed container and no zero point.

A weight format (:mod:`optuna_ctpe.space.formats`) adds groups and zero points:

* MatMulNBits takes a group of ``g`` inputs as blocks of the largest block size dividing ``g``
  (``g`` itself when it is a power of two from 16 to 256; the group's scale repeated in each of
  its blocks), and an asymmetric grid's unsigned codes with its zero points (packed, ``bits``
  of the container each, a row's padded to a byte); a group no block size divides (``g24``)
  goes to DequantizeLinear instead;
* DequantizeLinear takes an asymmetric grid in an unsigned container (uint4, uint8, uint16)
  with its zero points, and groups, from opset 21, as a blocked DequantizeLinear
  (``block_size = g``) of the weight's ``(rows, inputs)`` matrix, reshaped to the weight's
  shape; before opset 21, which has no blocks, as the same thing with one row per group
  (per-channel DequantizeLinear of the ``(rows × groups, g)`` codes, the last group padded
  with its zero point, sliced and reshaped back): exact too, and a warning names the layer.

Pure numpy and ``onnx``: no torch.
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
#: DequantizeLinear takes int4 and int16 inputs, and blocks, from opset 21 on.
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
        q: The integers, of ``values``' shape: ``values ≈ (q - zero) * scale`` along ``axis``
            (unsigned for an asymmetric grid, else signed).
        scale: One float32 scale per output channel, or ``(channels, groups)`` of them.
        zero: None for a symmetric grid, else the integer zero points, of ``scale``'s shape.
        group_size: Inputs per group (a row of the weight's ``(rows, inputs)`` matrix, rows
            along ``axis``); None for one scale per channel.
    """

    name: str
    bits: int
    axis: int
    values: np.ndarray
    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None = None
    group_size: int | None = None

    def grid(self) -> tuple[np.ndarray, np.ndarray | None, int]:
        """The ``(rows, groups)`` scales and zero points, and the inputs per group."""
        rows = self.values.shape[self.axis] if self.values.ndim > 1 else self.values.size
        inputs = self.values.size // max(rows, 1)
        scale = self.scale.reshape(rows, -1).astype(np.float32)
        zero = None if self.zero is None else self.zero.reshape(rows, -1).astype(np.int64)
        if scale.shape[1] == 1:
            return scale, zero, inputs
        return scale, zero, min(self.group_size or inputs, inputs)


@dataclass(frozen=True)
class OnnxLayer:
    """How one quantized layer is stored in an exported graph.

    Attributes:
        name: The layer name.
        bits: The layer's bit-width in the configuration (or format).
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
        scale, zero, group = w.grid()
        users = uses.get(init_name, [])
        container = next((c for c in MATMUL_NBITS_BITS if c >= w.bits), None)
        q_nk = np.moveaxis(q, axis, 0)
        block = None
        if container is not None and q.ndim == 2:
            block = _nbits_block(q_nk.shape[1], group, scale.shape[1], container)
        if (
            block is not None
            and users
            and init_name not in pinned
            and all(_feeds_matmul(graph.node[at], i, axis, ranks) for at, i in users)
        ):
            # q_nk is (N, K): MatMulNBits' layout.
            blob, scales, zero_points = _pack(q_nk, scale, zero, group, container, block)
            new_inits += [
                numpy_helper.from_array(blob, f"{init_name}_nbits"),
                numpy_helper.from_array(scales, f"{init_name}_nbits_scales"),
            ]
            if zero_points is not None:
                new_inits.append(numpy_helper.from_array(zero_points, f"{init_name}_nbits_zp"))
            for at, _ in users:
                replaced[at] = _matmul_nbits(
                    graph.node[at],
                    init_name,
                    q_nk.shape,
                    container,
                    block,
                    accuracy_level,
                    zero_points is not None,
                )
            layers.setdefault(layer, OnnxLayer(layer, w.bits, "MatMulNBits", container, block))
        else:
            inits, nodes, container = _dequantize(
                init_name, q, axis, w.bits, scale, zero, group, opset
            )
            new_inits += inits
            front += nodes
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


def _nbits_block(k: int, group: int, n_groups: int, bits: int) -> int | None:
    """MatMulNBits' block size for rows of ``k`` inputs in groups of ``group``: any block for
    one group per row (its scale repeats), else the largest block size dividing the group (its
    scale repeats in each of its blocks), None if there is none."""
    if n_groups == 1:
        return _block_size(k, bits)
    return max((b for b in _BLOCK_SIZES if group % b == 0), default=None)


def _pack(
    q_nk: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray | None,
    group: int,
    bits: int,
    block: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits' ``B`` (uint8, ``(N, blocks, block * bits / 8)``), ``scales`` (float32,
    ``N × blocks``) and ``zero_points`` (uint8, each row's ``blocks`` values of ``bits`` bits
    packed and padded to a byte; None for a symmetric grid).

    Values are stored unsigned: a symmetric grid's signed codes plus the operator's default
    zero point ``2^(bits-1)``, an asymmetric grid's as they are with their zero points. The
    first value of a byte is in its lowest bits; the padding past ``K`` is the block's zero
    point, which dequantizes to 0.
    """
    n, k = q_nk.shape
    n_blocks = -(-k // block)
    group_of_block = np.arange(n_blocks) * block // group
    scales = scale[:, group_of_block].astype(np.float32)
    if zero is None:
        points = np.full((n, n_blocks), 1 << (bits - 1), np.int64)
        unsigned_q = q_nk.astype(np.int64) + (1 << (bits - 1))
    else:
        points = zero[:, group_of_block]
        unsigned_q = q_nk.astype(np.int64)
    unsigned = np.repeat(points, block, axis=1).astype(np.uint8)
    unsigned[:, :k] = unsigned_q
    blob = _pack_rows(unsigned.reshape(n * n_blocks, block), bits).reshape(n, n_blocks, -1)
    zero_points = None if zero is None else _pack_rows(points.astype(np.uint8), bits).reshape(-1)
    return blob, scales.reshape(-1), zero_points


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Each row of unsigned ``values`` packed at ``bits`` (2, 4 or 8) bits, lowest first, and
    padded to whole bytes: ``(rows, ceil(columns * bits / 8))`` uint8."""
    per_byte = 8 // bits
    rows, columns = values.shape
    padded = np.zeros((rows, -(-columns // per_byte) * per_byte), np.uint8)
    padded[:, :columns] = values
    grouped = padded.reshape(rows, -1, per_byte)
    packed = np.zeros(grouped.shape[:-1], np.uint8)
    for i in range(per_byte):
        packed |= grouped[..., i] << np.uint8(bits * i)
    return packed


def _matmul_nbits(
    node: onnx.NodeProto,
    weight: str,
    shape: tuple[int, int],
    bits: int,
    block: int,
    accuracy_level: int,
    zero_points: bool = False,
) -> onnx.NodeProto:
    """The MatMulNBits node computing what the MatMul or Gemm ``node`` computes."""
    n, k = shape
    inputs = [node.input[0], f"{weight}_nbits", f"{weight}_nbits_scales"]
    if zero_points:
        inputs.append(f"{weight}_nbits_zp")
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        inputs += [""] * (5 - len(inputs)) + [node.input[2]]  # g_idx left out; bias
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


def _dq_unsigned(bits: int, opset: int) -> tuple[type, int] | None:
    """The unsigned type DequantizeLinear reads ``bits``-bit asymmetric codes from, and its
    bits; None above 8 bits before opset 21 (no uint16)."""
    if bits <= 4 and opset >= _OPSET_INT4_INT16:
        return ml_dtypes.uint4, 4
    if bits <= 8:
        return np.uint8, 8
    if opset >= _OPSET_INT4_INT16:
        return np.uint16, 16
    return None


def _dequantize(
    name: str,
    q: np.ndarray,
    axis: int,
    bits: int,
    scale: np.ndarray,
    zero: np.ndarray | None,
    group: int,
    opset: int,
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto], int]:
    """Initializers and nodes that compute the weight ``name`` (integers ``q``, output channels
    along ``axis``) with DequantizeLinear (see the module docstring), and the container bits."""
    if zero is None:
        dtype, container = _dq_container(bits, opset)
    else:
        unsigned = _dq_unsigned(bits, opset)
        if unsigned is None:  # (q - z) is a signed integer of bits + 1 bits
            q = q.astype(np.int64) - _expand(zero, q.shape, axis, group)
            zero, (dtype, container) = None, _dq_container(bits + 1, opset)
        else:
            dtype, container = unsigned
    rows, groups = scale.shape
    if groups == 1:  # one scale per channel: DequantizeLinear along the axis, as it is
        inits = [
            numpy_helper.from_array(q.astype(dtype), f"{name}_quantized"),
            numpy_helper.from_array(scale[:, 0], f"{name}_scale"),
        ]
        inputs = [f"{name}_quantized", f"{name}_scale"]
        if zero is not None:
            inits.append(numpy_helper.from_array(zero[:, 0].astype(dtype), f"{name}_zero"))
            inputs.append(f"{name}_zero")
        node = helper.make_node(
            "DequantizeLinear", inputs, [name], name=f"{name}_DequantizeLinear", axis=axis
        )
        return inits, [node], container
    moved = list(q.shape)
    moved[0], moved[axis] = moved[axis], moved[0]
    matrix = q.swapaxes(0, axis).reshape(rows, -1)
    k = matrix.shape[1]
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    if opset >= _OPSET_INT4_INT16:
        # Blocked DequantizeLinear of the (rows, inputs) matrix: block j of a row is group j.
        inits += [
            numpy_helper.from_array(matrix.astype(dtype), f"{name}_quantized"),
            numpy_helper.from_array(scale, f"{name}_scale"),
        ]
        inputs = [f"{name}_quantized", f"{name}_scale"]
        if zero is not None:
            inits.append(numpy_helper.from_array(zero.astype(dtype), f"{name}_zero"))
            inputs.append(f"{name}_zero")
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                inputs,
                [f"{name}_rows"],
                name=f"{name}_DequantizeLinear",
                axis=1,
                block_size=group,
            )
        )
    else:
        # No blocks before opset 21: one row per group, per-channel, padded with the
        # group's zero point (which dequantizes to 0), then sliced back to the inputs.
        fill = np.zeros((rows, groups), np.int64) if zero is None else zero
        padded = np.repeat(fill, group, axis=1)
        padded[:, :k] = matrix
        inits += [
            numpy_helper.from_array(
                padded.reshape(rows * groups, group).astype(dtype), f"{name}_quantized"
            ),
            numpy_helper.from_array(scale.reshape(-1), f"{name}_scale"),
            numpy_helper.from_array(np.array([rows, groups * group], np.int64), f"{name}_padded"),
            numpy_helper.from_array(np.array([0], np.int64), f"{name}_start"),
            numpy_helper.from_array(np.array([k], np.int64), f"{name}_end"),
            numpy_helper.from_array(np.array([1], np.int64), f"{name}_axes"),
        ]
        inputs = [f"{name}_quantized", f"{name}_scale"]
        if zero is not None:
            inits.append(numpy_helper.from_array(zero.reshape(-1).astype(dtype), f"{name}_zero"))
            inputs.append(f"{name}_zero")
        nodes += [
            helper.make_node(
                "DequantizeLinear",
                inputs,
                [f"{name}_groups"],
                name=f"{name}_DequantizeLinear",
                axis=0,
            ),
            helper.make_node(
                "Reshape",
                [f"{name}_groups", f"{name}_padded"],
                [f"{name}_padded_rows"],
                name=f"{name}_Reshape_groups",
            ),
            helper.make_node(
                "Slice",
                [f"{name}_padded_rows", f"{name}_start", f"{name}_end", f"{name}_axes"],
                [f"{name}_rows"],
                name=f"{name}_Slice",
            ),
        ]
    inits.append(numpy_helper.from_array(np.array(moved, np.int64), f"{name}_shape"))
    reshaped = name if axis == 0 else f"{name}_moved"
    nodes.append(
        helper.make_node(
            "Reshape", [f"{name}_rows", f"{name}_shape"], [reshaped], name=f"{name}_Reshape"
        )
    )
    if axis != 0:
        perm = list(range(q.ndim))
        perm[0], perm[axis] = perm[axis], perm[0]
        nodes.append(
            helper.make_node("Transpose", [reshaped], [name], name=f"{name}_Transpose", perm=perm)
        )
    return inits, nodes, container


def _expand(zero: np.ndarray, shape: tuple[int, ...], axis: int, group: int) -> np.ndarray:
    """The ``(rows, groups)`` zero points as one per element of a weight of ``shape``."""
    moved = list(shape)
    moved[0], moved[axis] = moved[axis], moved[0]
    k = int(np.prod(moved[1:], dtype=np.int64))
    per_input = np.repeat(zero, group, axis=1)[:, :k]
    return per_input.reshape(moved).swapaxes(0, axis)
