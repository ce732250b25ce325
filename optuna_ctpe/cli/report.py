"""Plain-text tables and the sensitivity chart that ``optuna-ctpe`` prints and writes."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from optuna_ctpe import _attrs
from optuna_ctpe.cli.choose import chosen_trials
from optuna_ctpe.cli.objectives import objective_kind
from optuna_ctpe.search_space import HessianSearchSpace


__all__ = [
    "format_table",
    "plot_sensitivities",
    "search_report",
    "sensitivity_table",
]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; text left-aligned, numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(row[i], (int, float)) for row in rows) and bool(rows)
        for i in range(len(headers))
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return (
            f"{value:.4g}"
            if abs(value) < 1e-3 and value != 0
            else f"{value:,.4f}".rstrip("0").rstrip(".")
        )
    return str(value)


def search_report(
    study: optuna.Study,
    space: HessianSearchSpace,
    baselines: Mapping[str, Mapping[str, float]],
    dashboard_url: str,
    *,
    objective: str | None = None,
) -> str:
    """The final summary of ``optuna-ctpe search``: trial counts, baselines, the chosen
    configurations with per-layer bits and widths, and how to open the dashboard.

    When the baselines have a latency (the latency objectives), the table shows each row's
    latency and its speed-up over FP32 and over uniform 8-bit on the same runtime.
    ``objective`` (the study's ``--objective``) words the title of a single-objective study.
    """
    layers = list(space.sensitivities)
    # Groups are named after their root layer: list them in model order, like the bit-widths.
    order = {name: i for i, name in enumerate(layers)}
    groups = sorted(space.groups, key=lambda g: (order.get(g, len(order)), g))
    latency = _latency_baselines(baselines)
    headers = ["configuration", "accuracy", "size KB", "compression"]
    if latency is not None:
        headers += ["latency ms", "speedup vs FP32", "speedup vs 8-bit"]
    # A format study shows each layer's format by name (its parameter's name too).
    kind = "format" if space.formats else "bits"
    headers += [f"{kind}:{n}" for n in layers] + [f"width:{g}" for g in groups]
    chosen = chosen_trials(study)
    rows = _baseline_rows(space, baselines, layers, len(groups), latency)
    configurations = _chosen_rows(space, chosen, layers, groups, latency)
    budget = "size" if objective is None else objective_kind(objective).budget
    if len(study.directions) > 2:
        title = f"Pareto front ({len(configurations)} configurations), fastest first:"
    elif len(study.directions) > 1:
        title = f"Pareto front ({len(configurations)} configurations), smallest first:"
    elif chosen:
        title = f"Most accurate configuration within the {budget} budget:"
    else:
        title = f"No completed trial meets the {budget} budget yet."
    return "\n".join(
        [
            f"Study {study.study_name!r}: {_state_counts(study) or 'no trials'}.",
            title,
            format_table(headers, rows + configurations),
            "",
            *_warm_start_section(study, baselines),
            "Open the study in optuna-dashboard with:",
            f"  optuna-dashboard {dashboard_url}",
        ]
    )


def _latency_baselines(baselines: Mapping[str, Mapping[str, float]]) -> tuple[float, float] | None:
    """The FP32 and uniform 8-bit latencies, if the study measures latency."""
    try:
        return baselines["fp32"][_attrs.LATENCY_MS], baselines["uniform8"][_attrs.LATENCY_MS]
    except KeyError:
        return None


def _metric_cells(
    metrics: Mapping[str, Any], latency: tuple[float, float] | None = None
) -> list[Any]:
    """Accuracy, size in KB and compression ratio: the report's first numeric columns; then,
    given the baselines' ``latency``, the latency and its speed-ups over them."""
    cells = [
        metrics[_attrs.ACCURACY],
        metrics[_attrs.SIZE_BYTES] / 1024,
        metrics[_attrs.COMPRESSION_RATIO],
    ]
    if latency is not None:
        ms = metrics.get(_attrs.LATENCY_MS, math.nan)
        cells += [ms] + [base / ms if ms > 0 else math.nan for base in latency]
    return cells


def _baseline_rows(
    space: HessianSearchSpace,
    baselines: Mapping[str, Mapping[str, float]],
    layers: Sequence[str],
    n_groups: int,
    latency: tuple[float, float] | None = None,
) -> list[list[Any]]:
    """The FP32 and uniform 8-bit rows (layers with fixed bits keep them under uniform 8; in a
    format space, named by their formats)."""
    rows: list[list[Any]] = []
    for key, label, bits in (("fp32", "FP32", 32), ("uniform8", "uniform 8-bit", 8)):
        per_layer: list[Any]
        if bits == 32:
            per_layer = ["fp32" if space.formats else 32] * len(layers)
        elif space.formats:
            per_layer = [space.uniform(bits).formats[n] for n in layers]
        else:
            per_layer = [space.fixed_bits.get(n, bits) for n in layers]
        cells = _metric_cells(baselines[key], latency)
        rows.append([label, *cells, *per_layer] + [1.0] * n_groups)
    return rows


def _chosen_rows(
    space: HessianSearchSpace,
    chosen: Sequence[FrozenTrial],
    layers: Sequence[str],
    groups: Sequence[str],
    latency: tuple[float, float] | None = None,
) -> list[list[Any]]:
    """One row per chosen configuration: a converged sampler re-evaluates its favourites."""
    repeats: dict[tuple[Any, ...], list[FrozenTrial]] = {}
    for trial in chosen:
        repeats.setdefault(tuple(sorted(trial.params.items())), []).append(trial)
    rows: list[list[Any]] = []
    for same in repeats.values():
        trial = same[0]
        config = space.config_from_params(trial.params)
        label = f"trial {trial.number}" + (f" (+{len(same) - 1} repeats)" if len(same) > 1 else "")
        rows.append(
            [label, *_metric_cells(trial.user_attrs, latency)]
            + [(config.formats or config.bits)[n] for n in layers]
            + [config.widths[g] for g in groups]
        )
    return rows


def _warm_start_section(
    study: optuna.Study, baselines: Mapping[str, Mapping[str, float]]
) -> list[str]:
    """The ILP warm starts' (and the uniform baseline's) predicted loss increase (Ω/2) and its
    rank beside their measured accuracy and its rank, so a user sees whether the prediction held
    and what the search gained over the best uniform configuration; none without warm starts.

    Ranks run over these trials: 1 is the least predicted loss, and the most accurate. Warm
    starts enqueued before Ω was stored with them (older studies) show ``-`` as prediction.
    """
    trials = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get(_attrs.WARM_START) or _attrs.UNIFORM_BASELINE in t.user_attrs
    ]
    if not trials:
        return []
    omega = {
        t.number: float(t.user_attrs[_attrs.PREDICTED_OMEGA])
        for t in trials
        if isinstance(t.user_attrs.get(_attrs.PREDICTED_OMEGA), (int, float))
    }
    accuracy = {
        t.number: float(t.user_attrs[_attrs.ACCURACY])
        for t in trials
        if t.state == TrialState.COMPLETE and _attrs.ACCURACY in t.user_attrs
    }
    predicted_rank = _ranks(omega, descending=False)
    measured_rank = _ranks(accuracy, descending=True)
    fp32 = baselines["fp32"][_attrs.ACCURACY]
    rows = [
        [
            f"trial {t.number}" + _uniform_label(t),
            omega.get(t.number, math.nan) / 2,
            predicted_rank.get(t.number, "-"),
            accuracy.get(t.number, math.nan),
            fp32 - accuracy.get(t.number, math.nan),
            measured_rank.get(t.number, "-"),
        ]
        for t in trials
    ]
    headers = [
        "warm start",
        "predicted loss increase (Ω/2)",
        "predicted rank",
        "accuracy",
        "drop vs FP32",
        "measured rank",
    ]
    return ["ILP warm starts, predicted against measured:", format_table(headers, rows), ""]


def _uniform_label(trial: FrozenTrial) -> str:
    """`` (uniform <choice>)`` for the uniform baseline's trial, else nothing."""
    if _attrs.UNIFORM_BASELINE not in trial.user_attrs:
        return ""
    return f" (uniform {trial.user_attrs[_attrs.UNIFORM_BASELINE]})"


def _ranks(values: Mapping[int, float], *, descending: bool) -> dict[int, int]:
    """Trial number -> rank of its value: 1 for the smallest, or the largest if ``descending``;
    equal values share the better rank (two warm starts of equal accuracy are both first)."""
    sign = -1.0 if descending else 1.0
    return {
        number: 1 + sum(sign * other < sign * value for other in values.values())
        for number, value in values.items()
    }


def _state_counts(study: optuna.Study) -> str:
    """``3 complete, 1 fail``: the study's trials by state."""
    counts = {s: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return ", ".join(f"{n} {s.name.lower()}" for s, n in counts.items() if n)


def sensitivity_table(traces: Sequence[Any]) -> str:
    """Per-layer trace table of :class:`~optuna_ctpe.nn.traces.LayerTrace` records,
    in model order."""
    rows = [
        [t.name, t.n_params, t.trace, t.mean_trace, t.relative_stderr, t.n_probes] for t in traces
    ]
    return format_table(["layer", "params", "trace", "mean trace", "rel. stderr", "probes"], rows)


def plot_sensitivities(traces: Sequence[Any], path: str, title: str) -> None:
    """A bar chart of the mean traces (log scale) with one-standard-error bars, as PNG/PDF/SVG
    (by the file's extension)."""
    import matplotlib

    matplotlib.use("Agg")  # a file only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(traces) + 2), 3.5), layout="constrained")
    names = [t.name for t in traces]
    means = [max(t.mean_trace, 0.0) for t in traces]
    errors = [t.stderr / t.n_params for t in traces]
    ax.bar(names, means, yerr=errors, capsize=3, color="tab:blue")
    if any(m > 0 for m in means):
        ax.set_yscale("log")
    ax.set_ylabel("mean Hessian trace (Tr/n)")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45 if len(traces) > 6 else 0)
    fig.savefig(path, dpi=120)
    plt.close(fig)
