"""The ``optuna-ctpe`` command: mixed-precision and width search from the shell.

Subcommands:

``search``
    The whole pipeline: build a task (by default the embedded digits CNN), measure its per-layer
    Hessian sensitivities, build the pruned :class:`~optuna_ctpe.HessianSearchSpace`, and run an
    Optuna study with :class:`~optuna_ctpe.ClusterTPESampler`. Resumable, and several processes
    on one storage cooperate as distributed workers.
``sensitivity``
    Print the per-layer Hessian trace table of a task, optionally as a bar chart.
``export``
    Write a trial's configuration as JSON and its quantized model's state dict.

Exit codes: 0 success; 1 an unexpected error (the message names it); 2 a usage error (a bad
option value, an unknown storage scheme, a task that does not import, a study that does not
exist, an option that contradicts an existing study); 130 interrupted by Ctrl-C; 143 stopped by
SIGTERM. After 130 and 143 the storage is consistent: no trial of this process is left RUNNING.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from collections.abc import Sequence
import contextlib
import json
import math
import os
import sys
import time
from typing import Any

import optuna

from optuna_ctpe._cli_export import load_exported
from optuna_ctpe._cli_signals import Terminated
from optuna_ctpe._cli_signals import check_interrupted
from optuna_ctpe._cli_signals import deferred
from optuna_ctpe._cli_signals import handle_signals
from optuna_ctpe._cli_storage import UsageError
from optuna_ctpe._cli_storage import fail_abandoned_trials
from optuna_ctpe._cli_storage import open_storage
from optuna_ctpe._cli_storage import parse_storage
from optuna_ctpe._cli_study import CACHE_ENV
from optuna_ctpe._cli_study import DEFAULT_TASK
from optuna_ctpe._cli_study import DEFAULTS
from optuna_ctpe._cli_study import Settings
from optuna_ctpe._cli_study import join_or_create
from optuna_ctpe._cli_study import load_task
from optuna_ctpe._cli_study import prepare
from optuna_ctpe._cli_study import resolve_factory
from optuna_ctpe._cli_study import resolve_settings


__all__ = ["DEFAULT_N_TRIALS", "DEFAULT_STORAGE", "build_parser", "load_exported", "main"]

DEFAULT_STORAGE = "sqlite:///optuna-ctpe.db"
DEFAULT_STUDY = "optuna-ctpe"
#: Trials run when neither --n-trials nor --timeout is given.
DEFAULT_N_TRIALS = 50
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


# -- option types (argparse reports their errors as "argument --x: <message>", exit 2) --------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _n_jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value == 0 or value < -1:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer, or -1 for one thread per CPU, got {text!r}"
        )
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _bits_list(text: str) -> tuple[int, ...]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"must be comma-separated bit-widths, got {text!r}")
    values: list[int] = []
    for item in items:
        try:
            b = int(item)
        except ValueError:
            b = 0
        if not 2 <= b <= 16:
            raise argparse.ArgumentTypeError(
                f"bit-widths must be integers in [2, 16], got {item!r} in {text!r}"
            )
        values.append(b)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"bit-widths must not repeat, got {text!r}")
    return tuple(sorted(values))


def _widths_list(text: str) -> tuple[float, ...]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"must be comma-separated width ratios, got {text!r}")
    values: list[float] = []
    for item in items:
        try:
            w = float(item)
        except ValueError:
            w = math.nan
        if not 0 < w <= 1:
            raise argparse.ArgumentTypeError(
                f"width ratios must be numbers in (0, 1], got {item!r} in {text!r}"
            )
        values.append(w)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"width ratios must not repeat, got {text!r}")
    return tuple(sorted(values))


def _size_budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"must be a compression ratio > 1 (e.g. 8) or a fraction of the FP32 size in (0, 1] "
            f"(e.g. 0.125), got {text!r}"
        )
    # Both spellings of one budget give the same stored fraction, so resumed runs compare equal.
    return 1.0 / value if value > 1 else value


# -- parser ------------------------------------------------------------------------------------


def _add_common(
    parser: argparse.ArgumentParser, *, task: bool = True, seed_help: str = ""
) -> None:
    if task:
        parser.add_argument(
            "--task",
            metavar="MODULE:FACTORY",
            help=(
                "the task to optimise: FACTORY(seed=SEED) in MODULE must return an "
                f"optuna_ctpe.tasks.Task (default: {DEFAULT_TASK}, a small CNN on "
                "scikit-learn's digits, trained on first use and cached)"
            ),
        )
        parser.add_argument(
            "--seed",
            type=_nonnegative_int,
            help=f"seed of the task (data split, training) and of the Hessian probes{seed_help} "
            "(default: 0)",
        )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=(
            "weight cache folder for tasks whose factory takes cache_dir (default: "
            f"${CACHE_ENV}, else the task's own default, ~/.cache/optuna-ctpe for digits)"
        ),
    )


def _add_storage(parser: argparse.ArgumentParser, *, study_required: bool) -> None:
    parser.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        metavar="URL",
        help=(
            f"where the study lives (default: {DEFAULT_STORAGE}, a file in the working "
            "directory): sqlite:///FILE.db; any SQLAlchemy URL such as "
            "postgresql://user:password@host/db (needs its driver); or a journal file, "
            "journal:///PATH/FILE.log or any path ending in .log, for file systems where "
            "SQLite locking is unreliable (NFS)"
        ),
    )
    parser.add_argument(
        "--study-name",
        metavar="NAME",
        default=None if not study_required else DEFAULT_STUDY,
        help=(
            f"the study (default: {DEFAULT_STUDY})"
            if study_required
            else "the study to export (default: the storage's only study)"
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``optuna-ctpe`` (public so that docs can render ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="optuna-ctpe",
        description=(
            "Hessian-aware mixed-precision and width search with Optuna's ClusterTPE sampler."
        ),
        epilog=(
            "Exit codes: 0 success, 1 error, 2 usage error, 130 interrupted (Ctrl-C), 143 "
            "terminated (SIGTERM). Run 'optuna-ctpe COMMAND --help' for a command's options."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    search = commands.add_parser(
        "search",
        help="search per-layer bit-widths and widths of a model",
        description=(
            "Measure per-layer Hessian sensitivities, prune the search space of per-layer "
            "bit-widths and per-group width ratios, and search it with an Optuna study. "
            "Running again with the same --storage and --study-name continues the study; "
            "several processes on one storage cooperate as distributed workers. The problem "
            "(task, seed, objective, budget, grids, pruning, fine-tuning) is fixed when the "
            "study is created: later runs adopt it, and an option that contradicts it is an "
            "error."
        ),
    )
    _add_storage(search, study_required=True)
    search.add_argument(
        "--n-trials",
        type=_positive_int,
        metavar="N",
        help=(
            "number of NEW trials this process runs, as in Study.optimize: a resumed run adds "
            "this many, and N workers run N times this many in total (default: "
            f"{DEFAULT_N_TRIALS}, or unlimited with --timeout)"
        ),
    )
    search.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        help="stop starting new trials after this many seconds (the running ones finish)",
    )
    search.add_argument(
        "--n-jobs",
        type=_n_jobs,
        metavar="N",
        default=1,
        help="trials run in parallel threads of this process; -1: one per CPU (default: 1)",
    )
    _add_common(
        search, seed_help="; the sampler of the process that creates the study uses it too"
    )
    search.add_argument(
        "--bits",
        type=_bits_list,
        metavar="B,B,...",
        help="grid of weight bit-widths, integers in [2, 16] (default: 2,3,4,6,8)",
    )
    search.add_argument(
        "--widths",
        type=_widths_list,
        metavar="W,W,...",
        help=(
            "grid of width ratios (fraction of channels kept per dependency group), in (0, 1]; "
            "a single 1.0 searches bit-widths only (default: 0.5,0.75,1.0)"
        ),
    )
    search.add_argument(
        "--objective",
        choices=("pareto", "budget"),
        help=(
            "pareto: a two-objective study, maximise accuracy and minimise size, reporting the "
            "Pareto front; budget: maximise accuracy subject to size <= --size-budget "
            "(a constraint set with trial.set_constraint) (default: pareto)"
        ),
    )
    search.add_argument(
        "--size-budget",
        type=_size_budget,
        metavar="X",
        help=(
            "size budget of --objective budget: a compression ratio over FP32 if > 1 (8 means "
            "1/8 of the FP32 size), else a fraction of the FP32 size (0.125, the same) "
            "(default: 8)"
        ),
    )
    search.add_argument(
        "--sampler",
        choices=("ctpe", "tpe", "random"),
        default="ctpe",
        help=(
            "ctpe: ClusterTPESampler with Hessian priors, recording its decisions as trial "
            "attributes; tpe: Optuna's TPESampler with its defaults; random: RandomSampler; "
            "for comparisons, run each in its own study (default: ctpe)"
        ),
    )
    search.add_argument(
        "--no-hessian-pruning",
        action="store_const",
        const=False,
        dest="hessian_pruning",
        help="search the full grid instead of dropping choices that the sensitivities rule out",
    )
    search.add_argument(
        "--finetune-epochs",
        type=_nonnegative_int,
        metavar="N",
        help=(
            "quantization-aware fine-tuning epochs per trial (one pass over the calibration "
            "batches each); the validation accuracy after each is the trial's intermediate "
            "value at that step (default: 0)"
        ),
    )
    search.add_argument(
        "--pruner",
        choices=("none", "median"),
        default="none",
        help=(
            "median: stop a trial whose accuracy after a fine-tuning epoch is below the median "
            "of earlier trials at that epoch; needs --finetune-epochs >= 1 and --objective "
            "budget, since Optuna cannot prune multi-objective trials (default: none)"
        ),
    )
    search.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    search.add_argument(
        "-v", "--verbose", action="store_true", help="show Optuna's log line for every trial"
    )
    search.set_defaults(handler=_search)

    sens = commands.add_parser(
        "sensitivity",
        help="print the per-layer Hessian trace table of a task",
        description=(
            "Estimate the trace of each Conv/Linear layer's loss Hessian (Hutchinson) or "
            "empirical Fisher on the task's calibration batches and print it per layer: "
            "parameters, trace, mean trace (trace / parameters, HAWQ-V2's sensitivity) and the "
            "relative standard error of the estimate."
        ),
    )
    _add_common(sens)
    sens.add_argument(
        "--estimator",
        choices=("hutchinson", "fisher"),
        default="hutchinson",
        help="hutchinson: Hessian trace; fisher: empirical Fisher trace (default: hutchinson)",
    )
    sens.add_argument(
        "--max-probes",
        type=_positive_int,
        metavar="N",
        default=200,
        help="most probe vectors (Hutchinson) or samples (Fisher) (default: 200)",
    )
    sens.add_argument(
        "--rtol",
        type=float,
        metavar="R",
        default=0.05,
        help="stop once every layer's relative standard error is below this (default: 0.05)",
    )
    sens.add_argument(
        "--plot", metavar="FILE", help="also write a bar chart of the mean traces (.png/.svg/.pdf)"
    )
    sens.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    sens.set_defaults(handler=_sensitivity)

    exp = commands.add_parser(
        "export",
        help="write a trial's configuration (JSON) and quantized model (state dict)",
        description=(
            "Rebuild one trial's width-pruned, quantized model and write "
            "<study>-trial<N>.json (configuration, metrics, search space) and "
            "<study>-trial<N>.pt (its state dict, saved with torch.save; load it with "
            "torch.load(path, weights_only=True), or with optuna_ctpe.cli.load_exported(json))."
        ),
    )
    _add_storage(exp, study_required=False)
    exp.add_argument(
        "--trial",
        type=_nonnegative_int,
        metavar="N",
        help=(
            "trial number to export (default: the most accurate feasible trial for "
            "--objective budget, the most accurate Pareto-optimal trial for pareto)"
        ),
    )
    exp.add_argument(
        "-o", "--output-dir", default=".", metavar="DIR", help="folder for the files (default: .)"
    )
    _add_common(exp, task=False)
    exp.set_defaults(handler=_export)
    return parser


# -- commands ----------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"optuna-ctpe: {message}", file=sys.stderr, flush=True)


def _progress_bar(
    n_trials: int | None, enabled: bool
) -> tuple[list[Callable[[optuna.Study, Any], None]], Callable[[], None]]:
    """(callbacks, close) of a tqdm bar on stderr, one step per finished trial.

    tqdm is a dependency of Optuna, so it is always there. Optuna's own ``show_progress_bar``
    is not used because it does not support ``n_jobs > 1`` with a timeout.
    """
    if not enabled:
        return [], lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=n_trials, unit="trial", desc="search", file=sys.stderr)

    def update(study: optuna.Study, trial: Any) -> None:
        bar.update(1)
        bar.set_postfix_str(f"last: #{trial.number} {trial.state.name.lower()}", refresh=False)

    return [update], bar.close


def _stop_if_interrupted(study: optuna.Study, trial: Any) -> None:
    # After each trial: a signal deferred during the trial's bookkeeping stops the loop here.
    check_interrupted()


def _make_sampler(name: str, seed: int | None, prior_weights: dict[str, list[float]]) -> Any:
    if name == "ctpe":
        from optuna_ctpe.sampler import ClusterTPESampler

        return ClusterTPESampler(seed=seed, prior_weights=prior_weights, record_decisions=True)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _sampler_seed(seed: int, creator: bool) -> int:
    # Samplers with equal seeds in several processes propose identical start-up trials
    # (optuna#4714), so only the creating process uses --seed as is; a joining worker mixes in
    # its process id and the clock.
    if creator:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, os.getpid(), time.time_ns()]).generate_state(1)[0])


def _search(args: argparse.Namespace) -> int:
    spec = parse_storage(args.storage)
    if args.task is not None:
        resolve_factory(args.task)  # a typo fails at once, before the storage is even opened
    storage = open_storage(spec, heartbeat=True)
    requested = {
        "task": args.task,
        "seed": args.seed,
        "objective": args.objective,
        "size_budget": args.size_budget,
        "bits": args.bits,
        "widths": args.widths,
        "hessian_pruning": args.hessian_pruning,
        "finetune_epochs": args.finetune_epochs,
    }

    def check(settings: Settings) -> None:
        # Runs before a new study is created, so a refused command leaves no study behind.
        if args.pruner == "none":
            return
        if settings.finetune_epochs < 1:
            raise UsageError(
                f"--pruner {args.pruner} needs --finetune-epochs >= 1: the fine-tuning epochs "
                "are the steps at which trials are pruned."
            )
        if settings.objective != "budget":
            raise UsageError(
                f"--pruner {args.pruner} needs --objective budget: Optuna cannot prune trials "
                "of multi-objective studies."
            )

    # The task is built before the study is created, so that a factory that fails creates no
    # study; in the rare race where another worker creates the study first with other settings
    # (ours were defaults, theirs explicit), the task is built again from theirs.
    settings = resolve_settings(storage, args.study_name, requested, check)
    import torch

    if args.n_jobs != 1:
        # Threads of one process share the CPU; one intra-op thread each avoids oversubscription.
        torch.set_num_threads(1)
    task = load_task(settings.task, seed=settings.seed, cache_dir=args.cache_dir)
    study, joined, creator = join_or_create(storage, args.study_name, requested, check)
    if (joined.task, joined.seed) != (settings.task, settings.seed):
        task = load_task(joined.task, seed=joined.seed, cache_dir=args.cache_dir)
    settings = joined
    stale = fail_abandoned_trials(study)
    if stale:
        _log(f"failed {len(stale)} trial(s) left RUNNING by dead workers: {stale}")
    _log(
        ("created" if creator else "joined")
        + f" study {study.study_name!r} in {spec.location} ({len(study.trials)} trials so far)"
    )

    prepared = prepare(study, settings, task, creator=creator, log=_log)
    space = prepared.space
    _log(
        f"search space: 10^{space.log10_size_before:.1f} configurations, "
        f"10^{space.log10_size_after:.1f} after Hessian pruning"
    )

    from optuna_ctpe._cli_objective import Objective
    from optuna_ctpe._cli_report import search_report

    sampler = _make_sampler(
        args.sampler, _sampler_seed(settings.seed, creator), space.prior_weights()
    )
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
        if args.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    study = optuna.load_study(
        study_name=study.study_name, storage=storage, sampler=sampler, pruner=pruner
    )
    objective = Objective(space, task, settings, args.sampler)
    n_trials = args.n_trials
    if n_trials is None and args.timeout is None:
        n_trials = DEFAULT_N_TRIALS
    callbacks, close_bar = _progress_bar(n_trials, not args.no_progress)
    interrupted: KeyboardInterrupt | None = None
    # Sequentially, the main thread runs the trials' bookkeeping: defer signals outside the
    # objective. With threads it only waits for them, and may be interrupted anywhere.
    loop = deferred() if args.n_jobs == 1 else contextlib.nullcontext()
    try:
        with loop:
            n_trials = _run_enqueued_sequentially(study, objective, n_trials, args, callbacks)
            if n_trials is None or n_trials > 0:
                study.optimize(
                    objective,
                    n_trials=n_trials,
                    timeout=args.timeout,
                    n_jobs=args.n_jobs,
                    callbacks=[*callbacks, _stop_if_interrupted],
                )
    except KeyboardInterrupt as e:
        interrupted = e
    finally:
        close_bar()
        # Optuna fails the trial it was running when interrupted; this catches any trial of this
        # process that an interrupt outside the objective (in the sampler, in tell) left RUNNING.
        fail_abandoned_trials(study, only_own=True)
    print(search_report(study, space, prepared.baselines, spec.dashboard_url), flush=True)
    if interrupted is not None:
        _log("stopped; run the same command again to continue the study.")
        return EXIT_SIGTERM if isinstance(interrupted, Terminated) else EXIT_SIGINT
    return 0


def _run_enqueued_sequentially(
    study: optuna.Study,
    objective: Any,
    n_trials: int | None,
    args: argparse.Namespace,
    callbacks: list[Any],
) -> int | None:
    """Run the enqueued (warm-start) trials one at a time before threads start.

    Optuna pops a WAITING trial by reading its state and then setting it RUNNING; SQLite
    ignores the row lock, so two threads of one process can pop the same trial and the second
    ``tell`` fails with "Cannot tell a COMPLETE trial". Returns the trials left to run.
    """
    if args.n_jobs == 1:
        return n_trials
    n_waiting = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    n_first = n_waiting if n_trials is None else min(n_waiting, n_trials)
    if n_first > 0:
        study.optimize(
            objective,
            n_trials=n_first,
            timeout=args.timeout,
            n_jobs=1,
            callbacks=[*callbacks, _stop_if_interrupted],
        )
    return None if n_trials is None else n_trials - n_first


def _sensitivity(args: argparse.Namespace) -> int:
    from optuna_ctpe import sensitivity
    from optuna_ctpe._cli_report import plot_sensitivities
    from optuna_ctpe._cli_report import sensitivity_table

    if not 0 <= args.rtol < 1:
        raise UsageError(f"--rtol must be in [0, 1), got {args.rtol!r}.")
    if args.max_probes < 2:
        raise UsageError("--max-probes must be >= 2 (a standard error needs two), got 1.")
    seed = DEFAULTS["seed"] if args.seed is None else args.seed
    task = load_task(args.task or DEFAULT_TASK, seed=seed, cache_dir=args.cache_dir)
    estimate = (
        sensitivity.hutchinson_traces
        if args.estimator == "hutchinson"
        else sensitivity.empirical_fisher_traces
    )
    traces = list(
        estimate(
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
        _log(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([t.to_dict() for t in traces], f, indent=2)
        _log(f"wrote {args.json}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from optuna_ctpe._cli_export import export

    spec = parse_storage(args.storage)
    result = export(spec, args.study_name, args.trial, args.output_dir, cache_dir=args.cache_dir)
    recorded = result.trial.user_attrs["accuracy"]
    print(f"trial {result.trial.number}: accuracy {result.accuracy:.4f} (recorded {recorded:.4f})")
    print(f"configuration: {result.config_path}")
    print(f"state dict:    {result.model_path}  (torch.load(path, weights_only=True))")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``optuna-ctpe`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    verbosity = optuna.logging.get_verbosity()
    if not getattr(args, "verbose", False):
        # The progress bar and the final table replace Optuna's line per trial.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with handle_signals():
            return args.handler(args)
    except UsageError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        # Interrupted outside the optimisation loop (while loading the task or measuring).
        _log("interrupted.")
        return EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT
    finally:
        optuna.logging.set_verbosity(verbosity)


if __name__ == "__main__":
    sys.exit(main())
