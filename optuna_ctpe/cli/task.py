"""The ``--task`` option: a ``module:factory`` that builds an :class:`~optuna_ctpe.tasks.Task`."""

from __future__ import annotations

from collections.abc import Callable
import importlib
import inspect
import os
from typing import Any

from optuna_ctpe.cli.options import DEFAULT_TASK
from optuna_ctpe.cli.options import UsageError
from optuna_ctpe.tasks import CACHE_ENV
from optuna_ctpe.tasks import Task


__all__ = ["load_task", "resolve_factory"]


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Import ``module:factory`` and return the factory, without calling it.

    Raises:
        UsageError: If ``spec`` is not ``module:factory``, the module does not import, or it has
            no such callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"--task {spec!r} must have the form module:factory, e.g. {DEFAULT_TASK}."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"--task {spec!r}: cannot import module {module_name!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--task {spec!r}: module {module_name!r} has no callable {attr!r}.")
    return factory


def load_task(spec: str, *, seed: int, cache_dir: str | None) -> Task:
    """Call the ``module:factory`` of ``spec`` as ``factory(seed=seed)``, adding ``cache_dir``
    (from the argument or ``$OPTUNA_CTPE_CACHE_DIR``) when the factory takes it.

    Raises:
        UsageError: As :func:`resolve_factory`, or if the factory does not return a
            :class:`~optuna_ctpe.tasks.Task`.
    """
    factory = resolve_factory(spec)
    kwargs: dict[str, Any] = {"seed": seed}
    cache_dir = cache_dir or os.environ.get(CACHE_ENV) or None
    if cache_dir is not None and "cache_dir" in inspect.signature(factory).parameters:
        kwargs["cache_dir"] = cache_dir
    task = factory(**kwargs)
    if not isinstance(task, Task):
        raise UsageError(
            f"--task {spec!r}: the factory returned {type(task).__name__}, not an "
            "optuna_ctpe.tasks.Task."
        )
    return task
