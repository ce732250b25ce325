"""What the commands share: defaults, exit codes, option types, common options and messages.

Option types turn one command-line string into a value, and report a bad one as
:class:`argparse.ArgumentTypeError`, which argparse prints as ``argument --x: <message>`` and
turns into exit code 2. Problems found later (a storage scheme, a task that does not import, an
option that contradicts an existing study) raise :class:`UsageError`, which ``main`` prints as
``optuna-ctpe COMMAND: error: <message>``, also with exit code 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import sys
from typing import Any
from typing import TypeVar

from optuna_ctpe._validation import check_bits
from optuna_ctpe._validation import check_grid
from optuna_ctpe._validation import check_integer
from optuna_ctpe._validation import check_ratio
from optuna_ctpe._validation import check_real
from optuna_ctpe._validation import MAX_BITS
from optuna_ctpe._validation import MIN_BITS
from optuna_ctpe.search_space import DEFAULT_BITS
from optuna_ctpe.search_space import DEFAULT_WIDTHS
from optuna_ctpe.tasks import CACHE_ENV


__all__ = [
    "DEFAULTS",
    "DEFAULT_LATENCY_BATCH",
    "DEFAULT_LATENCY_RUNTIME",
    "DEFAULT_LATENCY_SOURCE",
    "DEFAULT_N_TRIALS",
    "DEFAULT_SIZE_BUDGET",
    "DEFAULT_STORAGE",
    "DEFAULT_STUDY",
    "DEFAULT_TASK",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_USAGE",
    "UsageError",
    "add_storage_options",
    "add_task_options",
    "DEFAULT_FORMATS",
    "bits_list",
    "formats_list",
    "latency_ms",
    "log",
    "n_jobs",
    "nonnegative_int",
    "positive_int",
    "positive_seconds",
    "show_grid",
    "size_budget",
    "widths_list",
]

_T = TypeVar("_T")

# -- exit codes (0 success; 1 an unexpected error, whose message names it) ----------------------
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

# -- defaults ------------------------------------------------------------------------------------
DEFAULT_STORAGE = "sqlite:///optuna-ctpe.db"
DEFAULT_STUDY = "optuna-ctpe"
#: Trials run when neither --n-trials nor --timeout is given.
DEFAULT_N_TRIALS = 50
DEFAULT_TASK = "optuna_ctpe.tasks.digits:digits_task"
#: Defaults of the settings a user leaves out when creating a study (see ``settings.Settings``).
DEFAULTS: dict[str, Any] = {
    "task": DEFAULT_TASK,
    "seed": 0,
    "objective": "pareto",
    "size_budget": None,
    "bits": DEFAULT_BITS,
    "widths": DEFAULT_WIDTHS,
    "hessian_pruning": True,
    "finetune_epochs": 0,
    # None: a bit-width space (``--bits``), as before formats existed.
    "formats": None,
    # No ties: every layer its own choice, as before ties existed.
    "tie_fused": False,
    # Latency settings: None outside the latency objectives (see settings._new_settings).
    "latency_budget_ms": None,
    "latency_source": None,
    "latency_batch": None,
    "latency_runtime": None,
}
#: ``--formats default``: the weight formats a user would pick for a mixed-format search
#: (docs/guide/08_formats.md, "Command line", says why): the safe per-channel int8 and int4 of
#: round to nearest, and GPTQ's asymmetric 4, 3 and 2 bits in groups of 128 inputs, the
#: layout GPTQ/AWQ checkpoints, torchao and ONNX's MatMulNBits use. Rows shorter than 128
#: inputs (small models) fall back to one group per row, with a warning.
DEFAULT_FORMATS = (
    "int8-pc-sym-rtn",
    "int4-pc-sym-rtn",
    "int4-g128-asym-gptq",
    "int3-g128-asym-gptq",
    "int2-g128-asym-gptq",
)
#: ``--size-budget`` when ``--objective budget`` is given without one: 1/8 of FP32 (twice the
#: compression of uniform 8-bit).
DEFAULT_SIZE_BUDGET = 0.125
#: How a latency objective (:data:`optuna_ctpe.cli.objectives.LATENCY_OBJECTIVES`) measures
#: when given without ``--latency-source``, ``--latency-batch`` and ``--latency-runtime`` (one of
#: :data:`optuna_ctpe.deploy.latency_meter.LATENCY_SOURCES` and ``LATENCY_RUNTIMES``).
DEFAULT_LATENCY_SOURCE = "table"
DEFAULT_LATENCY_BATCH = 1
DEFAULT_LATENCY_RUNTIME = "onnxruntime"


class UsageError(Exception):
    """A bad command-line value; the CLI prints ``optuna-ctpe: error: <message>`` and exits 2."""


def log(message: str) -> None:
    """A progress or status line on stderr (stdout carries the tables only)."""
    print(f"optuna-ctpe: {message}", file=sys.stderr, flush=True)


def show_grid(values: Any) -> str:
    """A grid as the command line spells it (``2,3,4``); other values as ``str``."""
    if isinstance(values, tuple):
        return ",".join(str(v) for v in values)
    return str(values)


# -- option types --------------------------------------------------------------------------------


def _parsed(text: str, parse: Callable[[str], _T], check: Callable[[_T], _T], message: str) -> _T:
    """``check(parse(text))``, or :class:`argparse.ArgumentTypeError` with ``message``.

    The messages are the CLI's own (documented and tested), not the validation helpers',
    because they speak of the text the user typed rather than of a parsed value.
    """
    try:
        return check(parse(text))
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None


def _integer(text: str, minimum: int, requirement: str) -> int:
    return _parsed(
        text,
        int,
        lambda v: check_integer(v, "N", minimum=minimum),
        f"must be {requirement}, got {text!r}",
    )


def positive_int(text: str) -> int:
    """An integer >= 1 (``--n-trials``, ``--max-probes``)."""
    return _integer(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (``--seed``, ``--finetune-epochs``, ``--trial``)."""
    return _integer(text, 0, "an integer >= 0")


def _thread_count(value: int) -> int:
    if value == 0:
        raise ValueError("0 threads")
    return check_integer(value, "--n-jobs", minimum=-1)


def n_jobs(text: str) -> int:
    """A positive number of threads, or -1 for one per CPU (``--n-jobs``)."""
    return _parsed(
        text,
        int,
        _thread_count,
        f"must be a positive integer, or -1 for one thread per CPU, got {text!r}",
    )


def _positive_real(value: float) -> float:
    return check_real(value, "X", minimum=0.0, open_minimum=True)


def positive_seconds(text: str) -> float:
    """A finite positive duration (``--timeout``)."""
    return _parsed(
        text, float, _positive_real, f"must be a positive number of seconds, got {text!r}"
    )


def latency_ms(text: str) -> float:
    """A finite positive number of milliseconds (``--latency-budget``)."""
    return _parsed(
        text, float, _positive_real, f"must be a positive number of milliseconds, got {text!r}"
    )


def size_budget(text: str) -> float:
    """``--size-budget`` as the fraction of the FP32 size: ``8`` and ``0.125`` both give 0.125."""
    value = _parsed(
        text,
        float,
        _positive_real,
        "must be a compression ratio > 1 (e.g. 8) or a fraction of the FP32 size in (0, 1] "
        f"(e.g. 0.125), got {text!r}",
    )
    # Both spellings of one budget give the same stored fraction, so resumed runs compare equal.
    return 1.0 / value if value > 1 else value


def _grid(
    text: str,
    parse: Callable[[str], _T],
    check_one: Callable[[Any, str], _T],
    what: str,
    requirement: str,
) -> tuple[_T, ...]:
    """A comma-separated grid: each item parsed and checked, no repeats, sorted."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"must be comma-separated {what}, got {text!r}")

    def parse_one(item: str) -> _T:
        message = f"{what} must be {requirement}, got {item!r} in {text!r}"
        return _parsed(item, parse, lambda v: check_one(v, what), message)

    values = [parse_one(item) for item in items]
    try:
        return check_grid(values, what, lambda v, _: v)  # items are checked: repeats only
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must not repeat, got {text!r}") from None


def bits_list(text: str) -> tuple[int, ...]:
    """``--bits``: comma-separated bit-widths in [MIN_BITS, MAX_BITS]."""
    return _grid(text, int, check_bits, "bit-widths", f"integers in [{MIN_BITS}, {MAX_BITS}]")


def formats_list(text: str) -> tuple[str, ...]:
    """``--formats``: comma-separated weight format names (``int4-g128-asym-gptq``, see
    :func:`optuna_ctpe.space.formats.parse_format`), or ``default`` for
    :data:`DEFAULT_FORMATS`; sorted by name, so that the same set always compares equal."""
    from optuna_ctpe.space.formats import parse_format

    if text.strip() == "default":
        return tuple(sorted(DEFAULT_FORMATS))
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(
            f"must be 'default' or comma-separated format names, got {text!r}"
        )
    names = []
    for item in items:
        try:
            names.append(parse_format(item).name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"formats must not repeat, got {text!r}")
    return tuple(sorted(names))


def widths_list(text: str) -> tuple[float, ...]:
    """``--widths``: comma-separated width ratios in (0, 1]."""
    return _grid(text, float, check_ratio, "width ratios", "numbers in (0, 1]")


# -- options several commands take ---------------------------------------------------------------


def add_task_options(
    parser: argparse.ArgumentParser, *, task: bool = True, seed_help: str = ""
) -> None:
    """``--task`` and ``--seed`` (unless ``task`` is False), and ``--cache-dir``."""
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
            type=nonnegative_int,
            help=f"seed of the task (data split, training) and of the Hessian probes{seed_help} "
            f"(default: {DEFAULTS['seed']})",
        )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=(
            "weight cache folder for tasks whose factory takes cache_dir (default: "
            f"${CACHE_ENV}, else the task's own default: for digits the user cache folder, "
            "~/.cache/optuna-ctpe on Linux)"
        ),
    )


def add_storage_options(parser: argparse.ArgumentParser, *, study_required: bool) -> None:
    """``--storage`` and ``--study-name`` (defaulted when ``study_required``)."""
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
