"""How well does the per-layer latency lookup table predict the whole exported model's latency?

Question (issue 11, item 4): on the digits CNN, does HAWQ-V3's lookup table
(:func:`optuna_ctpe.deploy.latency_table.measure_latency_table`: one one-layer ONNX graph per
layer, bit-width and width ratios, summed with the float remainder) rank configurations as
timing the whole exported model does (:func:`optuna_ctpe.deploy.onnx.export_onnx` + onnxruntime;
what :class:`optuna_ctpe.deploy.latency.ModelTimer` does)? Target: Spearman >= 0.9 over 50
random configurations.

Set-up: the digits CNN (:func:`optuna_ctpe.tasks.digits.digits_task`, seed 0) with the CLI's
default grids (bits 2, 3, 4, 6, 8; widths 0.5, 0.75, 1; conv1 and fc2 fixed at 8 bits). ``--n``
configurations are drawn uniformly from the full grids (seed 0), each exported once. For each
runtime (onnxruntime's CPU provider, one intra-op and one inter-op thread, with its default
session options and with ``session.disable_quant_qdq`` folding DequantizeLinear at load) and
each batch (``--batches``), the table is measured, then every configuration's whole model is
timed twice (pass A over all configurations, then pass B): the Spearman correlation of A with B
is the ceiling the machine's noise leaves to any predictor.

Run ``python benchmarks/latency_table.py`` from the repository root (the ``deploy`` extra
installed); it writes ``benchmarks/results/latency_table.md`` and ``latency_table.png``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import random
import statistics
import sys
import tempfile
import time
from typing import Any
import warnings

from _common import markdown_table
from _common import new_axes
from _common import report_header
from _common import RESULTS_DIR
import numpy as np
from scipy import stats
import torch


NOTE = (
    "Spearman: rank correlation of the table's predictions with pass A's whole-model medians; "
    "`A vs B`: of pass A with pass B (the same files timed again later: the noise ceiling). "
    "`rel. error`: |prediction - A| / A, median and largest over the configurations. `noise`: "
    "the median over the measurements of their interquartile range over their median (table "
    "entries; whole models). Whole-model medians of `repeats` runs after a warm-up; the table's "
    "entries are timed interleaved with an Identity graph whose time (the per-call cost) is "
    "taken off each entry and paid once, in the remainder."
)


def _configs(space: Any, n: int, seed: int) -> list[Any]:
    """``n`` distinct configurations drawn uniformly from the full grids."""
    from optuna_ctpe.space.records import QuantConfig

    rng = random.Random(seed)
    found: dict[Any, Any] = {}
    while len(found) < n:
        bits = {
            name: space.fixed_bits.get(name, rng.choice(space.bits))
            for name in space.sensitivities
        }
        widths = {g: rng.choice(space.widths) for g in space.groups}
        config = QuantConfig(bits, widths)
        found.setdefault(config.key(), config)
    return list(found.values())


def _export_all(space: Any, task: Any, configs: list[Any]) -> list[bytes]:
    from optuna_ctpe.deploy.onnx import export_onnx

    models = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        for config in configs:
            export_onnx(space, task.model, config, path, task.example_inputs, verify=False)
            models.append(path.read_bytes())
    return models


def _time_models(models: list[bytes], runtime: Any, inputs: Any, repeats: int) -> list[Any]:
    from optuna_ctpe.deploy.latency import session_feed
    from optuna_ctpe.deploy.latency import time_calls

    timings = []
    for model in models:
        session = runtime.session(model)
        feed = session_feed(session, inputs)
        (timing,) = time_calls(
            [lambda session=session, feed=feed: session.run(None, feed)],
            repeats=repeats,
            rounds=10,
        )
        timings.append(timing)
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50, help="random configurations")
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per measurement")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import onnxruntime

    from optuna_ctpe import HessianSearchSpace
    from optuna_ctpe.deploy.latency import batched_inputs
    from optuna_ctpe.deploy.latency import OrtRuntime
    from optuna_ctpe.deploy.latency_table import measure_latency_table
    from optuna_ctpe.tasks.digits import digits_task

    task = digits_task(seed=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trace of layer.*is negative")
        space = HessianSearchSpace.from_model(
            task.model, task.loss_fn, task.calibration_batches, example_inputs=task.example_inputs
        )
    configs = _configs(space, args.n, seed=0)
    start = time.perf_counter()
    models = _export_all(space, task, configs)
    export_s = (time.perf_counter() - start) / len(configs)
    rows, panels = [], []
    for fold in (False, True):
        runtime = OrtRuntime(fold_dequantize=fold)
        for batch in (int(b) for b in args.batches.split(",")):
            start = time.perf_counter()
            table = measure_latency_table(
                space,
                task.model,
                task.example_inputs,
                batch=batch,
                runtime=runtime,
                repeats=args.repeats,
            )
            table_s = time.perf_counter() - start
            inputs = batched_inputs(task.example_inputs, batch)
            pass_a = _time_models(models, runtime, inputs, args.repeats)
            pass_b = _time_models(models, runtime, inputs, args.repeats)
            a = np.array([t.median_ms for t in pass_a])
            b = np.array([t.median_ms for t in pass_b])
            predicted = np.array([table.predict(c) for c in configs])
            rel = np.abs(predicted - a) / a
            rows.append(
                [
                    runtime.name,
                    str(batch),
                    f"{stats.spearmanr(predicted, a).statistic:.3f}",
                    f"{stats.spearmanr(a, b).statistic:.3f}",
                    f"{np.median(rel):.1%}",
                    f"{rel.max():.1%}",
                    f"{a.min():.4f}-{a.max():.4f}",
                    f"{table.fp32_ms:.4f}",
                    f"{table.remainder_ms:.4f}",
                    f"{table.noise:.1%}",
                    f"{statistics.median(t.noise for t in pass_a + pass_b):.1%}",
                    f"{table_s:.1f}",
                ]
            )
            panels.append((f"{runtime.name}, batch {batch}", predicted, a))
            print(rows[-1], flush=True)
    _plot(panels, RESULTS_DIR / "latency_table.png")
    header = report_header(
        "Latency lookup table vs whole-model timing (digits CNN, onnxruntime CPU)",
        ["benchmarks/latency_table.py", *(argv if argv is not None else sys.argv[1:])],
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, 1 intra-op and 1 "
        f"inter-op thread, {args.n} random configurations, {args.repeats} timed runs per "
        f"measurement; export {export_s:.1f} s per configuration; load average "
        f"{os.getloadavg()[0]:.1f} at the end (a shared 2-core machine)",
    )
    table_md = markdown_table(
        [
            "runtime",
            "batch",
            "Spearman",
            "A vs B",
            "median rel. error",
            "max rel. error",
            "measured ms (range)",
            "FP32 ms",
            "remainder ms",
            "noise, table",
            "noise, models",
            "table s",
        ],
        rows,
    )
    text = f"{header}\n{NOTE}\n\n{table_md}\n\n![predicted vs measured](latency_table.png)\n"
    print(text)
    (RESULTS_DIR / "latency_table.md").write_text(text)


def _plot(panels: list[tuple[str, np.ndarray, np.ndarray]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = new_axes((4.0 * len(panels), 3.8), ncols=len(panels))
    for ax, (title, predicted, measured) in zip(np.atleast_1d(axes), panels):
        ax.scatter(measured, predicted, s=12)
        low, high = min(measured.min(), predicted.min()), max(measured.max(), predicted.max())
        ax.plot([low, high], [low, high], color="grey", lw=0.8, label="y = x")
        rho = stats.spearmanr(predicted, measured).statistic
        ax.set_title(f"{title}\nSpearman {rho:.3f}", fontsize=9)
        ax.set_xlabel("whole exported model, ms")
        ax.set_ylabel("table prediction, ms")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
