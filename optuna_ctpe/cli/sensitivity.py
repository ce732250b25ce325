"""``optuna-ctpe sensitivity``: the per-layer Hessian trace table of a task, and the trace file.

``--output FILE`` writes the traces as a file (:mod:`optuna_ctpe.nn.trace_file`) that
``optuna-ctpe search --sensitivities FILE`` starts a study from, without measuring again;
:func:`read_for_study` is that reading, checked against the study's task and seed.
"""

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
from optuna_ctpe.nn import ESTIMATOR_NAMES


__all__ = ["add_parser", "read_for_study", "run"]


def add_parser(commands: Any) -> None:
    """Add the ``sensitivity`` command to the subparsers ``commands``."""
    parser = commands.add_parser(
        "sensitivity",
        help="print the per-layer Hessian trace table of a task",
        description=(
            "Estimate the trace of each quantizable layer's loss Hessian (or its Gauss-Newton "
            "part, or the empirical Fisher) on the task's calibration batches and print it per "
            "layer: "
            "parameters, trace, mean trace (trace / parameters, HAWQ-V2's sensitivity) and the "
            "relative standard error of the estimate."
        ),
    )
    add_task_options(parser)
    parser.add_argument(
        "--estimator",
        choices=ESTIMATOR_NAMES,
        default="auto",
        help="auto: ggn where the task's loss fits it, else hutchinson; hutchinson: Hessian "
        "trace; fisher: empirical Fisher trace; ggn: Gauss-Newton trace, never negative; "
        "split: Hessian trace as Gauss-Newton plus residual, less noisy (default: auto)",
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
    parser.add_argument(
        "--output",
        metavar="FILE",
        help=(
            "also write the traces as a sensitivity file that `optuna-ctpe search "
            "--sensitivities FILE` starts studies of the same task and seed from"
        ),
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``optuna-ctpe sensitivity`` with parsed arguments; return the exit code."""
    from optuna_ctpe.nn.sensitivity import estimator  # imports torch
    from optuna_ctpe.nn.sensitivity import resolve_estimator

    if not 0 <= args.rtol < 1:
        raise UsageError(f"--rtol must be in [0, 1), got {args.rtol!r}.")
    if args.max_probes < 2:
        raise UsageError("--max-probes must be >= 2 (a standard error needs two), got 1.")
    seed = DEFAULTS["seed"] if args.seed is None else args.seed
    task_spec = args.task or DEFAULT_TASK
    task = load_task(task_spec, seed=seed, cache_dir=args.cache_dir)
    name = resolve_estimator(args.estimator, task.model, task.loss_fn, task.calibration_batches)
    if name != args.estimator:
        log(f"estimator {args.estimator}: {name}")
    by_name = estimator(name)(
        task.model,
        task.loss_fn,
        task.calibration_batches,
        max_probes=args.max_probes,
        rtol=args.rtol,
        seed=seed,
    )
    traces = list(by_name.values())
    print(sensitivity_table(traces))
    if args.plot:
        plot_sensitivities(traces, args.plot, f"{task.name}: {name} mean traces")
        log(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([t.to_dict() for t in traces], f, indent=2)
        log(f"wrote {args.json}")
    if args.output:
        from optuna_ctpe.nn.trace_file import write_trace_file

        metadata = {"task": task_spec, "seed": seed, "task_name": task.name}
        metadata |= {"max_probes": args.max_probes, "rtol": args.rtol}
        write_trace_file(args.output, by_name, estimator=name, metadata=metadata)
        log(f"wrote {args.output}: start a search from it with --sensitivities {args.output}")
    return 0


def read_for_study(path: str, task: str, seed: int) -> Any:
    """The traces of the sensitivity file ``path``, for a study of ``task`` with ``seed``.

    Raises:
        UsageError: If the file cannot be read, is not a sensitivity file, or was measured on
            another task or seed (the traces would be of other weights).
    """
    from optuna_ctpe.nn.trace_file import read_trace_file

    try:
        content = read_trace_file(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--sensitivities {path}: {e}") from None
    recorded = {k: content.metadata.get(k) for k in ("task", "seed")}
    if recorded != {"task": None, "seed": None} and recorded != {"task": task, "seed": seed}:
        raise UsageError(
            f"--sensitivities {path} was measured on task {recorded['task']} with seed "
            f"{recorded['seed']}, but the study's task is {task} with seed {seed}: the model's "
            "weights differ, so its traces do not apply."
        )
    return content
