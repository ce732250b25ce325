"""``optuna-ctpe search``: measure, prune and search a task's per-layer bit-widths and widths.

The command opens (or joins) the study, sets it up once (sensitivities, search space,
baselines, warm starts; :mod:`optuna_ctpe.cli.study`), runs the trials of this process and
prints the report. Several processes on one storage cooperate as distributed workers, and a
run stopped by Ctrl-C or SIGTERM leaves no trial of its own RUNNING.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import contextlib
import dataclasses
import functools
import os
import sys
import time
from typing import Any
import warnings

import optuna

from optuna_ctpe import _optuna_compat as compat
from optuna_ctpe._validation import MAX_BITS
from optuna_ctpe._validation import MIN_BITS
from optuna_ctpe.cli.objective import check_latency_extra
from optuna_ctpe.cli.objective import known_constraint
from optuna_ctpe.cli.objective import log_chosen_latency
from optuna_ctpe.cli.objective import Objective
from optuna_ctpe.cli.objectives import objective_help
from optuna_ctpe.cli.objectives import OBJECTIVES
from optuna_ctpe.cli.options import add_storage_options
from optuna_ctpe.cli.options import add_task_options
from optuna_ctpe.cli.options import bits_list
from optuna_ctpe.cli.options import DEFAULT_FORMATS
from optuna_ctpe.cli.options import DEFAULT_LATENCY_BATCH
from optuna_ctpe.cli.options import DEFAULT_LATENCY_RUNTIME
from optuna_ctpe.cli.options import DEFAULT_LATENCY_SOURCE
from optuna_ctpe.cli.options import DEFAULT_N_TRIALS
from optuna_ctpe.cli.options import DEFAULTS
from optuna_ctpe.cli.options import EXIT_SIGINT
from optuna_ctpe.cli.options import EXIT_SIGTERM
from optuna_ctpe.cli.options import formats_list
from optuna_ctpe.cli.options import latency_ms
from optuna_ctpe.cli.options import log
from optuna_ctpe.cli.options import n_jobs
from optuna_ctpe.cli.options import nonnegative_int
from optuna_ctpe.cli.options import positive_int
from optuna_ctpe.cli.options import positive_seconds
from optuna_ctpe.cli.options import show_grid
from optuna_ctpe.cli.options import size_budget
from optuna_ctpe.cli.options import UsageError
from optuna_ctpe.cli.options import widths_list
from optuna_ctpe.cli.report import search_report
from optuna_ctpe.cli.sensitivity import read_for_study
from optuna_ctpe.cli.settings import resolve_settings
from optuna_ctpe.cli.settings import Settings
from optuna_ctpe.cli.signals import check_interrupted
from optuna_ctpe.cli.signals import deferred
from optuna_ctpe.cli.signals import Terminated
from optuna_ctpe.cli.storage import fail_abandoned_trials
from optuna_ctpe.cli.storage import open_storage
from optuna_ctpe.cli.storage import parse_storage
from optuna_ctpe.cli.study import join_or_create
from optuna_ctpe.cli.study import prepare
from optuna_ctpe.cli.task import load_task
from optuna_ctpe.cli.task import resolve_factory
from optuna_ctpe.deploy.latency_meter import LATENCY_RUNTIMES
from optuna_ctpe.deploy.latency_meter import LATENCY_SOURCES
from optuna_ctpe.tasks import Task


__all__ = ["add_parser", "run"]


# -- the parser ----------------------------------------------------------------------------------


def add_parser(commands: Any) -> None:
    """Add the ``search`` command to the subparsers ``commands``."""
    parser = commands.add_parser(
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
    add_storage_options(parser, study_required=True)
    _add_loop_options(parser)
    add_task_options(
        parser, seed_help="; the sampler of the process that creates the study uses it too"
    )
    _add_grid_options(parser)
    _add_objective_options(parser)
    _add_method_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show Optuna's log line for every trial"
    )
    parser.set_defaults(handler=run)


def _add_loop_options(parser: argparse.ArgumentParser) -> None:
    """How long and how wide this process runs: ``--n-trials``, ``--timeout``, ``--n-jobs``."""
    parser.add_argument(
        "--n-trials",
        type=positive_int,
        metavar="N",
        help=(
            "number of NEW trials this process runs, as in Study.optimize: a resumed run adds "
            "this many, and N workers run N times this many in total (default: "
            f"{DEFAULT_N_TRIALS}, or unlimited with --timeout)"
        ),
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        metavar="SECONDS",
        help="stop starting new trials after this many seconds (the running ones finish)",
    )
    parser.add_argument(
        "--n-jobs",
        type=n_jobs,
        metavar="N",
        default=1,
        help="trials run in parallel threads of this process; -1: one per CPU (default: 1)",
    )


def _add_grid_options(parser: argparse.ArgumentParser) -> None:
    """The grids of the search space: ``--bits`` (or ``--formats``) and ``--widths``."""
    parser.add_argument(
        "--bits",
        type=bits_list,
        metavar="B,B,...",
        help=(
            f"grid of weight bit-widths, integers in [{MIN_BITS}, {MAX_BITS}] "
            f"(default: {show_grid(DEFAULTS['bits'])})"
        ),
    )
    parser.add_argument(
        "--formats",
        type=formats_list,
        metavar="NAME,NAME,...|default",
        help=(
            "search weight formats per layer instead of bit-widths: comma-separated format "
            "names (int<bits>-<pc|g<size>>-<sym|fullsym|asym>-<rtn|gptq>, e.g. "
            "int4-g128-asym-gptq), or 'default' for "
            f"{','.join(DEFAULT_FORMATS)}; not with --bits, --finetune-epochs or a latency "
            "objective (default: bit-widths)"
        ),
    )
    parser.add_argument(
        "--tie-fused",
        action="store_const",
        const=True,
        dest="tie_fused",
        help=(
            "give the layers a serving runtime fuses one shared choice: the query/key/value "
            "projections of each attention module and a gated MLP's gate and up projections "
            "(vLLM and TensorRT-LLM cannot load them in different formats)"
        ),
    )
    parser.add_argument(
        "--widths",
        type=widths_list,
        metavar="W,W,...",
        help=(
            "grid of width ratios (fraction of channels kept per dependency group), in (0, 1]; "
            f"a single 1.0 searches bit-widths only (default: {show_grid(DEFAULTS['widths'])})"
        ),
    )


def _add_objective_options(parser: argparse.ArgumentParser) -> None:
    """What a trial is scored on: ``--objective``, ``--size-budget`` and the latency options."""
    parser.add_argument(
        "--objective",
        choices=tuple(OBJECTIVES),
        help=(
            f"{objective_help()}. Latency is timed on --latency-runtime "
            f"(default: {DEFAULTS['objective']})"
        ),
    )
    parser.add_argument(
        "--size-budget",
        type=size_budget,
        metavar="X",
        help=(
            "size budget of --objective budget (optional with latency-budget): a compression "
            "ratio over FP32 if > 1 (8 means 1/8 of the FP32 size), else a fraction of the FP32 "
            "size (0.125, the same) (default: 8 with --objective budget)"
        ),
    )
    parser.add_argument(
        "--latency-budget",
        type=latency_ms,
        metavar="MS",
        dest="latency_budget_ms",
        help="latency budget of --objective latency-budget, in milliseconds (required with it)",
    )
    parser.add_argument(
        "--latency-source",
        choices=LATENCY_SOURCES,
        help=(
            "how a trial's latency is had: table: a per-layer, per-choice lookup table "
            "measured once when the study is set up (seconds) and summed; measured: each "
            "configuration exported to ONNX and timed (about a second or more per new "
            f"configuration) (default: {DEFAULT_LATENCY_SOURCE}; measured with "
            "--latency-runtime torch)"
        ),
    )
    parser.add_argument(
        "--latency-batch",
        type=positive_int,
        metavar="N",
        help=(
            "rows of the input latency is timed on: the task's example inputs repeated "
            f"(default: {DEFAULT_LATENCY_BATCH})"
        ),
    )
    parser.add_argument(
        "--latency-runtime",
        choices=LATENCY_RUNTIMES,
        help=(
            "where latency is timed: onnxruntime: its CPU provider, one thread, on the exported "
            "ONNX model; torch: PyTorch with torchao's weight-only kernels on CUDA when a GPU "
            "is available (bfloat16), else on the CPU (float32, one thread); convolutions run "
            "float there, so their bit-widths do not change its latency; --latency-source "
            f"measured only (default: {DEFAULT_LATENCY_RUNTIME})"
        ),
    )


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """How the search runs: sampler, Hessian pruning, fine-tuning and trial pruner."""
    parser.add_argument(
        "--sampler",
        choices=("ctpe", "tpe", "random"),
        default="ctpe",
        help=(
            "ctpe: ClusterTPESampler with Hessian priors, recording its decisions as trial "
            "attributes; tpe: Optuna's TPESampler with its defaults; random: RandomSampler; "
            "for comparisons, run each in its own study (default: ctpe)"
        ),
    )
    parser.add_argument(
        "--sensitivities",
        metavar="FILE",
        help=(
            "build a new study's search space from the traces in FILE (written by "
            "`optuna-ctpe sensitivity --output FILE` for the same task and seed) instead of "
            "measuring them; ignored when the study already has its space"
        ),
    )
    parser.add_argument(
        "--no-hessian-pruning",
        action="store_const",
        const=False,
        dest="hessian_pruning",
        help="search the full grid instead of dropping choices that the sensitivities rule out",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=nonnegative_int,
        metavar="N",
        help=(
            "quantization-aware fine-tuning epochs per trial (one pass over the calibration "
            "batches each); the validation accuracy after each is the trial's intermediate "
            f"value at that step (default: {DEFAULTS['finetune_epochs']})"
        ),
    )
    parser.add_argument(
        "--pruner",
        choices=("none", "median"),
        default="none",
        help=(
            "median: stop a trial whose accuracy after a fine-tuning epoch is below the median "
            "of earlier trials at that epoch; needs --finetune-epochs >= 1 and --objective "
            "budget, since Optuna cannot prune multi-objective trials (default: none)"
        ),
    )


# -- the command ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run ``optuna-ctpe search`` with parsed arguments; return the exit code."""
    spec = parse_storage(args.storage)
    if args.task is not None:
        resolve_factory(args.task)  # a typo fails at once, before the storage is even opened
    storage = open_storage(spec, heartbeat=True)
    study, settings, task, creator = _open_study(storage, args)
    stale = fail_abandoned_trials(study)
    if stale:
        log(f"failed {len(stale)} trial(s) left RUNNING by dead workers: {stale}")
    log(
        ("created" if creator else "joined")
        + f" study {study.study_name!r} in {spec.location} ({len(study.trials)} trials so far)"
    )
    traces = None
    if args.sensitivities is not None:
        traces = read_for_study(args.sensitivities, settings.task, settings.seed)
    prepared = prepare(study, settings, task, creator=creator, log=log, traces=traces)
    space = prepared.space
    log(
        f"search space: 10^{space.log10_size_before:.1f} configurations, "
        f"10^{space.log10_size_after:.1f} after Hessian pruning"
    )
    study = optuna.load_study(
        study_name=study.study_name,
        storage=storage,
        sampler=_make_sampler(
            args.sampler,
            _sampler_seed(settings.seed, creator),
            space.prior_weights(),
            known_constraint(settings, space, prepared.latency),
        ),
        pruner=_make_pruner(args.pruner),
    )
    objective = Objective(space, task, settings, args.sampler, latency=prepared.latency)
    interrupted = _optimize(study, objective, args)
    print(
        search_report(
            study, space, prepared.baselines, spec.dashboard_url, objective=settings.objective
        ),
        flush=True,
    )
    if settings.kind.latency_budget and interrupted is None:
        log_chosen_latency(study, space, task, settings, log)
    if interrupted is not None:
        log("stopped; run the same command again to continue the study.")
        return EXIT_SIGTERM if isinstance(interrupted, Terminated) else EXIT_SIGINT
    return 0


def _check_settings(pruner: str, settings: Settings) -> None:
    """Refuse settings this command cannot run: a pruner without steps, latency without the
    ``deploy`` extra. Runs before a new study is created, so a refused command leaves none."""
    _check_pruner(pruner, settings)
    check_latency_extra(settings)


def _check_pruner(pruner: str, settings: Settings) -> None:
    """Refuse a trial pruner the settings give nothing to prune on.

    Runs before a new study is created, so a refused command leaves no study behind.
    """
    if pruner == "none":
        return
    if settings.finetune_epochs < 1:
        raise UsageError(
            f"--pruner {pruner} needs --finetune-epochs >= 1: the fine-tuning epochs "
            "are the steps at which trials are pruned."
        )
    if len(settings.directions) > 1:
        raise UsageError(
            f"--pruner {pruner} needs --objective budget: Optuna cannot prune trials "
            "of multi-objective studies (--objective latency-budget takes it too)."
        )


def _open_study(
    storage: optuna.storages.BaseStorage, args: argparse.Namespace
) -> tuple[optuna.Study, Settings, Task, bool]:
    """The study (created or joined), its settings, its task and whether we created it.

    The settings are resolved once, and the task built from them before the study is created,
    so that a factory that fails creates no study. Only in the rare race where another worker
    creates the study first with other settings (ours were defaults, theirs explicit) does
    ``join_or_create`` adopt theirs, and the task is built again from them.
    """
    # Each setting's option stores its value under the setting's name (None: not given).
    requested = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    check = functools.partial(_check_settings, args.pruner)
    settings = resolve_settings(storage, args.study_name, requested, check)
    import torch

    if args.n_jobs != 1:
        # Threads of one process share the CPU; one intra-op thread each avoids oversubscription.
        torch.set_num_threads(1)
    task = load_task(settings.task, seed=settings.seed, cache_dir=args.cache_dir)
    study, joined, creator = join_or_create(storage, args.study_name, settings, requested, check)
    if (joined.task, joined.seed) != (settings.task, settings.seed):
        task = load_task(joined.task, seed=joined.seed, cache_dir=args.cache_dir)
    return study, joined, task, creator


def _make_sampler(
    name: str, seed: int | None, prior_weights: dict[str, list[float]], known: Any = None
) -> Any:
    if name == "ctpe":
        from optuna_ctpe.sampler import ClusterTPESampler

        # The budgets are known before a trial runs: no trial is spent on one that cannot fit.
        return ClusterTPESampler(
            seed=seed, prior_weights=prior_weights, record_decisions=True, known_constraints=known
        )
    if name == "tpe":
        with warnings.catch_warnings():
            # On Optuna 4.x, TPE sees the size constraint only through a constraints_func,
            # which 4.x marks experimental: the warning is noise to a command-line user.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, **compat.constraint_sampler_kwargs())
    # Random sampling ignores constraints (and 4.x's RandomSampler takes no constraints_func).
    return optuna.samplers.RandomSampler(seed=seed)


def _make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def _sampler_seed(seed: int, creator: bool) -> int:
    # Samplers with equal seeds in several processes propose identical start-up trials
    # (optuna#4714), so only the creating process uses --seed as is; a joining worker mixes in
    # its process id and the clock.
    if creator:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, os.getpid(), time.time_ns()]).generate_state(1)[0])


# -- the optimisation loop -----------------------------------------------------------------------


def _optimize(
    study: optuna.Study, objective: Objective, args: argparse.Namespace
) -> KeyboardInterrupt | None:
    """Run this process's trials; return the Ctrl-C or SIGTERM that stopped them, if any."""
    n_trials = args.n_trials
    if n_trials is None and args.timeout is None:
        n_trials = DEFAULT_N_TRIALS
    callbacks, close_bar = _progress_bar(n_trials, not args.no_progress)
    callbacks.append(_stop_if_interrupted)
    # While the main thread runs trials (all of them, or with threads the enqueued ones first)
    # it runs their bookkeeping: defer signals outside the objective's computation. With threads
    # it then only waits for them, and may be interrupted anywhere.
    loop = deferred() if args.n_jobs == 1 else contextlib.nullcontext()
    try:
        with deferred():
            n_trials = _run_enqueued_sequentially(study, objective, n_trials, args, callbacks)
        with loop:
            if n_trials is None or n_trials > 0:
                study.optimize(
                    objective,
                    n_trials=n_trials,
                    timeout=args.timeout,
                    n_jobs=args.n_jobs,
                    callbacks=callbacks,
                )
    except KeyboardInterrupt as e:
        return e
    finally:
        close_bar()
        # Optuna fails the trial it was running when interrupted; this catches any trial of this
        # process that an interrupt outside the objective (in the sampler, in tell) left RUNNING.
        fail_abandoned_trials(study, only_own=True)
    return None


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


def _run_enqueued_sequentially(
    study: optuna.Study,
    objective: Objective,
    n_trials: int | None,
    args: argparse.Namespace,
    callbacks: list[Callable[[optuna.Study, Any], None]],
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
            objective, n_trials=n_first, timeout=args.timeout, n_jobs=1, callbacks=callbacks
        )
    return None if n_trials is None else n_trials - n_first
