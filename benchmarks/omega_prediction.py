"""Does Ω predict what a choice costs? Predicted Ω/2 against the measured loss increase.

HAWQ-V2's Ω of a configuration is twice its second-order loss increase; the pruning rule, the
priors and the ILP warm starts all trust it. For each model (a task's trained model, its
space measured with ``estimator="ggn"``, the estimator that ranks the per-layer traces best on
these ReLU networks in ``results/sensitivity_quality.md``), the benchmark draws four families
of changes from the FP32 model:

* (a) single-layer bit-widths: one layer quantized, every other weight float;
* (b) single-group widths: one width group pruned (no fine-tuning), every weight float;
* (c) whole-model bits-only configurations (fixed first and last layers at 8 bits);
* (d) whole-model joint configurations of bit-widths and width ratios;

and compares the prediction Ω/2 (``space.omega`` for (a) and (b), ``space.perturbation`` for (c)
and (d), which leaves out the fixed layers) with the MEASURED increase of the task's loss
averaged over its calibration batches, and with the drop of the validation accuracy: Spearman
rank correlations, Pearson correlations of log values (over the changes whose measured increase
is positive) and the calibration factor (median of measured / predicted). Width predictions
come twice: second-order, and calibrated (``from_model(calibrate_widths=True)``, see
:mod:`optuna_ctpe.nn.width_calibration`), which prices each (group, ratio) at the larger of Ω
and twice its measured single-group loss increase.

Then the first ILP warm start (``warm_starts`` on the space relaxed for the size, as
``optuna-ctpe search`` enqueues it) at 1/8 and 1/16 of the FP32 size, before and after
calibration: its predicted and measured loss increase and its validation error.

Run ``python benchmarks/omega_prediction.py`` from the repository root (``--models`` among
digits, resnet18, mobilenet_v2); it writes ``benchmarks/results/omega_prediction.{md,json,png}``.

``--formats`` measures instead the two readings of a weight format's change
(``from_model(formats=..., format_error="output" | "weight")``, see
:func:`optuna_ctpe.nn.formats.format_errors`) on :data:`FORMAT_GRID`: (e) single-layer formats,
one layer in a format and every other weight float, and (f) whole-model configurations, a
random format per layer; predicted Ω/2 of each reading against the measured calibration-loss
increase. It writes ``benchmarks/results/omega_prediction_formats.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time
from typing import Any
import warnings

from _common import markdown_table
from _common import report_header
from _common import RESULTS_DIR
import numpy as np
from scipy import stats
import torch

from optuna_ctpe import HessianSearchSpace
from optuna_ctpe.nn.quantize import quantize_model
from optuna_ctpe.nn.width_calibration import calibrate_groups
from optuna_ctpe.nn.width_calibration import calibration_loss
from optuna_ctpe.space.records import QuantConfig


NAME = "omega_prediction"
MODELS = {
    "digits": ("optuna_ctpe.tasks.digits", "digits_task"),
    "resnet18": ("optuna_ctpe.tasks.vision", "resnet18_digits_task"),
    "mobilenet_v2": ("optuna_ctpe.tasks.vision", "mobilenet_v2_digits_task"),
}
FAMILIES = {
    "a": "single-layer bits",
    "b": "single-group widths",
    "c": "whole-model bits",
    "d": "whole-model bits+widths",
}
SIZE_RATIOS = (1 / 8, 1 / 16)
#: The formats ``--formats`` measures: GPTQ and round to nearest on one grid, and today's.
FORMAT_GRID = [
    *(f"int{b}-g32-asym-gptq" for b in (2, 3, 4)),
    *(f"int{b}-g32-asym-rtn" for b in (2, 3, 4)),
    *(f"int{b}-pc-sym-rtn" for b in (2, 3, 4)),
]


def _spaces(task: Any) -> tuple[HessianSearchSpace, HessianSearchSpace, float, float]:
    """The second-order and the calibrated space, and the seconds each measurement took."""
    start = time.perf_counter()
    plain = HessianSearchSpace.from_model(
        task.model,
        task.loss_fn,
        task.calibration_batches,
        example_inputs=task.example_inputs,
        estimator="ggn",
    )
    measured = time.perf_counter() - start
    start = time.perf_counter()
    groups = calibrate_groups(
        task.model,
        task.loss_fn,
        task.calibration_batches,
        task.example_inputs,
        list(plain.groups.values()),
    )
    calibrating = time.perf_counter() - start
    calibrated = HessianSearchSpace(
        list(plain.sensitivities.values()),
        groups,
        tensors=plain.tensors,
        bits=plain.bits,
        widths=plain.widths,
        budget=plain.budget,
        fixed_bits=dict(plain.fixed_bits),
        trace_z=plain.trace_z,
    )
    return plain, calibrated, measured, calibrating


def _random_config(
    space: HessianSearchSpace, rng: np.random.Generator, joint: bool
) -> QuantConfig:
    """Per config a floor drawn from the grid, then each choice uniformly at or above it, so
    the family spans near-lossless to everything-at-the-bottom configurations."""
    bits_floor = rng.integers(len(space.bits))
    bits = {
        n: space.fixed_bits.get(n, int(rng.choice(space.bits[bits_floor:])))
        for n in space.sensitivities
    }
    widths = dict.fromkeys(space.groups, 1.0)
    if joint:
        width_floor = rng.integers(len(space.widths))
        widths = {g: float(rng.choice(space.widths[width_floor:])) for g in space.groups}
    return QuantConfig(bits, widths)


def _changes(space: HessianSearchSpace, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Up to ``n`` changes per family: every single change when there are at most ``n``."""
    singles_a = [(layer, b) for layer in space.sensitivities for b in space.bits if b < 16]
    singles_b = [(g, w) for g in space.groups for w in space.widths if w < 1]
    out: list[dict[str, Any]] = []
    for family, singles in (("a", singles_a), ("b", singles_b)):
        picks = range(len(singles))
        if len(singles) > n:
            picks = sorted(rng.choice(len(singles), size=n, replace=False))
        out += [{"family": family, "name": singles[i][0], "choice": singles[i][1]} for i in picks]
    for family, joint in (("c", False), ("d", True)):
        seen: set[QuantConfig] = set()
        for _ in range(20 * n):
            config = _random_config(space, rng, joint)
            if config not in seen:
                seen.add(config)
                out.append({"family": family, "config": config})
            if len(seen) == n:
                break
    return out


def _predicted(space: HessianSearchSpace, change: dict[str, Any]) -> float:
    """Ω/2 of a change: of its one choice, or summed over a configuration."""
    if "config" in change:
        return space.perturbation(change["config"]) / 2
    prefix = "bits" if change["family"] == "a" else "width"
    return space.omega[f"{prefix}:{change['name']}"][change["choice"]] / 2


def _changed_model(space: HessianSearchSpace, task: Any, change: dict[str, Any]) -> Any:
    if change["family"] == "a":
        return quantize_model(task.model, {change["name"]: change["choice"]})
    if change["family"] == "b":
        widths = {**dict.fromkeys(space.groups, 1.0), change["name"]: change["choice"]}
        config = QuantConfig(space.uniform(8).bits, widths)
        return space.prune(task.model, config, task.example_inputs)
    return space.apply(task.model, change["config"], task.example_inputs)


def _correlations(pred: np.ndarray, meas: np.ndarray, drop: np.ndarray) -> dict[str, Any]:
    positive = (meas > 0) & (pred > 0)
    if len(pred) < 3 or np.ptp(pred) == 0:
        return {"n": int(len(pred))}
    return {
        "n": int(len(pred)),
        "spearman_loss": float(stats.spearmanr(pred, meas).statistic),
        "spearman_drop": float(stats.spearmanr(pred, drop).statistic),
        "n_positive": int(positive.sum()),
        "pearson_loglog": float(stats.pearsonr(np.log(pred[positive]), np.log(meas[positive]))[0])
        if positive.sum() >= 3
        else math.nan,
        "factor": float(np.median(meas[pred > 0] / pred[pred > 0])),
    }


def _warm_starts(space: HessianSearchSpace, task: Any, l0: float, a0: float) -> list[dict]:
    """The first warm start (and the bits-only ILP, when it comes second) at each size."""
    rows = []
    for ratio in SIZE_RATIOS:
        relaxed = space.relaxed_for_size(ratio)
        for rank, params in enumerate(relaxed.warm_starts(size_ratio=ratio, n=2)):
            config = relaxed.config_from_params(params)
            bits_only = all(w == 1 for w in config.widths.values())
            if rank and not bits_only:
                continue
            net = relaxed.apply(task.model, config, task.example_inputs)
            acc = float(task.evaluate(net))
            # The two halves alone: is a miss the widths', the bits' or their interaction's?
            parts = (
                quantize_model(task.model, dict(config.bits)),
                relaxed.prune(task.model, config, task.example_inputs),
            )
            bits_part, widths_part = (
                calibration_loss(m, task.loss_fn, task.calibration_batches) - l0 for m in parts
            )
            rows.append(
                {
                    "size_ratio": ratio,
                    "rank": rank + 1,
                    "bits_only": bits_only,
                    "bits": dict(config.bits),
                    "widths": dict(config.widths),
                    "size": relaxed.size(config) / relaxed.fp32_bits,
                    "predicted": relaxed.perturbation(config) / 2,
                    "measured": calibration_loss(net, task.loss_fn, task.calibration_batches) - l0,
                    "error": 1 - acc,
                    "drop": a0 - acc,
                    "measured_bits_part": bits_part,
                    "measured_widths_part": widths_part,
                }
            )
    return rows


def measure_model(model: str, n: int, seed: int) -> dict[str, Any]:
    module, factory = MODELS[model]
    task = getattr(importlib.import_module(module), factory)(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning's and the clipping's notes
        plain, calibrated, t_measure, t_calibrate = _spaces(task)
    l0 = calibration_loss(task.model, task.loss_fn, task.calibration_batches)
    a0 = float(task.evaluate(task.model))
    start = time.perf_counter()
    points = []
    for change in _changes(plain, n, np.random.default_rng(seed)):
        net = _changed_model(plain, task, change)
        points.append(
            {
                "family": change["family"],
                "change": repr(change.get("config", (change.get("name"), change.get("choice")))),
                "predicted": _predicted(plain, change),
                "calibrated": _predicted(calibrated, change),
                "measured": calibration_loss(net, task.loss_fn, task.calibration_batches) - l0,
                "drop": a0 - float(task.evaluate(net)),
            }
        )
    t_points = time.perf_counter() - start
    stats_rows = {}
    for family in FAMILIES:
        chosen = [p for p in points if p["family"] == family]
        meas = np.array([p["measured"] for p in chosen])
        drop = np.array([p["drop"] for p in chosen])
        for which in ("predicted", "calibrated"):
            pred = np.array([p[which] for p in chosen])
            stats_rows[f"{family}/{which}"] = _correlations(pred, meas, drop)
    return {
        "task": task.name,
        "layers": len(plain.sensitivities),
        "groups": len(plain.groups),
        "fp32_loss": l0,
        "fp32_accuracy": a0,
        "seconds": {"space": t_measure, "calibration": t_calibrate, "points": t_points},
        "points": points,
        "stats": stats_rows,
        "warm_starts": {
            "second-order": _warm_starts(plain, task, l0, a0),
            "calibrated": _warm_starts(calibrated, task, l0, a0),
        },
    }


def _f(value: Any, spec: str = ".3f") -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:{spec}}"
    )


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    settings = (
        f"Space: `from_model(estimator='ggn')`, default grids and pruning; up to {args.n} "
        f"changes per family (all single changes where fewer), seed {args.seed}; torch "
        f"{torch.__version__}, 1 thread, under `nice` beside another benchmark on 2 cores."
    )
    lines = [
        report_header(
            "Ω prediction: predicted against measured loss increase",
            ["benchmarks/omega_prediction.py", *args.argv],
            settings,
        )
    ]
    lines.append(
        "Predicted: Ω/2 (second-order); calibrated: widths priced at max(Ω, 2 × measured "
        "single-group increase). Measured: increase of the calibration loss over FP32's. "
        "Spearman against the loss increase and against the validation-accuracy drop; Pearson "
        "of log values over the changes whose measured increase is > 0 (n > 0); factor: "
        "median of measured / predicted (1 = calibrated, > 1 = under-predicted).\n"
    )
    for model, r in results.items():
        s = r["seconds"]
        lines.append(f"## {model} ({r['layers']} layers, {r['groups']} width groups)\n")
        lines.append(
            f"FP32: calibration loss {r['fp32_loss']:.4f}, validation accuracy "
            f"{r['fp32_accuracy']:.4f}. GGN space measured in {s['space']:.1f} s; width "
            f"calibration {s['calibration']:.1f} s; {len(r['points'])} changes measured in "
            f"{s['points']:.0f} s.\n"
        )
        rows = []
        for family, label in FAMILIES.items():
            for which in ("predicted", "calibrated"):
                st = r["stats"][f"{family}/{which}"]
                if which == "calibrated" and family in ("a", "c"):
                    continue  # bits carry no calibration: the same numbers
                rows.append(
                    [
                        f"({family}) {label}",
                        "second-order" if which == "predicted" else "calibrated",
                        str(st["n"]),
                        _f(st.get("spearman_loss")),
                        _f(st.get("spearman_drop")),
                        f"{_f(st.get('pearson_loglog'))} (n>0: {st.get('n_positive', 0)})",
                        _f(st.get("factor"), ".3g"),
                    ]
                )
        header = [
            "family",
            "Ω",
            "n",
            "Spearman loss",
            "Spearman acc. drop",
            "Pearson log-log",
            "factor",
        ]
        lines += [markdown_table(header, rows), ""]
        rows = []
        for which, starts in r["warm_starts"].items():
            for w in starts:
                rows.append(
                    [
                        f"1/{round(1 / w['size_ratio'])}",
                        which,
                        f"{w['rank']}" + (" (bits-only)" if w["bits_only"] else " (joint)"),
                        f"{w['size']:.4f}",
                        _f(w["predicted"], ".4g"),
                        _f(w["measured"], ".4g"),
                        _f(w["measured_bits_part"], ".4g"),
                        _f(w["measured_widths_part"], ".4g"),
                        _f(w["error"], ".4f"),
                        " ".join(f"{g}={v:g}" for g, v in w["widths"].items() if v < 1) or "all 1",
                    ]
                )
        header = [
            "size",
            "Ω",
            "warm start",
            "size / FP32",
            "predicted ΔL",
            "measured ΔL",
            "bits alone",
            "widths alone",
            "val. error",
            "widths < 1",
        ]
        lines += [
            f"ILP warm starts (FP32 error {1 - r['fp32_accuracy']:.4f}):\n",
            markdown_table(header, rows),
            "",
        ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(results), 4, figsize=(16, 3.6 * len(results)), squeeze=False, layout="constrained"
    )
    for row, (model, r) in zip(axes, results.items()):
        floor = 1e-5
        for ax, (family, label) in zip(row, FAMILIES.items()):
            chosen = [p for p in r["points"] if p["family"] == family]
            meas = np.maximum([p["measured"] for p in chosen], floor)
            for which, color in (("predicted", "tab:gray"), ("calibrated", "tab:red")):
                if which == "calibrated" and family in ("a", "c"):
                    continue
                pred = np.maximum([p[which] for p in chosen], floor)
                ax.scatter(
                    pred,
                    meas,
                    s=12,
                    color=color,
                    label="second-order" if which == "predicted" else "calibrated",
                )
            lo, hi = floor, max(meas.max(), 1.0)
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set(
                xscale="log",
                yscale="log",
                title=f"{model}: ({family}) {label}",
                xlabel="predicted Ω/2",
                ylabel=f"measured ΔL (floor {floor:g})",
            )
            if family in ("b", "d"):
                ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _calibration_loss(task: Any, net: Any) -> float:
    with torch.no_grad():
        return float(np.mean([float(task.loss_fn(net, b)) for b in task.calibration_batches]))


def measure_formats(model: str, n: int, seed: int) -> dict[str, Any]:
    """Families (e) and (f) of the module docstring under both readings of a format's change."""
    from optuna_ctpe.nn.formats import formats_in_place

    module, factory = MODELS[model]
    task = getattr(importlib.import_module(module), factory)(seed=seed)
    kwargs = {"formats": FORMAT_GRID, "estimator": "ggn", "keep_first_last_bits": None}
    spaces = {
        reading: HessianSearchSpace.from_model(
            task.model, task.loss_fn, task.calibration_batches, format_error=reading, **kwargs
        )
        for reading in ("output", "weight")
    }
    quantizer = spaces["output"].format_quantizer(task.model)
    l0 = _calibration_loss(task, task.model)
    rng = np.random.default_rng(seed)
    layers = list(spaces["output"].sensitivities)
    changes = [{layer: f} for layer in layers for f in FORMAT_GRID]
    changes += [{layer: FORMAT_GRID[rng.integers(len(FORMAT_GRID))] for layer in layers}
                for _ in range(n)]  # fmt: skip
    measured, predicted = [], {r: [] for r in spaces}
    for change in changes:
        with formats_in_place(task.model, change, quantizer) as net:
            measured.append(_calibration_loss(task, net) - l0)
        for reading, space in spaces.items():
            omega = space.omega
            predicted[reading].append(
                sum(omega[f"format:{layer}"][f] for layer, f in change.items()) / 2
            )
    single = len(layers) * len(FORMAT_GRID)
    meas = np.array(measured)
    out: dict[str, Any] = {"l0": l0, "n_layers": len(layers)}
    for reading, values in predicted.items():
        pred = np.array(values)
        for family, part in (("e", slice(0, single)), ("f", slice(single, None))):
            out[f"{reading}/{family}"] = _correlations(pred[part], meas[part], meas[part])
    return out


def format_report(results: dict[str, Any], argv: list[str]) -> str:
    """The Markdown of :func:`measure_formats`' results."""
    header = report_header(
        "Ω of weight formats: the output-error reading against the weight-error reading",
        ["benchmarks/omega_prediction.py", *argv],
        f"formats {FORMAT_GRID}; GGN traces; every layer searched.",
    )
    rows = []
    for model, result in results.items():
        for family, label in (("e", "single-layer formats"), ("f", "whole-model formats")):
            for reading in ("output", "weight"):
                c = result[f"{reading}/{family}"]
                rows.append(
                    [model, label, reading, str(c["n"]), _f(c.get("spearman_loss")),
                     _f(c.get("pearson_loglog")), _f(c.get("factor"), ".3g")]
                )  # fmt: skip
    notes = (
        "- Measured: the calibration-loss increase over FP32 (mean over the calibration "
        "batches); predicted: Ω/2 of the changed layers under each reading.\n"
        "- Spearman: rank correlation of predicted and measured; log-log Pearson over the "
        "changes whose measured increase is positive; factor: median measured / predicted.\n\n"
    )
    table = markdown_table(
        ["model", "family", "reading", "n", "Spearman", "log-log Pearson", "factor"], rows
    )
    return header + notes + table + "\n"


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="digits,resnet18")
    parser.add_argument(
        "--n",
        default="digits=60,default=25",
        help="model=N,...: changes per family, at most ('default' for the others)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=NAME)
    parser.add_argument("--formats", action="store_true", help="measure format readings")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    args.n = {k: int(v) for k, v in (item.split("=") for item in args.n.split(","))}
    torch.set_num_threads(1)
    if args.formats:
        found = {
            model: measure_formats(model, args.n.get(model, args.n["default"]), args.seed)
            for model in args.models.split(",")
        }
        text = format_report(found, args.argv)
        (RESULTS_DIR / f"{NAME}_formats.md").write_text(text)
        print(text)
        return
    results = {}
    for model in args.models.split(","):
        results[model] = measure_model(model, args.n.get(model, args.n["default"]), args.seed)
        # Written after each model: a long run interrupted still leaves what it measured.
        (RESULTS_DIR / f"{args.output}.json").write_text(
            json.dumps(results, indent=1, default=str)
        )
        (RESULTS_DIR / f"{args.output}.md").write_text(report(results, args))
        plot(results, RESULTS_DIR / f"{args.output}.png")


if __name__ == "__main__":
    main()
