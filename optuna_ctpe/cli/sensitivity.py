"""``optuna-ctpe sensitivity``: the per-layer Hessian trace table of a task."""

from __future__ import annotations

import argparse
import json
from typing import Any

from optuna_ctpe.cli.options import add_task_options
from optuna_ctpe.cli.options import DEFAULT_TASK
from optuna_ctpe.cli.options import DEFAULTS
from optuna_ctpe.cli.options import log
from optuna_ctpe.cli.options import positive_int
from optuna_ctpe.cli.options import UsageError
from optuna_ctpe.cli.report import plot_sensitivities
from optuna_ctpe.cli.report import sensitivity_table
from optuna_ctpe.cli.task import load_task


__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Add the ``sensitivity`` command to the subparsers ``commands``."""
    parser = commands.add_parser(
        "sensitivity",
        help="print the per-layer Hessian trace table of a task",
        description=(
            "Estimate the trace of each Conv/Linear layer's loss Hessian (Hutchinson) or "
            "empirical Fisher on the task's calibration batches and print it per layer: "
            "parameters, trace, mean trace (trace / parameters, HAWQ-V2's sensitivity) and the "
            "relative standard error of the estimate."
        ),
    )
    add_task_options(parser)
    parser.add_argument(
        "--estimator",
        choices=("hutchinson", "fisher"),
        default="hutchinson",
        help="hutchinson: Hessian trace; fisher: empirical Fisher trace (default: hutchinson)",
    )
    parser.add_argument(
        "--max-probes",
        type=positive_int,
        metavar="N",
        default=200,
        help="most probe vectors (Hutchinson) or samples (Fisher) (default: 200)",
    )
    parser.add_argument(
        "--rtol",
        type=float,
        metavar="R",
        default=0.05,
        help="stop once every layer's relative standard error is below this (default: 0.05)",
    )
    parser.add_argument(
        "--plot", metavar="FILE", help="also write a bar chart of the mean traces (.png/.svg/.pdf)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``optuna-ctpe sensitivity`` with parsed arguments; return the exit code."""
    from optuna_ctpe.nn.sensitivity import estimator  # imports torch

    if not 0 <= args.rtol < 1:
        raise UsageError(f"--rtol must be in [0, 1), got {args.rtol!r}.")
    if args.max_probes < 2:
        raise UsageError("--max-probes must be >= 2 (a standard error needs two), got 1.")
    seed = DEFAULTS["seed"] if args.seed is None else args.seed
    task = load_task(args.task or DEFAULT_TASK, seed=seed, cache_dir=args.cache_dir)
    traces = list(
        estimator(args.estimator)(
            task.model,
            task.loss_fn,
            task.calibration_batches,
            max_probes=args.max_probes,
            rtol=args.rtol,
            seed=seed,
        ).values()
    )
    print(sensitivity_table(traces))
    if args.plot:
        plot_sensitivities(traces, args.plot, f"{task.name}: {args.estimator} mean traces")
        log(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([t.to_dict() for t in traces], f, indent=2)
        log(f"wrote {args.json}")
    return 0
