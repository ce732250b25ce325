"""Sampling overhead in wide search spaces: 150 and 300 categorical parameters, 500 trials.

The space is that of mixed-precision quantization of a 24-layer transformer: ``n`` categorical
parameters spread evenly over 24 layers, cycling over six kinds of weight (attention q, k, v and
output projections with 3 or 4 bit-width choices, MLP in and out with 5), each with a heavy-tailed
sensitivity that is larger in the first and last layers and a size (MLP weights 4x the attention
ones). The objective is cheap, synthetic and deterministic: quantization noise
``sum_i s_i 4^-b_i`` plus a size penalty proportional to the mean bits per weight, scaled so that
the best bits lie inside the choices.

For each parameter count, ClusterTPESampler and Optuna's TPESampler, both with their defaults
(both multivariate with constant liar in Optuna 5.0: TPE's ``multivariate=None`` means
multivariate for single-objective studies), each run one study of ``--trials`` trials by ask and
tell, the two studies advanced in turn, one trial each, so that changes of the machine's load
affect them alike. The sampling time of a trial is ``study.ask()`` plus every
``suggest_categorical`` plus ``study.tell()``; the objective is evaluated outside the timed
stretches.

Run::

    python benchmarks/overhead_wide.py

Writes ``results/overhead_wide.md`` (median and p90 ms per trial, the median of the last 50
trials, and the ratio ctpe/tpe) and ``results/overhead_wide.png``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import math
import os
from pathlib import Path
import sys
import time
import warnings

import numpy as np
import optuna

from _common import Config
from _common import make_sampler
from _common import markdown_table
from _common import new_axes
from _common import report_header
from _common import RESULTS_DIR
from _common import save_figure


N_LAYERS = 24
#: Kind of weight -> (bit-width choices, relative size).
KINDS = {
    "q": ((4, 6, 8), 1.0),
    "k": ((4, 6, 8), 1.0),
    "v": ((3, 4, 6, 8), 1.0),
    "o": ((3, 4, 6, 8), 1.0),
    "fc1": ((2, 3, 4, 6, 8), 4.0),
    "fc2": ((2, 3, 4, 6, 8), 4.0),
}
CONFIGS = (Config("ctpe", "ctpe"), Config("tpe", "tpe"))
TAIL = 50  # the last trials, whose median is the overhead "at" the full history


@dataclass(frozen=True)
class Space:
    """A frozen instance of the quantization-like space and objective."""

    names: list[str]
    choices: list[tuple[int, ...]]
    sensitivity: np.ndarray
    size: np.ndarray
    size_weight: float

    def objective(self, params: dict[str, int]) -> float:
        """Quantization noise plus the size penalty of the chosen bits."""
        bits = np.array([params[n] for n in self.names], dtype=float)
        noise = float(np.sum(self.sensitivity * 4.0**-bits))
        mean_bits = float(np.sum(self.size * bits) / np.sum(self.size))
        return noise + self.size_weight * mean_bits

    def optimum(self) -> float:
        """The best objective value (the objective is separable: each parameter on its own)."""
        weight = self.size_weight * self.size / np.sum(self.size)
        return float(
            sum(
                min(s * 4.0**-b + w * b for b in choices)
                for s, w, choices in zip(self.sensitivity, weight, self.choices)
            )
        )


def make_space(n_params: int, seed: int = 0) -> Space:
    """``n_params`` parameters over :data:`N_LAYERS` layers, kinds cycling as in :data:`KINDS`."""
    rng = np.random.default_rng(seed)
    kinds = list(KINDS)
    layer = np.arange(n_params) * N_LAYERS // n_params
    kind = [kinds[i % len(kinds)] for i in range(n_params)]
    # Sensitive first and last layers, heavy-tailed spread within.
    depth = 1.0 + 2.0 * np.exp(-layer / 3.0) + np.exp((layer - (N_LAYERS - 1)) / 3.0)
    size = np.array([KINDS[k][1] for k in kind])
    sensitivity = depth * size * rng.lognormal(0.0, 1.0, n_params) * 4.0**5
    # At the weight where the marginal noise gain of one bit at 5 bits, for the median weight,
    # equals the marginal size cost: the optimum lies inside the choices.
    marginal = np.median(sensitivity / size) * math.log(4.0) * 4.0**-5
    return Space(
        names=[f"l{layer[i]:02d}.{kind[i]}.{i}" for i in range(n_params)],
        choices=[KINDS[k][0] for k in kind],
        sensitivity=sensitivity,
        size=size,
        size_weight=float(marginal * np.sum(size) / np.median(size)),
    )


def run_studies(space: Space, n_trials: int, seed: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of sampling and objective values per trial, per configuration (asked in turn)."""
    studies = {
        c.label: optuna.create_study(direction="minimize", sampler=make_sampler(c, seed))
        for c in CONFIGS
    }
    out: dict[str, dict[str, list[float]]] = {
        label: {"seconds": [], "values": []} for label in studies
    }
    pairs = list(zip(space.names, space.choices))
    for _ in range(n_trials):
        for label, study in studies.items():
            start = time.perf_counter()
            trial = study.ask()
            params = {name: trial.suggest_categorical(name, choices) for name, choices in pairs}
            asked = time.perf_counter() - start
            value = space.objective(params)  # not timed
            start = time.perf_counter()
            study.tell(trial, value)
            out[label]["seconds"].append(asked + time.perf_counter() - start)
            out[label]["values"].append(value)
    return out


def summary(seconds: list[float]) -> dict[str, float]:
    """Median, p90 and last-:data:`TAIL` median in ms, and the total in seconds."""
    ms = 1e3 * np.asarray(seconds)
    return {
        "median": float(np.median(ms)),
        "p90": float(np.percentile(ms, 90)),
        "tail": float(np.median(ms[-TAIL:])),
        "total": float(ms.sum() / 1e3),
    }


def rows_of(n_params: int, runs: dict[str, dict[str, list[float]]]) -> list[list[str]]:
    """Table rows of one parameter count: one per sampler, then the ratio ctpe/tpe."""
    stats = {label: summary(r["seconds"]) for label, r in runs.items()}
    rows = [
        [
            str(n_params),
            label,
            f"{s['median']:.1f}",
            f"{s['p90']:.1f}",
            f"{s['tail']:.1f}",
            f"{s['total']:.1f}",
            f"{min(runs[label]['values']):.4g}",
        ]
        for label, s in stats.items()
    ]
    ctpe, tpe = stats["ctpe"], stats["tpe"]
    rows.append(
        [str(n_params), "**ratio ctpe/tpe**"]
        + [f"**{ctpe[k] / tpe[k]:.2f}**" for k in ("median", "p90", "tail", "total")]
        + ["—"]
    )
    return rows


def plot(results: dict[int, dict[str, dict[str, list[float]]]], path: Path) -> None:
    """ms of sampling per trial vs trial number (running median over 25 trials)."""
    fig, ax = new_axes(figsize=(7, 4.5))
    for i, (n_params, runs) in enumerate(results.items()):
        for label, r in runs.items():
            ms = 1e3 * np.asarray(r["seconds"])
            smooth = [np.median(ms[max(0, t - 24) : t + 1]) for t in range(len(ms))]
            style = "-" if label == "ctpe" else "--"
            ax.plot(
                np.arange(1, len(ms) + 1),
                smooth,
                style,
                color=f"C{i}",
                label=f"{label}, {n_params} params",
            )
    ax.set_yscale("log")
    ax.set_xlabel("trial")
    ax.set_ylabel("ms of sampling per trial (running median of 25)")
    ax.set_title("Sampling overhead, 24-layer-transformer-like space")
    save_figure(fig, ax, path)


def reading(results: dict[int, dict[str, dict[str, list[float]]]]) -> str:
    """One sentence per parameter count on the ratio at the end of the run."""
    lines = []
    for n_params, runs in results.items():
        ctpe, tpe = summary(runs["ctpe"]["seconds"]), summary(runs["tpe"]["seconds"])
        lines.append(
            f"- {n_params} parameters: over the last {TAIL} trials ClusterTPESampler spends "
            f"{ctpe['tail']:.0f} ms per trial sampling, TPE {tpe['tail']:.0f} ms "
            f"(ratio {ctpe['tail'] / tpe['tail']:.2f}); over all trials the median ratio is "
            f"{ctpe['median'] / tpe['median']:.2f} and the p90 ratio "
            f"{ctpe['p90'] / tpe['p90']:.2f}."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    """Run both samplers on each parameter count; print and write the table and plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, nargs="+", default=[150, 300])
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    load_start = os.getloadavg()[0]
    results, rows, optima = {}, [], []
    for n_params in args.params:
        space = make_space(n_params)
        results[n_params] = run_studies(space, args.trials, args.seed)
        rows += rows_of(n_params, results[n_params])
        optima.append(f"{n_params} params: {space.optimum():.4g}")
        print("\n".join(" | ".join(r) for r in rows[-3:]), flush=True)
    load_end = os.getloadavg()[0]

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(results, RESULTS_DIR / "overhead_wide.png")
    header = report_header(
        "Sampling overhead per trial, 150 and 300 categorical parameters",
        ["benchmarks/overhead_wide.py", *argv],
        f"{args.trials} trials per study, one study per sampler and parameter count, sampler "
        f"seed {args.seed}; load average (1 min) {load_start:.2f} at the start, "
        f"{load_end:.2f} at the end.",
    )
    notes = (
        "- Both samplers with their defaults (both multivariate with constant liar in Optuna "
        "5.0), in-memory storage, one process; the two studies are advanced in turn, one "
        "trial each.\n"
        "- Sampling time of a trial = `study.ask()` + every `suggest_categorical` + "
        "`study.tell()`; the objective (a few microseconds of numpy) is not timed.\n"
        "- Space: 24 layers, kinds q, k, v, o (3-4 bit-width choices) and fc1, fc2 (5 "
        "choices) cycling; the objective is separable, so its optimum is known: "
        + "; ".join(optima)
        + ".\n\n![overhead](overhead_wide.png)\n\n"
    )
    table = markdown_table(
        [
            "params",
            "sampler",
            "median ms/trial",
            "p90 ms/trial",
            f"median ms/trial, last {TAIL}",
            "total s sampling",
            f"best value @{args.trials}",
        ],
        rows,
    )
    report = header + notes + table + "\n\n## Reading\n\n" + reading(results)
    (RESULTS_DIR / "overhead_wide.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main(sys.argv[1:])
