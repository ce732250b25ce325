"""How many probes does a per-layer trace ranking need? Estimators against a long reference.

For each model (a task's trained model and calibration batches, every supported layer), a
REFERENCE run of many probes of the least noisy unbiased Hessian estimator
(``--reference-estimator split``, :mod:`optuna_ctpe.nn.split`; ``--reference-probes``: 4,000
on the digits CNN, 500 on the others; their standard errors are in the report, and a cached
long plain-Hutchinson run, where there is one, checks the reference for bias) gives the
per-layer mean traces taken as the truth, and a long GGN run the GGN's own target. Then each
estimator of :data:`optuna_ctpe.nn.sensitivity.ESTIMATORS` runs ``max(--probes)`` probes for
each of ``--seeds`` seeds, and at every count of ``--probes`` the benchmark reports, against the
reference:

* (a) the Spearman rank correlation of the per-layer mean traces;
* (b) the Spearman rank correlation of Ω = mean trace × ‖Q_b(W) − W‖² over every (layer,
  bit-width) pair of the default grid (negative traces clipped to 0, as measurement does);
* how many layers have a negative trace estimate.

A probe is one Hessian-vector product (Hutchinson), one vector-Jacobian product (GGN) or one
sample's gradient (empirical Fisher). Estimates after N probes are the first N probes of the
long run (an estimator with ``max_probes=N`` and ``rtol=0`` draws exactly those), recorded by a
``RunningStats`` that keeps every probe's row. Times are per probe, as ratios to one Hutchinson
probe of the same model in the same run: the machine is shared with other benchmarks, so
absolute seconds are noisy. The GGN estimates another matrix than the reference (the Hessian
without the model's own curvature), whose diagonal blocks equal the Hessian's in a
piecewise-linear network such as the three CNNs here, but not in a transformer.

Run ``python benchmarks/sensitivity_quality.py`` from the repository root (``--models`` chooses
among digits, resnet18, mobilenet_v2, minilm); it writes
``benchmarks/results/sensitivity_quality.{md,json,png}``. References are cached under
``$OPTUNA_CTPE_CACHE_DIR/sensitivity_quality/``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import sys
import time
from typing import Any

from _common import markdown_table
from _common import report_header
from _common import RESULTS_DIR
import numpy as np
from scipy import stats
import torch

from optuna_ctpe.nn.layers import model_layers
from optuna_ctpe.nn.quantize import quantization_error
from optuna_ctpe.nn.sensitivity import ESTIMATORS
from optuna_ctpe.nn.traces import RunningStats
from optuna_ctpe.space.records import DEFAULT_BITS
from optuna_ctpe.tasks import CACHE_ENV


NAME = "sensitivity_quality"
MODELS = {
    "digits": ("optuna_ctpe.tasks.digits", "digits_task"),
    "resnet18": ("optuna_ctpe.tasks.vision", "resnet18_digits_task"),
    "mobilenet_v2": ("optuna_ctpe.tasks.vision", "mobilenet_v2_digits_task"),
    "minilm": ("optuna_ctpe.tasks.minilm", "minilm_task"),
}
REFERENCE_SEED = 10_000  # far from the seeds of the measured runs
# Why the GGN and the Hessian references estimate the same per-layer traces: (CNNs, MiniLM).
WHY_GGN_IS_THE_HESSIAN = (
    "In a piecewise-linear network (ReLU, max-pool, eval-mode batch norm: the CNNs here) the "
    "outputs are piecewise linear in each layer's weight alone, so the diagonal blocks of the "
    "Hessian and of the GGN are equal: the two references estimate the same traces and differ "
    "only by their noise.",
    "The MiniLM task's loss is least squares (‖e - e0‖²/2) with zero residual at the "
    "full-precision weights, so there the Hessian *is* the GGN (its other term is weighted by "
    "the residual): the two references estimate the same traces and differ only by their "
    "noise. For the same reason the empirical Fisher is zero there: every per-sample gradient "
    "vanishes at a zero residual.",
)


class _Recorder(RunningStats):
    """RunningStats that also keeps every added row (per-probe estimates)."""

    rows: list[np.ndarray] = []

    def add(self, values: torch.Tensor) -> None:
        _Recorder.rows.append(values.detach().double().cpu().numpy())
        super().add(values)


def probe_rows(name: str, task: Any, layers: list[str], n: int, seed: int) -> np.ndarray:
    """Per-probe trace estimates of estimator ``name``, shape (n, n_layers)."""
    module = sys.modules[ESTIMATORS[name].__module__]
    module.RunningStats = _Recorder  # type: ignore[attr-defined]
    _Recorder.rows = []
    try:
        ESTIMATORS[name](
            task.model, task.loss_fn, task.calibration_batches, layers=layers,
            max_probes=n, min_probes=n, rtol=0.0, seed=seed,
        )  # fmt: skip
    finally:
        module.RunningStats = RunningStats  # type: ignore[attr-defined]
    return np.concatenate(_Recorder.rows)[:n]


def reference(model: str, task: Any, layers: list[str], name: str, n: int) -> dict[str, Any]:
    """A long run of estimator ``name`` (cached): per-layer trace, standard error, seconds."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "optuna-ctpe")
    path = Path(root) / NAME / f"{model}-{name}-{n}-{REFERENCE_SEED}.json"
    if path.exists():
        return json.loads(path.read_text())
    start = time.perf_counter()
    rows = probe_rows(name, task, layers, n, REFERENCE_SEED)
    data = {
        "layers": layers,
        "trace": rows.mean(0).tolist(),
        "stderr": (rows.std(0, ddof=1) / np.sqrt(len(rows))).tolist(),
        "n_probes": len(rows),
        "seconds": time.perf_counter() - start,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return data


def _cached_run(model: str, name: str) -> dict[str, Any] | None:
    """The longest cached reference run of estimator ``name`` on ``model``, or None."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "optuna-ctpe")
    runs = [json.loads(f.read_text()) for f in (Path(root) / NAME).glob(f"{model}-{name}-*.json")]
    return max(runs, key=lambda r: r["n_probes"], default=None)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho; 0 when one side is constant (no ranking at all)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(stats.spearmanr(a, b).statistic)


def omega(mean_traces: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Ω of every (layer, bit-width) pair, traces clipped at 0 as measurement does."""
    return (np.clip(mean_traces, 0, None)[:, None] * errors).ravel()


def measure_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    module, factory = MODELS[model]
    task = getattr(__import__(module, fromlist=[factory]), factory)(seed=0)
    by_name = model_layers(task.model)
    layers = list(by_name)
    n_params = np.array([by_name[n].weight.numel() for n in layers], dtype=float)
    bits = DEFAULT_BITS
    errors = np.array(
        [
            [quantization_error(by_name[n].weight.detach(), b, by_name[n].out_axis) for b in bits]
            for n in layers
        ]
    )
    n_ref = args.reference_probes.get(model, args.reference_probes["default"])
    ref = reference(model, task, layers, args.reference_estimator, n_ref)
    ref_mean = np.array(ref["trace"]) / n_params
    out: dict[str, Any] = {
        "layers": layers,
        "reference": ref,
        "reference_negative": int((ref_mean < 0).sum()),
        "estimators": {},
    }
    # An unbiasedness check: a cached long run of the plain Hutchinson estimator, if any.
    check = _cached_run(model, "hutchinson") if args.reference_estimator != "hutchinson" else None
    if check is not None:
        diff = np.array(ref["trace"]) - np.array(check["trace"])
        sigma = np.hypot(ref["stderr"], check["stderr"])
        out["hutchinson_check"] = {
            "n_probes": check["n_probes"],
            "rho": spearman(np.array(check["trace"]) / n_params, ref_mean),
            "max_abs_z": float(np.max(np.abs(diff) / sigma)),
            "median_rel_stderr": float(
                np.median(np.array(check["stderr"]) / np.abs(check["trace"]))
            ),
        }
    ggn_mean = None
    if "ggn" in args.estimators:
        try:  # the GGN's own target, to tell its bias (against the Hessian) from its noise
            out["reference_ggn"] = reference(model, task, layers, "ggn", max(100, n_ref // 4))
            ggn_mean = np.array(out["reference_ggn"]["trace"]) / n_params
            out["rho_ggn_vs_hessian"] = spearman(ggn_mean, ref_mean)
        except ValueError as e:
            out["reference_ggn"] = {"error": str(e)}
    top = max(args.probes)
    unit = None
    for name in args.estimators:
        curves: dict[str, list[Any]] = {
            "trace_rho": [],
            "omega_rho": [],
            "negative": [],
            "seconds_per_probe": [],
            "trace_rho_vs_ggn": [],
        }
        try:
            for seed in range(args.seeds):
                start = time.perf_counter()
                rows = probe_rows(name, task, layers, top, seed)
                curves["seconds_per_probe"].append((time.perf_counter() - start) / top)
                means = np.cumsum(rows, 0) / np.arange(1, len(rows) + 1)[:, None] / n_params
                picks = [means[min(n, len(rows)) - 1] for n in args.probes]
                curves["trace_rho"].append([spearman(m, ref_mean) for m in picks])
                curves["omega_rho"].append(
                    [spearman(omega(m, errors), omega(ref_mean, errors)) for m in picks]
                )
                curves["negative"].append([int((m < 0).sum()) for m in picks])
                if ggn_mean is not None:
                    curves["trace_rho_vs_ggn"].append([spearman(m, ggn_mean) for m in picks])
        except ValueError as e:  # e.g. the GGN of a loss linear in the outputs
            out["estimators"][name] = {"error": str(e)}
            print(f"{model}/{name}: {e}", file=sys.stderr)
            continue
        seconds = float(np.median(curves["seconds_per_probe"]))
        if name == "hutchinson":
            unit = seconds
        out["estimators"][name] = {**curves, "seconds": seconds}
        rho = np.mean(curves["trace_rho"], 0).round(3)
        print(f"{model}/{name}: rho(traces) {rho}", flush=True)
    for result in out["estimators"].values():
        if "seconds" in result:
            result["relative_time"] = result["seconds"] / unit if unit else None
    return out


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    settings = (
        f"Reference: `{args.reference_estimator}` estimator, probes {args.reference_probes} "
        f"(seed {REFERENCE_SEED}); "
        f"measured runs: {args.seeds} seeds x {max(args.probes)} probes, read at {args.probes}; "
        f"torch {torch.__version__}, 1 thread, run under `nice` beside another benchmark on a "
        "2-core machine: absolute times are noisy, ratios less so."
    )
    lines = [report_header("Sensitivity quality: rank correlation per probe", sys.argv, settings)]
    for model, res in results.items():
        ref = res["reference"]
        rel = np.array(ref["stderr"]) / np.abs(np.array(ref["trace"]))
        lines += [
            f"## {model} ({len(res['layers'])} layers)",
            "",
            f"Reference: {ref['n_probes']} probes in {ref['seconds']:.0f} s; median relative "
            f"standard error {np.median(rel):.3f}, worst {rel.max():.3f}; "
            f"{res['reference_negative']} negative mean traces.",
            "",
        ]
        check = res.get("hutchinson_check")
        if check:
            lines += [
                f"Unbiasedness check: a {check['n_probes']}-probe plain Hutchinson run (median "
                f"relative standard error {check['median_rel_stderr']:.3f}) ranks the layers at "
                f"{check['rho']:.3f} against the reference; the largest difference of a layer's "
                f"trace is {check['max_abs_z']:.2f} combined standard errors.",
                "",
            ]
        ggn_ref = res.get("reference_ggn", {})
        if "trace" in ggn_ref:
            rel_g = np.array(ggn_ref["stderr"]) / np.abs(np.array(ggn_ref["trace"]))
            lines += [
                f"GGN reference: {ggn_ref['n_probes']} GGN probes in {ggn_ref['seconds']:.0f} s, "
                f"median relative standard error {np.median(rel_g):.3f}; Spearman of the GGN "
                f"reference against the Hessian reference: **{res['rho_ggn_vs_hessian']:.3f}**. "
                + WHY_GGN_IS_THE_HESSIAN[model == "minilm"],
                "",
            ]
        rows = []
        for name, r in res["estimators"].items():
            if "error" in r:
                rows.append([name, "n/a", "n/a", "n/a", "n/a", r["error"][:90]])
                continue
            for i, n in enumerate(args.probes):
                rho_t = np.array(r["trace_rho"])[:, i]
                rho_o = np.array(r["omega_rho"])[:, i]
                rho_g = np.array(r["trace_rho_vs_ggn"])[:, i] if r["trace_rho_vs_ggn"] else None
                rows.append(
                    [
                        name if i == 0 else "",
                        str(n),
                        f"{rho_t.mean():.3f} (min {rho_t.min():.3f})",
                        f"{rho_o.mean():.3f} (min {rho_o.min():.3f})",
                        "" if rho_g is None else f"{rho_g.mean():.3f}",
                        f"{np.mean(np.array(r['negative'])[:, i]):.1f}",
                    ]
                )
        lines += [
            markdown_table(
                [
                    "estimator",
                    "probes",
                    "Spearman traces",
                    "Spearman Ω",
                    "Spearman traces vs GGN ref.",
                    "negative traces",
                ],
                rows,
            ),
            "",
        ]
        times = [
            [name, f"{r['relative_time']:.2f}", f"{r['seconds'] * 1e3:.1f}"]
            for name, r in res["estimators"].items()
            if "seconds" in r
        ]
        lines += [
            markdown_table(["estimator", "time per probe / Hutchinson's", "ms per probe"], times),
            "",
        ]
    return "\n".join(lines)


def plot(results: dict[str, Any], probes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(4 * len(results), 6.5), squeeze=False)
    for j, (model, res) in enumerate(results.items()):
        for i, key in enumerate(("trace_rho", "omega_rho")):
            ax = axes[i][j]
            for name, r in res["estimators"].items():
                if key in r:
                    values = np.array(r[key])
                    ax.errorbar(probes, values.mean(0), yerr=values.std(0), label=name, capsize=2)
            ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
            ax.set_xscale("log")
            ax.set_title(f"{model}: {'per-layer traces' if i == 0 else 'Ω of (layer, bits)'}")
            ax.set_xlabel("probes (HVP / VJP / samples)")
            ax.set_ylabel("Spearman vs reference")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="digits,resnet18,mobilenet_v2,minilm")
    parser.add_argument("--estimators", default="hutchinson,split,ggn,fisher")
    parser.add_argument(
        "--reference-estimator",
        default="split",
        help="unbiased estimator of the reference run (split: Hutchinson with the GGN as a "
        "control variate, the least noisy per probe)",
    )
    parser.add_argument("--probes", default="5,10,20,50,100")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--reference-probes",
        default="digits=4000,default=500",
        help="model=N,...: Hutchinson probes of each reference ('default' for the others)",
    )
    parser.add_argument("--output", default=NAME)
    args = parser.parse_args()
    args.models = args.models.split(",")
    args.estimators = args.estimators.split(",")
    args.probes = sorted(int(p) for p in args.probes.split(","))
    args.reference_probes = {
        k: int(v) for k, v in (item.split("=") for item in args.reference_probes.split(","))
    }
    torch.set_num_threads(1)
    results = {}
    for model in args.models:
        results[model] = measure_model(model, args)
        # Written after each model: a long run interrupted still leaves what it measured.
        (RESULTS_DIR / f"{args.output}.json").write_text(json.dumps(results, indent=1))
        (RESULTS_DIR / f"{args.output}.md").write_text(report(results, args))
        plot(results, args.probes, RESULTS_DIR / f"{args.output}.png")


if __name__ == "__main__":
    main()
