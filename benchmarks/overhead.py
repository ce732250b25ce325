"""Sampling overhead: milliseconds per trial vs number of completed trials.

For each number of categorical parameters (10 and 40, choices 2..8 like the quantization problem)
and each history size N (0, 100, 250, 500, 1000), an in-memory study is pre-populated with N
completed trials (uniformly random parameters, lognormal objective values, the same trials for
every sampler) through ``study.add_trials``. Then ``--asks`` trials are asked one after another
and each is timed from ``study.ask()`` to the last ``suggest_categorical``, which is where both
samplers do their work (relative sampling happens in ``ask``, independent sampling in the
suggest calls). The asked trials are left RUNNING, so with ``constant_liar`` later asks see them.
The median time per trial is reported for ClusterTPESampler and Optuna's TPESampler, both with
their defaults, measured in the same process on one core, asking the two studies in turn.

Run::

    python benchmarks/overhead.py

Writes ``results/overhead.md`` (table with the ratio ctpe/tpe) and ``results/overhead.png``.
The issue's target: at 1000 trials x 40 parameters ClusterTPESampler's time <= TPE's.

``--choices K`` gives every parameter ``K`` string choices instead (a format space's names:
about 4x today's 7 with ``--choices 28``) and writes ``results/overhead_choices<K>.md`` and
``.png``: the ratio ctpe/tpe there against the table above is the overhead that more
categories per layer add.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys
import time
import warnings

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution

from _common import Config
from _common import make_sampler
from _common import markdown_table
from _common import new_axes
from _common import report_header
from _common import RESULTS_DIR
from _common import save_figure


CHOICES = [2, 3, 4, 5, 6, 7, 8]
CONFIGS = (Config("ctpe", "ctpe"), Config("tpe", "tpe"))


def history(
    n_trials: int, n_params: int, seed: int, choices: list = CHOICES
) -> list[optuna.trial.FrozenTrial]:
    """``n_trials`` completed trials with random categorical parameters and lognormal values."""
    rng = np.random.default_rng(seed)
    dist = CategoricalDistribution(choices)
    return [
        optuna.trial.create_trial(
            params={f"p{i}": choices[rng.integers(len(choices))] for i in range(n_params)},
            distributions={f"p{i}": dist for i in range(n_params)},
            value=float(rng.lognormal()),
        )
        for _ in range(n_trials)
    ]


def time_asks(
    trials: list[optuna.trial.FrozenTrial], n_params: int, asks: int, choices: list = CHOICES
) -> dict[str, float]:
    """Median milliseconds of ask + suggesting every parameter, per configuration.

    The configurations' studies are asked in turn (one trial each, ``asks`` rounds), so that
    changes of the machine's load affect them alike.
    """
    studies = {}
    for config in CONFIGS:
        study = optuna.create_study(direction="minimize", sampler=make_sampler(config, seed=0))
        study.add_trials(trials)
        studies[config.label] = study
    times: dict[str, list[float]] = {label: [] for label in studies}
    for _ in range(asks):
        for label, study in studies.items():
            start = time.perf_counter()
            trial = study.ask()
            for i in range(n_params):
                trial.suggest_categorical(f"p{i}", choices)
            times[label].append(time.perf_counter() - start)
    return {label: 1e3 * float(np.median(t)) for label, t in times.items()}


def plot(
    results: dict[tuple[int, str], list[float]], sizes: list[int], path: Path, n_choices: int
) -> None:
    """Plot ms per trial vs completed trials, one line per sampler and parameter count."""
    fig, ax = new_axes(figsize=(7, 4.5))
    colors = {n: f"C{i}" for i, n in enumerate(sorted({n for n, _ in results}))}
    for (n_params, label), ms in results.items():
        style = "-" if label == "ctpe" else "--"
        ax.plot(
            sizes,
            ms,
            style,
            color=colors[n_params],
            marker="o",
            label=f"{label}, {n_params} params",
        )
    ax.set_yscale("log")
    ax.set_xlabel("completed trials in the study")
    ax.set_ylabel("ms per trial (ask + suggest, median)")
    ax.set_title(f"Sampling overhead, categorical parameters ({n_choices} choices)")
    save_figure(fig, ax, path)


def main(argv: list[str]) -> None:
    """Measure, print and write the overhead table and plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 100, 250, 500, 1000])
    parser.add_argument("--params", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--asks", type=int, default=30, help="timed trials per measurement")
    parser.add_argument(
        "--choices", type=int, default=None, help="string choices per parameter (default: 2..8)"
    )
    args = parser.parse_args(argv)
    choices = CHOICES if args.choices is None else [f"format{k}" for k in range(args.choices)]
    name = "overhead" if args.choices is None else f"overhead_choices{args.choices}"
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    results: dict[tuple[int, str], list[float]] = {}
    rows = []
    for n_params in args.params:
        for n in args.sizes:
            trials = history(n, n_params, seed=n_params * 100_000 + n, choices=choices)
            ms = time_asks(trials, n_params, args.asks, choices)
            for label, value in ms.items():
                results.setdefault((n_params, label), []).append(value)
            ratio = ms["ctpe"] / ms["tpe"]
            rows.append(
                [str(n_params), str(n), f"{ms['ctpe']:.1f}", f"{ms['tpe']:.1f}", f"{ratio:.2f}"]
            )
            print(" | ".join(rows[-1]), flush=True)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(results, args.sizes, RESULTS_DIR / f"{name}.png", len(choices))
    header = report_header(
        "Sampling overhead per trial",
        ["benchmarks/overhead.py", *argv],
        f"{args.asks} timed asks per measurement (median reported); {len(choices)} choices "
        "per parameter.",
    )
    target = ""
    if 40 in args.params and 1000 in args.sizes:
        i = args.sizes.index(1000)
        ctpe, tpe = results[(40, "ctpe")][i], results[(40, "tpe")][i]
        verdict = "met" if ctpe <= tpe else "NOT met"
        target = (
            f"\nTarget (1000 trials x 40 parameters, ctpe <= tpe): **{verdict}** "
            f"({ctpe:.1f} ms vs {tpe:.1f} ms).\n"
        )
    notes = (
        "- Both samplers with their defaults (both multivariate with constant liar, as in "
        "Optuna 5.0). Sampler seed 0; histories of random trials, the same for both samplers.\n"
        "- Time per trial = `study.ask()` plus `suggest_categorical` of every parameter, "
        "in-memory storage, one process; the two samplers' studies are asked in turn.\n\n"
        f"![overhead]({name}.png)\n\n"
    )
    table = markdown_table(
        ["params", "completed trials", "ctpe ms/trial", "tpe ms/trial", "ratio ctpe/tpe"], rows
    )
    report = header + notes + table + "\n" + target
    (RESULTS_DIR / f"{name}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main(sys.argv[1:])
