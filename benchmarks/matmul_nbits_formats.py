"""onnxruntime latency of one Linear layer's MatMulNBits per weight format, against FP32 MatMul.

For a few layer shapes (``K`` inputs × ``N`` outputs, BERT-base-like) and formats (per channel
against groups of 32, 64, 128; symmetric against asymmetric; 2, 4 and 8 bits), the weight is
rounded to nearest (:func:`optuna_ctpe.nn.grids.weight_codes`) and stored as
:func:`optuna_ctpe.deploy.onnx.export_onnx_formats` stores it
(:func:`optuna_ctpe.deploy._onnx_graph.quantize_graph`: ``block_size`` = the group, packed zero
points where asymmetric; a per-channel format takes the block size that stores a row in the
fewest bytes, its scale repeated). Each one-node graph runs in onnxruntime's CPU provider on one
intra-op and one inter-op thread, for a batch of 1 and of 32 rows; after a warm-up, the median of
``--repeats`` runs is reported, as a ratio to the FP32 MatMul of the same shape timed in the
same run (below 1: faster).

Run ``nice python benchmarks/matmul_nbits_formats.py`` from the repository root (the ``deploy``
extra installed); it writes ``benchmarks/results/matmul_nbits_formats.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import platform
import statistics
import time

import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper
from onnx import TensorProto
import onnxruntime
import torch

from optuna_ctpe.deploy._onnx_graph import IntegerWeight
from optuna_ctpe.deploy._onnx_graph import quantize_graph
from optuna_ctpe.nn.grids import dequantize
from optuna_ctpe.nn.grids import weight_codes
from optuna_ctpe.space.formats import parse_format


SHAPES = ((768, 768), (768, 3072), (3072, 768))
FORMATS = (
    "int4-pc-sym-rtn",
    "int4-g128-sym-rtn",
    "int4-g64-sym-rtn",
    "int4-g32-sym-rtn",
    "int4-pc-asym-rtn",
    "int4-g128-asym-rtn",
    "int4-g32-asym-rtn",
    "int8-pc-sym-rtn",
    "int8-g128-asym-rtn",
    "int2-g64-asym-rtn",
)
BATCHES = (1, 32)


def _graph(k: int, n: int, weight_kn: np.ndarray) -> onnx.ModelProto:
    """Y = X @ W with W (K, N) an initializer, opset 21."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(weight_kn, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _model(k: int, n: int, weight: torch.Tensor, name: str | None) -> tuple[bytes, str]:
    """The serialised graph of the (N, K) ``weight`` in format ``name`` (None: FP32)."""
    if name is None:
        return _graph(k, n, weight.numpy().T.copy()).SerializeToString(), "MatMul"
    fmt = parse_format(name)
    codes, fit = weight_codes(weight, fmt)
    values = dequantize(codes.float(), *fit.columns(k)).numpy()
    proto = _graph(k, n, values.T.copy())
    integer = IntegerWeight(
        "w",
        fmt.bits,
        0,
        values,
        codes.numpy(),
        fit.scale.numpy(),
        fit.zero.numpy().astype(np.int64) if fmt.grid == "asym" else None,
        fit.group_size if fmt.group_size is not None else None,
    )
    layer = quantize_graph(proto, {"w": integer}, opset=21)["w"]
    stored = f"{layer.operator} b{layer.container_bits}/{layer.block_size}"
    return proto.SerializeToString(), stored


def _time(model: bytes, x: np.ndarray, repeats: int) -> float:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--out", default="benchmarks/results/matmul_nbits_formats.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for k, n in SHAPES:
        weight = torch.randn(n, k) * 0.02
        models = {None: _model(k, n, weight, None)}
        models.update({name: _model(k, n, weight, name) for name in FORMATS})
        for batch in BATCHES:
            x = np.random.default_rng(0).standard_normal((batch, k)).astype(np.float32)
            reference = _time(models[None][0], x, args.repeats)
            rows.append((k, n, batch, "fp32", "MatMul", reference * 1e6, 1.0))
            for name in FORMATS:
                seconds = _time(models[name][0], x, args.repeats)
                stored = models[name][1]
                rows.append((k, n, batch, name, stored, seconds * 1e6, seconds / reference))
                print(rows[-1], flush=True)
    lines = [
        "# MatMulNBits latency per weight format",
        "",
        f"`benchmarks/matmul_nbits_formats.py --repeats {args.repeats}`: onnxruntime "
        f"{onnxruntime.__version__}, one thread, {platform.processor() or platform.machine()}, "
        "a machine shared with other jobs (medians; ratios against the FP32 MatMul timed in the "
        "same run, below 1 is faster).",
        "",
        "| K | N | batch | format | stored as | median µs | / FP32 |",
        "|---:|---:|---:|---|---|---:|---:|",
    ]
    lines += [
        f"| {k} | {n} | {b} | {name} | {op} | {us:.1f} | {ratio:.2f} |"
        for k, n, b, name, op, us, ratio in rows
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
