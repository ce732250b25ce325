"""The report of ``benchmarks/latency_search.py``: hypervolumes, tables, the markdown and JSON.

Pure helpers over the records the benchmark collects (run trials, front keys, measured points);
only :func:`write_report` writes files (the figure: ``_latency_search_plot.py``).
"""

from __future__ import annotations

import argparse
from collections import Counter
import json
import statistics
import sys
from typing import Any

from _common import fmt_p
from _common import mann_whitney
from _common import markdown_table
from _common import report_header
from _common import RESULTS_DIR
from _latency_search_fronts import hypervolume_2d
from _latency_search_plot import plot_fronts
import numpy as np
from scipy import stats
import torch


def _run_scores(
    space: Any, table: Any, runs: dict[str, Any], reference: tuple[float, float, float]
) -> list[list[str]]:
    """Per search: median (min-max over runs) of the distinct Pareto-optimal configurations and
    of the 2-D hypervolumes of every trial a run evaluated, in (accuracy, predicted batch-1 ms)
    and (accuracy, accounted KB); then one-sided Mann-Whitney U p-values between the searches."""
    scores: dict[str, dict[str, list[float]]] = {}
    for name, search_runs in runs.items():
        scores[name] = {"front": [], "latency": [], "size": []}
        for run in search_runs:
            configs = [space.config_from_params(t["params"]) for t in run]
            acc = np.array([t["values"][0] for t in run])
            ms = np.array([table.predict(c) for c in configs])
            kb = np.array([space.size(c) / 8192 for c in configs])
            # Repeated configurations tie exactly, and Optuna keeps every tied trial.
            front = {repr(c.key()) for c, t in zip(configs, run) if t["pareto"]}
            scores[name]["front"].append(len(front))
            scores[name]["latency"].append(hypervolume_2d(acc, ms, reference[:2]))
            scores[name]["size"].append(hypervolume_2d(acc, kb, reference[::2]))

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.4g} ({min(values):.4g}-{max(values):.4g})"

    rows = [[name, *(spread(v) for v in s.values())] for name, s in scores.items()]
    a, b = scores.values()  # latency-aware, size-only
    for alternative, label in (("greater", "latency-aware larger"), ("less", "size-only larger")):
        rows.append(
            [
                f"p ({label}, one-sided)",
                "",
                fmt_p(mann_whitney(np.array(a["latency"]), np.array(b["latency"]), alternative)),
                fmt_p(mann_whitney(np.array(a["size"]), np.array(b["size"]), alternative)),
            ]
        )
    return rows


def _entries(space: Any, table: Any, kind: Any) -> list[list[str]]:
    """The table's entries at full width: what each bit-width costs per layer kind (the median
    over the layers of a kind), and the bit-widths the pruning kept for any of them."""
    by_kind: dict[str, list[str]] = {}
    for name in table.layers:
        by_kind.setdefault(kind(name), []).append(name)
    rows = []
    for label, names in by_kind.items():
        full = [
            {bits: ms for (bits, ratios), ms in table.layers[n].ms.items() if set(ratios) <= {1}}
            for n in names
        ]
        kept = {
            b for n in names for b in space.choices.get(f"bits:{n}", (space.fixed_bits.get(n),))
        }
        rows.append(
            [
                f"`{label}`" if len(names) == 1 else f"`{label}` (x{len(names)})",
                *(
                    f"{1000 * statistics.median(f[b] for f in full):.1f}"
                    for b in (*space.bits, 32)
                ),
                ", ".join(str(b) for b in sorted(kept)),
            ]
        )
    return rows


def _fastest_and_smallest(
    fronts: dict[str, Any], points: dict[str, Any], levels: list[float], big: int
) -> list[list[str]]:
    """Per metric level and search: the fastest measured (batch 1 and ``big``) and the
    smallest ONNX file among the front's configurations at or above that level."""
    rows = []
    for level in levels:
        for name, front in fronts.items():
            ok = [points[k] for k in front if points[k]["accuracy"] >= level - 1e-12]
            if not ok:
                rows.append([f">= {level:.4f}", name, "-", "-", "-"])
                continue
            fast = min(ok, key=lambda p: p["b1"]["measured_ms"])
            fast32 = min(ok, key=lambda p: p[f"b{big}"]["measured_ms"])
            small = min(ok, key=lambda p: p["file_kb"])
            rows.append(
                [
                    f">= {level:.4f}",
                    name,
                    f"{fast['b1']['measured_ms']:.4f} (`{fast['label']}`)",
                    f"{fast32[f'b{big}']['measured_ms']:.3f} (`{fast32['label']}`)",
                    f"{small['file_kb']:.1f} (`{small['label']}`)",
                ]
            )
    return rows


def _findings(
    fronts: dict[str, Any], points: dict[str, Any], levels: list[float], big: int
) -> list[str]:
    """Where the two fronts differ, in numbers read off the measurements: at the highest of
    ``levels`` both fronts reach, and against FP32's latency."""
    fp32 = points["FP32"]
    lines = []
    for level in levels:
        top = {
            name: [points[k] for k in front if points[k]["accuracy"] >= level - 1e-12]
            for name, front in fronts.items()
        }
        if not all(top.values()):
            continue
        best = {
            name: (
                min(ok, key=lambda p: p["b1"]["measured_ms"]),
                min(ok, key=lambda p: p["file_kb"]),
            )
            for name, ok in top.items()
        }
        (fast_a, small_a), (fast_b, small_b) = best.values()
        ratio = fast_a["b1"]["measured_ms"] / fast_b["b1"]["measured_ms"]
        lines.append(
            f"At {level:.4f} or more (FP32: {fp32['accuracy']:.4f}) the latency-aware front's "
            f"fastest model (`{fast_a['label']}`) runs in {fast_a['b1']['measured_ms']:.4f} ms at "
            f"batch 1, {ratio - 1:+.0%} against the size-only front's fastest "
            f"(`{fast_b['label']}`, {fast_b['b1']['measured_ms']:.4f} ms); its file is "
            f"{fast_a['file_kb']:.1f} KB against {fast_b['file_kb']:.1f} KB. Both fronts' "
            f"smallest files at that level: {small_a['file_kb']:.1f} and "
            f"{small_b['file_kb']:.1f} KB."
        )
        break
    integer = [p for k, p in points.items() if k != "FP32"]
    for field in ("b1", f"b{big}"):
        fastest = min(integer, key=lambda p: p[field]["measured_ms"])
        faster = [p for p in integer if p[field]["measured_ms"] < fp32[field]["measured_ms"]]
        lines.append(
            f"Batch {field[1:]}: {len(faster)} of the {len(integer)} integer models (fronts and "
            f"uniform baselines) run faster than FP32 ({fp32[field]['measured_ms']:.4f} ms); the "
            f"fastest, `{fastest['label']}`, runs in {fastest[field]['measured_ms']:.4f} ms "
            f"({fastest[field]['measured_ms'] / fp32[field]['measured_ms'] - 1:+.0%}). FP32's "
            f"file is {fp32['file_kb']:.0f} KB."
        )
    return [f"- {line}" for line in lines]


def _searched_kinds(space: Any, kind: Any) -> dict[str, list[str]]:
    """Layer kind -> its searched layers (the fixed ones left out), in the space's order."""
    kinds: dict[str, list[str]] = {}
    for name in (n for n in space.sensitivities if n not in space.fixed_bits):
        kinds.setdefault(kind(name), []).append(name)
    return kinds


def _choices(
    space: Any, fronts: dict[str, Any], points: dict[str, Any], kind: Any
) -> list[list[str]]:
    """Per search: how often the searched layers of each kind take each bit-width, and each
    group each width, over the front's configurations."""
    rows = []
    for name, front in fronts.items():
        good = [points[k] for k in front]
        cells = [name, str(len(good))]
        for layers in _searched_kinds(space, kind).values():
            counts = Counter(p["bits"][n] for p in good for n in layers)
            cells.append(", ".join(f"{b}b x{counts[b]}" for b in sorted(counts)))
        for group in space.groups:
            counts = Counter(p["widths"][group] for p in good)
            cells.append(", ".join(f"{w:g} x{counts[w]}" for w in sorted(counts)))
        rows.append(cells)
    return rows


def _point_header(metric: str, big: int) -> list[str]:
    return [
        "configuration",
        metric,
        "ms, batch 1 (noise)",
        "predicted",
        f"ms, batch {big} (noise)",
        "predicted",
        "file KB",
        "packed KB",
        "accounted KB",
    ]


def _point_rows(keys: list[str], points: dict[str, Any], big: int) -> list[list[str]]:
    rows = []
    for key in sorted(keys, key=lambda k: -points[k]["accuracy"]):
        p = points[key]
        rows.append(
            [
                f"`{p['label']}`",
                f"{p['accuracy']:.4f}",
                f"{p['b1']['measured_ms']:.4f} ({p['b1']['noise']:.0%})",
                f"{p['b1']['predicted_ms']:.4f}",
                f"{p[f'b{big}']['measured_ms']:.3f} ({p[f'b{big}']['noise']:.0%})",
                f"{p[f'b{big}']['predicted_ms']:.3f}",
                f"{p['file_kb']:.1f}",
                "-" if p["packed_kb"] is None else f"{p['packed_kb']:.1f}",
                f"{p['accounted_kb']:.1f}",
            ]
        )
    return rows


def _layers_text(space: Any, bench: Any) -> str:
    """The searched and fixed layers and the width groups, in a sentence."""
    layers = [n for n in space.sensitivities if n not in space.fixed_bits]
    searched = (
        ", ".join(f"`{n}`" for n in layers)
        if len(layers) <= 8
        else f"{len(layers)} of the {len(space.sensitivities)} layers"
    )
    groups = ", ".join(f"`{g}`" for g in space.groups) or "none"
    fixed = ", ".join(f"`{n}`" for n in space.fixed_bits)
    return f"Searched layers {searched} (fixed at 8 bits: {fixed}); width groups {groups}."


def write_report(
    bench: Any,
    args: argparse.Namespace,
    argv: list[str] | None,
    space: Any,
    tables: dict[int, Any],
    runs: dict[str, Any],
    fronts: dict[str, Any],
    points: dict[str, Any],
    baselines: list[str],
    context: dict[str, Any],
) -> None:
    """Write ``results/<bench.stem><tag>.md``, ``.png`` and ``.json``.

    Args:
        bench: The task's :class:`~_latency_search_tasks.Bench`.
        args: The benchmark's parsed options (task, seeds, trials, repeats, tag).
        argv: Its command line, for the header.
        space: The search space.
        tables: Batch -> the latency table measured at that batch.
        runs: Search -> its runs, each a list of ``{"params", "values", "pareto"}`` trials.
        fronts: Search -> {configuration key: configuration} of its front.
        points: Configuration key (or baseline name) -> what was measured of its model.
        baselines: The keys of ``points`` that are baselines (FP32, uniform 8- and 4-bit).
        context: Load averages, search seconds per run, total seconds, onnxruntime version.
    """
    stem = f"{bench.stem}{args.tag}"
    first, big = bench.batches[0], bench.batches[-1]
    word = bench.metric.split()[-1]
    plot_fronts(bench, fronts, points, baselines, RESULTS_DIR / f"{stem}.png")
    fp32_acc = points["FP32"]["accuracy"]
    # Hypervolume reference: hv_below under FP32's metric, the slowest table prediction and
    # the largest accounted size of any trial of either search.
    all_configs = [
        space.config_from_params(t["params"]) for r in runs.values() for run in r for t in run
    ]
    reference = (
        fp32_acc - bench.hv_below,
        max(tables[first].predict(c) for c in all_configs),
        max(space.size(c) for c in all_configs) / 8192,
    )
    measured = list(points)
    rho = {
        b: stats.spearmanr(
            [points[k][f"b{b}"]["predicted_ms"] for k in measured],
            [points[k][f"b{b}"]["measured_ms"] for k in measured],
        ).statistic
        for b in tables
    }
    rho_again = stats.spearmanr(
        [points[k][f"b{first}"]["measured_ms"] for k in measured],
        [points[k]["b1_again_ms"] for k in measured],
    ).statistic
    noise = {b: statistics.median(points[k][f"b{b}"]["noise"] for k in measured) for b in tables}
    header = report_header(
        f"Latency-aware vs size-only search ({bench.title}, onnxruntime CPU)",
        ["benchmarks/latency_search.py", *(argv if argv is not None else sys.argv[1:])],
        f"torch {torch.__version__}, onnxruntime {context['onnxruntime']}, 1 intra-op and 1 "
        f"inter-op thread (torch 1 thread), {args.seeds} runs x {args.trials} trials per "
        f"search, {args.repeats} timed runs per model and batch; search "
        f"{context['search_s']['latency-aware']:.0f} s (latency-aware) and "
        f"{context['search_s']['size-only']:.0f} s (size-only) per run ({bench.metric} cached "
        "across runs), "
        f"{context['total_s'] / 60:.1f} min in all; load average {context['load'][0]:.1f} at "
        f"the start and {context['load'][1]:.1f} at the end (other processes share "
        "the machine: the noise below is theirs too)",
    )
    kinds = _searched_kinds(space, bench.kind)
    cap = (
        ""
        if bench.front_cap is None
        else f" Each front is cut to at most {bench.front_cap} configurations, spread along "
        "it (`spread_front`: those non-dominated in metric x the search's first cost first)."
    )
    sections = [
        header,
        f"{_layers_text(space, bench)} {bench.notes} Latency: median of the "
        "whole exported ONNX model, every model of the table timed in the same 20 rounds "
        "(interleaved); `noise` is its interquartile range over its median. `predicted`: the "
        f"lookup table of the search (batch {first}), measured again at batch {big}. "
        "`file KB`: the ONNX file; `packed KB`: the `save_packed` safetensors file; `accounted "
        f"KB`: `space.size(config) / 8`.{cap}",
        f"Timing noise: median IQR/median {noise[first]:.1%} at batch {first} and "
        f"{noise[big]:.1%} at batch {big}; a second batch-{first} pass over the same files "
        f"ranks them with Spearman {rho_again:.3f} against the first. Table prediction vs "
        f"measurement over the {len(measured)} models: Spearman {rho[first]:.3f} (batch "
        f"{first}), {rho[big]:.3f} (batch {big}).",
        "## Baselines\n\n"
        + markdown_table(_point_header(word, big), _point_rows(baselines, points, big)),
        f"## What each bit-width costs on this runtime\n\nThe lookup table's batch-{first} "
        "entries at full width, in microseconds (one-layer graphs, the per-call cost taken off; "
        f"remainder of the model {1000 * tables[first].remainder_ms:.1f} us; a kind of several "
        "layers: their median). `kept`: the bit-widths the Hessian pruning left to the "
        "search.\n\n"
        + markdown_table(
            ["layer", *(f"{b} bits" for b in space.bits), "FP32", "kept"],
            _entries(space, tables[first], bench.kind),
        ),
        "## What each search finds per run\n\nEvery trial a run evaluated (the Pareto "
        "front a user could read off its study in that plane), as the 2-D hypervolume above "
        f"the reference ({word} {reference[0]:.4f}, {reference[1]:.4f} ms, "
        f"{reference[2]:.1f} KB); latency is the table's batch-{first} prediction.\n\n"
        + markdown_table(
            [
                "search",
                "distinct Pareto-optimal configurations",
                f"HV {word} x predicted ms",
                f"HV {word} x accounted KB",
            ],
            _run_scores(space, tables[first], runs, reference),
        ),
        "## Where the searches differ\n\n"
        + "\n".join(_findings(fronts, points, [fp32_acc - d for d in bench.levels], big)),
        f"## Best measured model per {word} level\n\n"
        + markdown_table(
            [
                word,
                "search",
                f"fastest, batch {first} ms",
                f"fastest, batch {big} ms",
                "smallest file KB",
            ],
            _fastest_and_smallest(fronts, points, [fp32_acc - d for d in bench.levels], big),
        ),
        "## Bit-widths and widths on the fronts\n\n"
        + markdown_table(
            [
                "search",
                "configurations",
                *(
                    f"`{k}` bits" if len(n) == 1 else f"`{k}` bits (x{len(n)})"
                    for k, n in kinds.items()
                ),
                *(f"`{g}` width" for g in space.groups),
            ],
            _choices(space, fronts, points, bench.kind),
        ),
        f"![fronts]({stem}.png)",
    ]
    for name, front in fronts.items():
        sections.append(
            f"## {name} front ({len(front)} configurations)\n\n"
            + markdown_table(_point_header(word, big), _point_rows(list(front), points, big))
        )
    text = "\n\n".join(sections) + "\n"
    print(text)
    (RESULTS_DIR / f"{stem}.md").write_text(text)
    raw = {
        "settings": vars(args),
        "reference": reference,
        "tables": {str(b): json.loads(t.to_json()) for b, t in tables.items()},
        # Each trial as [its values of "params" in order, its objective values, Pareto-optimal].
        "params": list(space.distributions),
        "runs": {
            name: [
                [
                    [[t["params"][p] for p in space.distributions], t["values"], t["pareto"]]
                    for t in run
                ]
                for run in search_runs
            ]
            for name, search_runs in runs.items()
        },
        "fronts": {name: list(front) for name, front in fronts.items()},
        "points": points,
    }
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(raw, default=str))
