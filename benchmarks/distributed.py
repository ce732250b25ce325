"""Distributed throughput: trials/s and sampler overhead against the number of worker processes.

For each storage (journal file, SQLite, and PostgreSQL when ``OPTUNA_CTPE_POSTGRES_URL`` is
set, see ``.ci/postgres.sh``), each sampler (ClusterTPESampler with its defaults, i.e. constant
liar on; Optuna's TPESampler with ``multivariate=True, constant_liar=True``) and each number of
worker processes (1, 2, 4, 8), a fresh study runs ``--n-trials`` trials shared by the workers;
each cell is repeated ``--repeats`` times (fresh study each time) and the median is reported.
The workers are ``tests/_load_worker.py``: 8 categorical parameters with 5 choices, an objective
that sleeps ``--sleep`` seconds per trial. Reported per run:

- throughput: trials / wall time from the first worker's start to the last worker's exit;
- sampler overhead: wall time spent inside the sampler's methods per trial (mean over
  workers' trials; with more workers than cores this includes waiting for a core);
- concurrent duplicates: trials that got the configuration of a trial RUNNING when they
  started (and how many of those were *visible*: proposed after the other had published it).

Run::

    python benchmarks/distributed.py [--n-trials 200] [--storages journal sqlite postgres]

Writes ``results/distributed.md``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import statistics
import sys
import tempfile
import time
import uuid

import optuna


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _common import markdown_table  # noqa: E402
from _common import report_header  # noqa: E402
from _common import RESULTS_DIR  # noqa: E402
from _load_worker import concurrent_duplicates  # noqa: E402
from _load_worker import launch_workers  # noqa: E402
from _load_worker import make_storage  # noqa: E402
from _load_worker import sampling_intervals  # noqa: E402
from _load_worker import wait_all  # noqa: E402


def run(kind: str, where: str, sampler: str, n_workers: int, n_trials: int, sleep: float):
    name = f"bench-{uuid.uuid4().hex[:10]}"
    optuna.create_study(study_name=name, storage=make_storage(kind, where))
    with tempfile.TemporaryDirectory() as reports:
        start = time.perf_counter()
        procs = launch_workers(
            kind, where, name, n_workers=n_workers, n_trials=n_trials,
            report_dir=Path(reports), extra=["--sampler", sampler, "--sleep", str(sleep)],
        )  # fmt: skip
        results = wait_all(procs, timeout=1800)
        wall = time.perf_counter() - start
    trials = optuna.load_study(study_name=name, storage=make_storage(kind, where)).trials
    assert len(trials) == n_trials
    dups, visible = concurrent_duplicates(trials, sampling_intervals(results))
    sampler_s = sum(r["sampler_seconds"] for r in results)
    if kind == "postgres":
        optuna.delete_study(study_name=name, storage=where)
    return {
        "throughput": n_trials / wall,
        "overhead_ms": 1000 * sampler_s / n_trials,
        "wall": wall,
        "dups": dups,
        "visible": visible,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-trials", type=int, default=200)
    parser.add_argument("--sleep", type=float, default=0.005)
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; medians shown")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--samplers", nargs="+", default=["ctpe", "tpe"])
    parser.add_argument(
        "--storages", nargs="+", default=["journal", "sqlite", "postgres"],
        choices=["journal", "sqlite", "postgres"],
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "distributed.md")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    rows = []
    skipped = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.storages:
            for sampler in args.samplers:
                for n_workers in args.workers:
                    postgres_url = os.environ.get("OPTUNA_CTPE_POSTGRES_URL")
                    if kind == "postgres" and not postgres_url:
                        skipped.append("postgres (OPTUNA_CTPE_POSTGRES_URL unset)")
                        break
                    runs = []
                    for repeat in range(args.repeats):
                        # Each run is a fresh study; file storages also get a fresh file.
                        suffix = "log" if kind == "journal" else "db"
                        name = f"{kind}-{sampler}-{n_workers}-{repeat}.{suffix}"
                        where = postgres_url if kind == "postgres" else str(Path(tmp) / name)
                        result = run(kind, where, sampler, n_workers, args.n_trials, args.sleep)
                        runs.append(result)
                        print(kind, sampler, n_workers, result, flush=True)
                    r = {key: statistics.median(run_[key] for run_ in runs) for key in runs[0]}
                    rows.append(
                        [
                            kind, sampler, str(n_workers), f"{r['throughput']:.1f}",
                            f"{r['overhead_ms']:.1f}", f"{r['wall']:.1f}",
                            f"{r['dups']:g} ({r['visible']:g})",
                        ]
                    )  # fmt: skip
    settings = (
        f"{args.n_trials} trials per run shared by the workers, objective sleep "
        f"{1000 * args.sleep:.0f} ms, 8 categorical parameters x 5 choices "
        f"(`tests/_load_worker.py`); medians of {args.repeats} runs per cell.\n"
        "- ctpe = `ClusterTPESampler()` (defaults: multivariate, constant liar); tpe = "
        "`TPESampler(multivariate=True, constant_liar=True)`; seeds 0..workers-1.\n"
        f"- {os.cpu_count()} CPUs: with more workers than cores the overhead includes "
        "waiting for a core.\n"
        "- Overhead = wall time inside the sampler's methods per trial; duplicates = trials "
        "proposed with the configuration of a RUNNING trial (visible ones in parentheses: "
        "proposed after the other had published its parameters)."
    )
    if skipped:
        settings += "\n- Skipped: " + ", ".join(sorted(set(skipped))) + "."
    text = report_header("Distributed throughput and sampler overhead", sys.argv, settings)
    text += "\n" + markdown_table(
        [
            "storage", "sampler", "workers", "trials/s", "sampler ms/trial", "wall s",
            "concurrent duplicates (visible)",
        ],
        rows,
    )  # fmt: skip
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
