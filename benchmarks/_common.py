"""Shared helpers of the benchmark scripts: sampler construction, parallel runs, best-so-far
curves, statistics, markdown tables, convergence plots and the raw-result files.

A *run* is one Optuna study of one sampler configuration on one problem with one seed; its
result is the best-so-far curve (best objective value after each trial). A *configuration* is a
label plus a sampler kind (``"ctpe"``, ``"tpe"`` or ``"random"``) plus keyword arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
import datetime
import hashlib
import json
import math
import multiprocessing
import os
from pathlib import Path
import subprocess
import time
from typing import Any
import warnings

import numpy as np
import optuna
from scipy import stats

# Imported here, before any worker process is forked, so that every run of an invocation uses
# the same version of the sampler even if its source changes meanwhile.
import optuna_ctpe
from problems import PROBLEMS


BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CHECKPOINTS = (25, 50, 100, 200)
SAMPLER_KINDS = ("ctpe", "tpe", "random")


def _git_version() -> str:
    """The repository's commit, plus a hash of uncommitted changes to the code if any.

    Only the package and the benchmark scripts count, not the results they write.
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(BENCH_DIR), *args], capture_output=True, text=True
        ).stdout

    diff = git("diff", "HEAD", "--", ":(top)optuna_ctpe", ":(top)benchmarks/*.py")
    commit = git("rev-parse", "--short", "HEAD").strip()
    return f"{commit}+diff {hashlib.sha1(diff.encode()).hexdigest()[:8]}" if diff else commit


# Taken when the benchmark starts, as is the sampler's code (see the import above).
GIT_VERSION = _git_version()


@dataclass(frozen=True)
class Config:
    """A sampler configuration.

    Attributes:
        label: Name shown in tables and plots.
        kind: ``"ctpe"`` (:class:`optuna_ctpe.ClusterTPESampler`), ``"tpe"`` (Optuna's
            :class:`~optuna.samplers.TPESampler`) or ``"random"``.
        kwargs: JSON-serialisable keyword arguments of the sampler besides ``seed``.
    """

    label: str
    kind: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    """One study to run: a configuration on a problem with a seed and a trial budget."""

    problem: str
    config: Config
    seed: int
    n_trials: int


@dataclass(frozen=True)
class GoodCap:
    """Picklable ``max_good`` callable ``min(ceil(fraction * n), cap)``.

    In JSON keyword arguments ``"max_good": [fraction, cap]`` stands for ``GoodCap(fraction,
    cap)``, e.g. ``[0.1, 25]`` for Optuna's TPE good-set size; ``null`` means uncapped.
    """

    fraction: float
    cap: int

    def __call__(self, n_finished: int) -> int:
        """The largest good group after ``n_finished`` finished trials."""
        return min(math.ceil(self.fraction * n_finished), self.cap)


def make_sampler(config: Config, seed: int) -> optuna.samplers.BaseSampler:
    """Build the sampler of ``config`` with ``seed``; other arguments keep their defaults."""
    if config.kind == "ctpe":
        kwargs = dict(config.kwargs)
        if isinstance(kwargs.get("max_good"), list):
            kwargs["max_good"] = GoodCap(*kwargs["max_good"])
        return optuna_ctpe.ClusterTPESampler(seed=seed, **kwargs)
    if config.kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **config.kwargs)
    if config.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed, **config.kwargs)
    raise ValueError(f"unknown sampler kind {config.kind!r}; expected one of {SAMPLER_KINDS}")


def _init_worker() -> None:
    """Silence Optuna's logging and experimental-feature warnings in worker processes."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def run_one(spec: RunSpec) -> tuple[list[float], list[float]]:
    """Run one study; return its best-so-far curve and the elapsed seconds after each trial."""
    study = optuna.create_study(direction="minimize", sampler=make_sampler(spec.config, spec.seed))
    elapsed: list[float] = []
    start = time.perf_counter()
    study.optimize(
        PROBLEMS[spec.problem].objective,
        n_trials=spec.n_trials,
        callbacks=[lambda *_: elapsed.append(time.perf_counter() - start)],
    )
    values = [t.value for t in study.trials]
    return np.minimum.accumulate(values).tolist(), elapsed


def run_many(specs: Sequence[RunSpec], workers: int) -> list[tuple[list[float], list[float]]]:
    """Run ``specs`` on ``workers`` processes, printing progress; results are in spec order."""
    results: list[tuple[list[float], list[float]]] = []
    start = time.perf_counter()
    with multiprocessing.Pool(workers, initializer=_init_worker) as pool:
        for i, result in enumerate(pool.imap(run_one, specs), 1):
            results.append(result)
            spec = specs[i - 1]
            print(
                f"[{i}/{len(specs)} {time.perf_counter() - start:6.0f}s] {spec.problem} "
                f"{spec.config.label} seed={spec.seed}: best={result[0][-1]:.6g} "
                f"({result[1][-1]:.1f}s)",
                flush=True,
            )
    return results


def parse_json_kwargs(text: str) -> dict[str, Any]:
    """Parse a ``--ctpe-kwargs`` JSON object (``max_good``: see :class:`GoodCap`)."""
    kwargs = json.loads(text)
    if not isinstance(kwargs, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return kwargs


# ----------------------------------------------------------------------------------------------
# Raw results
# ----------------------------------------------------------------------------------------------


@dataclass
class Curves:
    """Best-so-far curves of one configuration on one problem, one per seed."""

    config: Config
    seeds: list[int]
    curves: np.ndarray  # shape (n_seeds, n_trials)
    elapsed: np.ndarray  # seconds since the start of the run after each trial, same shape

    @property
    def seconds(self) -> np.ndarray:
        """Wall time of each run."""
        return self.elapsed[:, -1]

    def to_json(self) -> dict[str, Any]:
        """Serialise for the raw-results file."""
        return {
            "label": self.config.label,
            "kind": self.config.kind,
            "kwargs": dict(self.config.kwargs),
            "seeds": self.seeds,
            "elapsed_seconds": np.round(self.elapsed, 4).tolist(),
            "best_so_far": self.curves.tolist(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Curves:
        """Inverse of :meth:`to_json`."""
        return cls(
            Config(data["label"], data["kind"], data["kwargs"]),
            list(data["seeds"]),
            np.asarray(data["best_so_far"], dtype=float),
            np.asarray(data["elapsed_seconds"], dtype=float),
        )


def collect(
    problem: str,
    configs: Sequence[Config],
    seeds: Sequence[int],
    n_trials: int,
    workers: int,
    cached: Mapping[str, Curves] | None = None,
) -> dict[str, Curves]:
    """Run every configuration on ``problem`` for every seed, reusing matching ``cached`` curves.

    A cached entry is reused only if it has the same kind and keyword arguments, all of ``seeds``
    and at least ``n_trials`` trials (it is then restricted to ``seeds`` and ``n_trials``; a
    run's first trials do not depend on its total budget).
    """
    out: dict[str, Curves] = {}
    to_run: list[Config] = []
    for config in configs:
        hit = (cached or {}).get(config.label)
        if (
            hit is not None
            and hit.config.kind == config.kind
            and dict(hit.config.kwargs) == dict(config.kwargs)
            and set(seeds) <= set(hit.seeds)
            and hit.curves.shape[1] >= n_trials
        ):
            print(f"{problem} {config.label}: reusing cached curves", flush=True)
            rows = [hit.seeds.index(s) for s in seeds]
            out[config.label] = Curves(
                config, list(seeds), hit.curves[rows, :n_trials], hit.elapsed[rows, :n_trials]
            )
        else:
            to_run.append(config)
    specs = [RunSpec(problem, c, s, n_trials) for c in to_run for s in seeds]
    results = run_many(specs, workers) if specs else []
    for i, config in enumerate(to_run):
        chunk = results[i * len(seeds) : (i + 1) * len(seeds)]
        out[config.label] = Curves(
            config, list(seeds), np.array([r[0] for r in chunk]), np.array([r[1] for r in chunk])
        )
    return {c.label: out[c.label] for c in configs}


def save_raw(path: Path, problem: str, n_trials: int, curves: Mapping[str, Curves]) -> None:
    """Write the raw best-so-far curves of one problem as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "problem": problem,
        "n_trials": n_trials,
        "optuna_version": optuna.__version__,
        "configs": [c.to_json() for c in curves.values()],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def load_raw(path: Path) -> dict[str, Curves]:
    """Read a file written by :func:`save_raw`; empty if it is missing or from another Optuna."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("optuna_version") != optuna.__version__:
        return {}
    return {c["label"]: Curves.from_json(c) for c in data["configs"]}


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def median_curve(curves: np.ndarray) -> np.ndarray:
    """Median over seeds of best-so-far curves of shape ``(n_seeds, n_trials)``."""
    return np.median(curves, axis=0)


def trials_to_reach(curves: np.ndarray, target: float) -> int | None:
    """First trial (1-based) at which the median best-so-far curve is <= ``target``, or None."""
    hits = np.flatnonzero(median_curve(curves) <= target)
    return int(hits[0]) + 1 if hits.size else None


def mann_whitney(a: np.ndarray, b: np.ndarray, alternative: str) -> float:
    """Mann-Whitney U p-value of ``a`` vs ``b`` (``"less"``: a tends to be smaller than b)."""
    return float(stats.mannwhitneyu(a, b, alternative=alternative).pvalue)


def checkpoints(n_trials: int) -> list[int]:
    """The trial counts at which medians are reported: 25, 50, 100, 200 up to ``n_trials``."""
    points = [c for c in CHECKPOINTS if c < n_trials]
    return points + [n_trials]


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 4) -> str:
    """Format a number for a table; ``None`` becomes ``"not reached"``."""
    if value is None:
        return "not reached"
    return f"{value:.{digits}g}"


def fmt_p(p: float) -> str:
    """Format a p-value, bold when below 0.05."""
    text = f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"
    return f"**{text}**" if p < 0.05 else text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render a GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_tables(
    curves: Mapping[str, Curves], reference: str | None, baseline: str | None
) -> str:
    """Markdown tables of one problem.

    The first table has, per configuration: the median best-so-far at the checkpoints, the
    trials its median curve needs to reach ``reference``'s median final best and the ratio to
    ``reference``'s trials, the one-sided Mann-Whitney U p-value of its final bests being smaller
    than ``reference``'s, and the mean wall time per run. The second table compares ``baseline``
    (usually ClusterTPESampler's default) with every other configuration by one-sided
    Mann-Whitney U tests of the final bests, in both directions.

    Args:
        curves: Curves per configuration label, all with the same number of trials.
        reference: Label of the configuration whose median final best is the target (TPE), or
            None to omit the target columns.
        baseline: Label of the configuration compared with all others, or None to omit the
            comparison table.
    """
    n_trials = next(iter(curves.values())).curves.shape[1]
    points = checkpoints(n_trials)
    target = float(median_curve(curves[reference].curves)[-1]) if reference in curves else None
    ref_trials = trials_to_reach(curves[reference].curves, target) if target is not None else None
    header = ["sampler"] + [f"median best @{p}" for p in points]
    if target is not None:
        header += [
            f"trials to reach {reference} median best ({target:.4g})",
            f"ratio vs {reference}",
        ]
        header += [f"p (final best < {reference})"]
    header += ["s / run"]
    rows = []
    for label, c in curves.items():
        med = median_curve(c.curves)
        row = [label] + [fmt(med[p - 1]) for p in points]
        if target is not None:
            reached = trials_to_reach(c.curves, target)
            ratio = None if reached is None or not ref_trials else reached / ref_trials
            row += [fmt(reached), "—" if ratio is None else f"{ratio:.2f}"]
            row += [
                "—"
                if label == reference
                else fmt_p(mann_whitney(c.curves[:, -1], curves[reference].curves[:, -1], "less"))
            ]
        row += [f"{np.mean(c.seconds):.1f}"]
        rows.append(row)
    text = markdown_table(header, rows)
    if baseline in curves and len(curves) > 1:
        final = curves[baseline].curves[:, -1]
        comp_rows = []
        for label, c in curves.items():
            if label == baseline:
                continue
            other = c.curves[:, -1]
            comp_rows.append(
                [
                    f"{baseline} vs {label}",
                    fmt(float(np.median(final))),
                    fmt(float(np.median(other))),
                    fmt_p(mann_whitney(final, other, "less")),
                    fmt_p(mann_whitney(final, other, "greater")),
                ]
            )
        text += "\n\n" + markdown_table(
            [
                "comparison (final best)",
                f"median {baseline}",
                "median other",
                f"p ({baseline} better, one-sided)",
                f"p ({baseline} worse, one-sided)",
            ],
            comp_rows,
        )
    return text


def plot_convergence(
    curves: Mapping[str, Curves],
    path: Path,
    title: str,
    log_scale: bool,
    reference: str | None = None,
) -> None:
    """Plot median best-so-far curves with interquartile bands and save a PNG.

    The y axis starts after the first 10 trials (the random start-up phase), so that the
    differences between samplers stay visible. With ``reference``, a dashed line marks that
    configuration's median final best (the target of *trials to reach*).
    """
    import matplotlib

    many = len(curves) > 5
    fig, ax = new_axes(figsize=(10, 5) if many else (7, 4.5))
    colors = matplotlib.colormaps["tab20" if len(curves) > 10 else "tab10"].colors
    top = -np.inf
    for i, (label, c) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        x = np.arange(1, c.curves.shape[1] + 1)
        q25, q50, q75 = np.percentile(c.curves, [25, 50, 75], axis=0)
        ax.plot(x, q50, label=label, color=color)
        ax.fill_between(x, q25, q75, alpha=0.08 if many else 0.2, color=color)
        top = max(top, q75[min(9, len(q75) - 1)])
    if reference in curves:
        target = float(median_curve(curves[reference].curves)[-1])
        ax.axhline(target, color="black", ls="--", lw=0.8, label=f"{reference} median final best")
    if log_scale:
        ax.set_yscale("log")
    ax.set_ylim(top=top)
    ax.set_xlabel("trial")
    ax.set_ylabel("best objective so far (median, IQR band)")
    ax.set_title(title)
    save_figure(fig, ax, path, legend_outside=many)


def new_axes(figsize: tuple[float, float], ncols: int = 1) -> tuple[Any, Any]:
    """A figure and its axes (an array of ``ncols`` if above 1) on the non-interactive backend
    (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(ncols=ncols, figsize=figsize)


def save_figure(fig: Any, ax: Any, path: Path, *, legend_outside: bool = False) -> None:
    """Grid, legend (beside the axes when there are many lines), save as PNG and close."""
    import matplotlib.pyplot as plt

    ax.grid(True, which="both", alpha=0.3)
    if legend_outside:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_settings(seeds: Sequence[int], n_trials: int) -> str:
    """The settings line of :func:`report_header` for seeded optimisation runs."""
    return (
        f"Seeds: {list(seeds)} ({len(seeds)} runs per sampler and problem), "
        f"{n_trials} trials per run; objective minimised."
    )


def report_header(title: str, command: Sequence[str], settings: str) -> str:
    """Markdown header with the command, date, versions and ``settings`` of a benchmark run."""
    import platform

    cmd = " ".join(["python", *command])
    return "\n".join(
        [
            f"# {title}",
            "",
            f"- Command: `{cmd}`",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Optuna {optuna.__version__}, optuna-ctpe {optuna_ctpe.__version__} "
            f"(git `{GIT_VERSION}`), numpy {np.__version__}, "
            f"Python {platform.python_version()}, {os.cpu_count()} CPUs",
            f"- {settings}",
            "",
        ]
    )
