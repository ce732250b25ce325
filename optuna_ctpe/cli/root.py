"""The root parser of ``optuna-ctpe`` and the dispatch to its commands.

Each command module (:mod:`~optuna_ctpe.cli.search`, :mod:`~optuna_ctpe.cli.sensitivity`,
:mod:`~optuna_ctpe.cli.export`) adds its own subparser and sets its ``handler``; this module
runs the handler under the signal handlers and turns its outcome into the exit code.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import sys

import optuna

from optuna_ctpe.cli import export
from optuna_ctpe.cli import search
from optuna_ctpe.cli import sensitivity
from optuna_ctpe.cli.options import EXIT_SIGINT
from optuna_ctpe.cli.options import EXIT_SIGTERM
from optuna_ctpe.cli.options import EXIT_USAGE
from optuna_ctpe.cli.options import log
from optuna_ctpe.cli.options import UsageError
from optuna_ctpe.cli.signals import handle_signals
from optuna_ctpe.cli.signals import Terminated


__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``optuna-ctpe`` (public so that docs can render ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="optuna-ctpe",
        description=(
            "Hessian-aware mixed-precision and width search with Optuna's ClusterTPE sampler."
        ),
        epilog=(
            f"Exit codes: 0 success, 1 error, {EXIT_USAGE} usage error, {EXIT_SIGINT} "
            f"interrupted (Ctrl-C), {EXIT_SIGTERM} terminated (SIGTERM). Run "
            "'optuna-ctpe COMMAND --help' for a command's options."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (search, sensitivity, export):
        command.add_parser(commands)
    return parser


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
        log("interrupted.")
        return EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT
    finally:
        optuna.logging.set_verbosity(verbosity)
