"""ONNX Runtime latency and file size of the digits CNN: FP32 against the integer-weight exports.

The digits CNN (:func:`optuna_ctpe.tasks.digits.digits_task`, seed 0) is exported once as FP32
(``torch.onnx.export``, dynamo, weights inline) and, with
:func:`optuna_ctpe.deploy.onnx.export_onnx`, at uniform 8, 4 and 2 bits (every layer, first and
last included; full widths): the convolutions as int8/int4 weights behind DequantizeLinear, the
two Linear layers as MatMulNBits. A 4-bit export with MatMulNBits' ``accuracy_level=4`` (int8
activations inside the product) is timed too.

Each file runs in onnxruntime's CPU provider with one intra-op and one inter-op thread, on one
image (batch 1) and on the 540 validation images, with the default session options and with
``session.disable_quant_qdq`` set (DequantizeLinear of constant weights folded at load); after
a warm-up, the median of ``--repeats`` timed runs is reported with the spread (the 10th and
90th percentiles) as the machine's noise.
Accuracy is onnxruntime's on the validation images; ``max rel diff`` is
:attr:`OnnxExport.max_rel_diff`, the largest difference to the fake-quantized PyTorch model on
one image over its largest output.

Run ``python benchmarks/onnx_runtime.py`` from the repository root (the ``deploy`` extra
installed); it writes ``benchmarks/results/onnx_runtime.md``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import statistics
import sys
import tempfile
import time
from typing import Any
import warnings

from _common import markdown_table
from _common import report_header
from _common import RESULTS_DIR
import numpy as np
import torch


NOTE = (
    "Median ms per run (10th-90th percentile in brackets), onnxruntime CPU provider, 1 intra-op "
    "and 1 inter-op thread, default graph optimisations; `folded`: with the session option "
    "`session.disable_quant_qdq = 1`, which folds DequantizeLinear of constant weights into "
    "float32 weights when the session loads (small file, float weights in memory). "
    "`accounted KB` is "
    "`space.size(config) / 8` (the FP32 row: every parameter at 32 bits). The integer files "
    "hold int4 (2 and 4 bits) or int8 convolution weights behind DequantizeLinear and "
    "MatMulNBits Linear weights (2, 4 or 8 bits), plus float32 scales, biases and the graph."
)


def _session(path: Path, fold: bool = False) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if fold:
        # onnxruntime keeps DequantizeLinear of constant weights for its QDQ fusions, so the
        # convolutions are not pre-packed; this folds them into float32 weights at load.
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _latency(session: Any, x: np.ndarray, repeats: int) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile milliseconds of ``session`` on ``x``."""
    name = session.get_inputs()[0].name
    for _ in range(max(5, repeats // 10)):
        session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - start) * 1e3)
    deciles = statistics.quantiles(times, n=10)
    return statistics.median(times), deciles[0], deciles[-1]


def _row(
    label: str, path: Path, accounted: float, diff: float | None, data: Any, repeats: int
) -> list[str]:
    x, y = data
    session = _session(path)
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    accuracy = float((logits.argmax(1) == y).mean())
    cells = [label, f"{path.stat().st_size / 1e3:.1f}", f"{accounted / 1e3:.1f}"]
    for fold in (False, True):
        session = _session(path, fold)
        for batch in (x[:1], x):
            median, low, high = _latency(session, batch, repeats)
            cells.append(f"{median:.3f} ({low:.3f}-{high:.3f})")
    cells += [f"{accuracy:.4f}", "-" if diff is None else f"{diff:.1e}"]
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import onnxruntime

    from optuna_ctpe import HessianSearchSpace
    from optuna_ctpe.deploy.onnx import export_onnx
    from optuna_ctpe.tasks.digits import digits_task

    task = digits_task(seed=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trace of layer.*is negative")
        space = HessianSearchSpace.from_model(
            task.model,
            task.loss_fn,
            task.calibration_batches,
            bits=(2, 4, 8),
            keep_first_last_bits=None,
        )
    x, y = task.validation_batches[0]
    data = (x.numpy(), y.numpy())
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        fp32 = Path(folder) / "fp32.onnx"
        torch.onnx.export(
            task.model,
            (task.example_inputs,),
            str(fp32),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
            external_data=False,
            verbose=False,
        )
        rows.append(_row("FP32", fp32, space.fp32_bits / 8, None, data, args.repeats))
        for bits, level in ((8, 0), (4, 0), (2, 0), (4, 4)):
            path = Path(folder) / f"u{bits}_{level}.onnx"
            config = space.uniform(bits)
            report = export_onnx(
                space, task.model, config, path, task.example_inputs, accuracy_level=level
            )
            label = f"uniform {bits}-bit" + (f", accuracy_level {level}" if level else "")
            rows.append(
                _row(label, path, report.accounted_bytes, report.max_rel_diff, data, args.repeats)
            )
    header = report_header(
        "ONNX Runtime: FP32 vs integer-weight exports of the digits CNN",
        ["benchmarks/onnx_runtime.py", *(argv if argv is not None else sys.argv[1:])],
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, CPU, "
        f"{args.repeats} timed runs per cell, load average {os.getloadavg()[0]:.1f} at the end "
        "(the machine is shared: the spread is its noise)",
    )
    table = markdown_table(
        [
            "model",
            "file KB",
            "accounted KB",
            "ms, 1 image",
            "ms, 540 images",
            "folded: ms, 1 image",
            "folded: ms, 540 images",
            "accuracy",
            "max rel diff",
        ],
        rows,
    )
    text = f"{header}\n{NOTE}\n\n{table}\n"
    print(text)
    (RESULTS_DIR / "onnx_runtime.md").write_text(text)


if __name__ == "__main__":
    main()
