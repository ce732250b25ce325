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
    Write a trial's configuration as JSON, its packed quantized model (safetensors, the size the
    search accounted) and its state dict.

Exit codes: 0 success; 1 an unexpected error (the message names it); 2 a usage error (a bad
option value, an unknown storage scheme, a task that does not import, a study that does not
exist, an option that contradicts an existing study); 130 interrupted by Ctrl-C; 143 stopped by
SIGTERM. After 130 and 143 the storage is consistent: no trial of this process is left RUNNING.

Where things live: :mod:`.root` (the root parser and the dispatch), :mod:`.options` (option
types, defaults, exit codes, :class:`~optuna_ctpe.cli.options.UsageError`), one module per
command (:mod:`.search`, :mod:`.sensitivity`, :mod:`.export`), and the rooms they share:
:mod:`.settings` (a study's settings and how options resolve against them), :mod:`.study`
(creating or joining a study, its one-time set-up), :mod:`.task` (``--task``),
:mod:`.storage` (``--storage``, heartbeats, abandoned trials), :mod:`.objective`,
:mod:`.choose` (which trials a study recommends), :mod:`.report` and :mod:`.signals`.
"""

from optuna_ctpe.cli.export import load_exported
from optuna_ctpe.cli.root import build_parser
from optuna_ctpe.cli.root import main
from optuna_ctpe.cli.options import DEFAULT_N_TRIALS
from optuna_ctpe.cli.options import DEFAULT_STORAGE


__all__ = ["DEFAULT_N_TRIALS", "DEFAULT_STORAGE", "build_parser", "load_exported", "main"]
