"""Per-layer Hessian traces: optuna_ctpe.nn.sensitivity against PyHessian.

Both compute Hutchinson estimates of the trace of every Conv/Linear weight's Hessian block of a
randomly initialised torchvision ResNet-18 (10 classes) on one batch of 16×3×32×32 inputs with
cross-entropy, with the same number of Rademacher probes per layer, on the CPU, in eval mode.

* **ours**: :func:`optuna_ctpe.nn.sensitivity.hutchinson_traces` with ``rtol=0`` (every probe
  runs): one gradient with ``create_graph=True``, then one Hessian-vector product of the whole
  network per probe, read out for all 21 layers at once.
* **PyHessian 0.1** (``pip install pyhessian``, benchmark-only): ``hessian(...).trace()`` gives
  the trace of all parameters that require grad, so a per-layer trace needs one run per layer
  with every other parameter frozen: the gradient graph is rebuilt (its ``__init__``) and
  ``trace(maxIter=N)`` runs N HVPs for each layer. ``tol=-inf`` makes every probe run:
  PyHessian's stopping test lacks an ``abs()``, so with ``tol=0`` a layer whose running mean is
  negative would stop after two probes.

Our time is measured before and after PyHessian's (the machine may be shared) and averaged.
``--layers K`` times PyHessian on the first K layers only and extrapolates linearly to all of
them; the report says so.

Run ``python benchmarks/hessian_speed.py`` from the repository root; it writes
``benchmarks/results/hessian_speed.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from _common import markdown_table
from _common import report_header
from _common import RESULTS_DIR
import torch
from torch import nn


TARGET_RATIO = 0.5


def _setup(seed: int, batch_size: int) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    model = resnet18(weights=None, num_classes=10)
    x = torch.randn(batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (batch_size,))
    return model, (x, y)


def time_ours(model: nn.Module, batch: tuple, n_probes: int) -> tuple[float, dict]:
    from optuna_ctpe.nn.sensitivity import hutchinson_traces

    criterion = nn.CrossEntropyLoss()

    def loss_fn(net: nn.Module, b: tuple) -> torch.Tensor:
        return criterion(net(b[0]), b[1])

    start = time.perf_counter()
    traces = hutchinson_traces(
        model, loss_fn, [batch], max_probes=n_probes, min_probes=n_probes, rtol=0.0, seed=0
    )
    return time.perf_counter() - start, traces


def time_pyhessian(
    model: nn.Module, batch: tuple, n_probes: int, layers: list[str]
) -> tuple[float, dict[str, float]]:
    from pyhessian import hessian

    modules = dict(model.named_modules())
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    criterion = nn.CrossEntropyLoss()
    traces = {}
    start = time.perf_counter()
    try:
        for name in layers:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            modules[name].weight.requires_grad_(True)
            estimator = hessian(model, criterion, data=batch, cuda=False)
            samples = estimator.trace(maxIter=n_probes, tol=float("-inf"))
            assert len(samples) == n_probes
            traces[name] = sum(samples) / len(samples)
        elapsed = time.perf_counter() - start
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
    return elapsed, traces


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", type=int, default=20, help="probes per layer (default 20)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--layers", type=int, default=None, help="time PyHessian on the first K layers only"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, batch = _setup(args.seed, args.batch_size)
    all_layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    timed = all_layers if args.layers is None else all_layers[: args.layers]

    load_start = os.getloadavg()[0]
    # Warm-up (allocator, first-call overheads), untimed.
    time_ours(model, batch, 2)
    ours_before, traces = time_ours(model, batch, args.probes)
    print(f"ours: {ours_before:.2f} s for {len(all_layers)} layers x {args.probes} probes")
    py_time, py_traces = time_pyhessian(model, batch, args.probes, timed)
    py_total = py_time * len(all_layers) / len(timed)
    extrapolated = len(timed) < len(all_layers)
    note = f" (measured on {len(timed)} layers, extrapolated)" if extrapolated else ""
    print(f"PyHessian: {py_total:.2f} s{note}")
    ours_after, _ = time_ours(model, batch, args.probes)
    ours = (ours_before + ours_after) / 2
    ratio = ours / py_total
    load_end = os.getloadavg()[0]
    print(f"ours (after): {ours_after:.2f} s; ratio ours/PyHessian = {ratio:.3f}")

    met = "met" if ratio <= TARGET_RATIO else "NOT met"
    settings = (
        f"torchvision resnet18 (random init, 10 classes), batch {args.batch_size}x3x32x32, "
        f"cross-entropy, eval mode, {args.probes} Rademacher probes per layer, "
        f"{len(all_layers)} Conv/Linear layers; torch {torch.__version__} on CPU ({_cpu_name()}, "
        f"{torch.get_num_threads()} threads)"
    )
    rows = [
        [
            "ours: `hutchinson_traces` (one joint HVP per probe)",
            f"{ours:.2f}",
            f"{ours / (len(all_layers) * args.probes) * 1e3:.1f}",
            "1",
        ],
        [
            "PyHessian 0.1 `trace()`, one run per layer, other layers frozen" + note,
            f"{py_total:.2f}",
            f"{py_total / (len(all_layers) * args.probes) * 1e3:.1f}",
            f"{len(all_layers)}",
        ],
    ]
    table = markdown_table(["method", "seconds", "ms per layer-probe", "estimator runs"], rows)
    comparison = markdown_table(
        ["layer", "ours (joint probes)", "ours stderr", "PyHessian (own probes)"],
        [
            [n, f"{traces[n].trace:.4g}", f"{traces[n].stderr:.3g}", f"{py_traces[n]:.4g}"]
            for n in timed
        ],
    )
    report = "\n".join(
        [
            report_header(
                "Per-layer Hessian traces: optuna_ctpe vs PyHessian",
                ["benchmarks/hessian_speed.py", *sys.argv[1:]],
                settings,
            ),
            table,
            "",
            f"Our time is the mean of two runs, before ({ours_before:.2f} s) and after "
            f"({ours_after:.2f} s) PyHessian's. **Ratio ours / PyHessian = {ratio:.3f}** "
            f"(target <= {TARGET_RATIO}: **{met}**). One-minute load average {load_start:.1f} at "
            f"the start and {load_end:.1f} at the end (above the CPU count, the machine was "
            "shared and both times are inflated).",
            "",
            "PyHessian needs one estimator per layer (gradient graph rebuilt, N HVPs); ours reads "
            "every layer from each whole-network HVP. PyHessian is run with `tol=-inf` so that "
            "every probe runs (its stopping test lacks `abs()`). The two use different random "
            "probes, and per-layer (restricted) probes have no cross-layer terms, so their "
            "estimates differ by noise; they estimate the same traces:",
            "",
            comparison,
            "",
        ]
    )
    out = RESULTS_DIR / "hessian_speed.md"
    out.write_text(report)
    print(f"ratio {ratio:.3f} (target <= {TARGET_RATIO}: {met}); wrote {out}")


if __name__ == "__main__":
    main()
