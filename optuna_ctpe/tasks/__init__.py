"""Tasks: a trained model plus the data and functions a quantization search needs.

A task is what the command line's ``--task module:factory`` option loads: ``factory`` is called
with keyword arguments (at least ``seed``) and must return a :class:`Task`. The package embeds
one default task, :func:`optuna_ctpe.tasks.digits.digits_task`, a small CNN on scikit-learn's
``load_digits`` that trains in seconds on a CPU.

This module does not import torch, so the CLI can describe the contract before torch is loaded.
"""

from __future__ import annotations

from typing import Any

from optuna_ctpe.tasks._task import CACHE_ENV
from optuna_ctpe.tasks._task import Task


__all__ = ["CACHE_ENV", "Task", "digits_task"]


def __getattr__(name: str) -> Any:
    # The embedded task needs torch; import it only when asked so that ``Task`` stays torch-free.
    if name == "digits_task":
        from optuna_ctpe.tasks.digits import digits_task

        return digits_task
    raise AttributeError(f"module 'optuna_ctpe.tasks' has no attribute {name!r}")
