"""Ctrl-C and SIGTERM for the command line: stop promptly, never half-way through bookkeeping.

Optuna handles a :class:`KeyboardInterrupt` raised inside the objective cleanly: the trial is
marked FAIL and ``optimize`` unwinds. Raised anywhere else, for example between the creation of
a trial in ``study.ask()`` and the start of the objective, it leaves that trial RUNNING forever.
So while a study runs trials in the main thread, both signals are *deferred*: the handler
records the signal, and the search raises it at the next safe point (the start of the
objective's computation, a fine-tuning epoch, the end of a trial). Only inside the objective's
computation (:func:`interruptible`: scoring a model, timing it) and outside the optimisation
loop (loading the task, measuring sensitivities) does the handler raise at once.

The objective's own trial calls (``suggest``, ``set_user_attr``, ``report``, ``should_prune``)
are bookkeeping too, so they stay deferred: they run SQLAlchemy on the storage, and a
:class:`KeyboardInterrupt` raised at an arbitrary point in there (seen: while SQLAlchemy loads
rows) can leave one of this process's connections holding an SQLite lock. Optuna keeps the
exception's traceback, and with it that connection, while it tells the trial FAIL, so the tell
waits on the lock for the whole busy timeout (120 s,
:func:`~optuna_ctpe.cli.storage.open_storage`), then fails and leaves the trial RUNNING.
Storage calls made from inside a computation are wrapped in :func:`shielded`.

With ``n_jobs > 1`` the main thread first runs the enqueued (warm-start) trials, deferred like
a sequential study, then only waits for worker threads, so raising there is always safe; the
workers see the recorded signal at their next safe point.

A recorded signal is also what makes the stop reliable: a handler's exception raised while the
interpreter runs a finaliser (a ``__del__``) is printed as "Exception ignored" and lost, but the
record stays.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import signal
import threading
from types import FrameType


__all__ = [
    "Terminated",
    "check_interrupted",
    "deferred",
    "handle_signals",
    "interruptible",
    "shielded",
]


class Terminated(KeyboardInterrupt):
    """Raised when the process receives SIGTERM (a :class:`KeyboardInterrupt`, which Optuna
    already handles)."""


class _State:
    def __init__(self) -> None:
        self.pending: int | None = None  # the signal received, if any
        self.defer = False  # the main thread runs trials (their bookkeeping)
        self.in_objective = False  # inside the objective's computation, where raising is safe


_state = _State()


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum: int, frame: FrameType | None) -> None:
    _state.pending = signum
    if not _state.defer or _state.in_objective:
        raise _exception(signum)


def check_interrupted() -> None:
    """Raise the recorded signal's exception, if Ctrl-C or SIGTERM arrived (any thread)."""
    if _state.pending is not None:
        raise _exception(_state.pending)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Install the handler for SIGINT and SIGTERM for the block (main thread only, as Python
    requires); the previous handlers are restored on exit, and a signal the block received is
    forgotten there: it belongs to this command, and :func:`check_interrupted` in later code of
    the same process (another command run in-process, a library call of the objective) must
    not raise it again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.pending = None
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state.pending = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Defer signals outside :func:`interruptible` blocks (around trials run in the main
    thread)."""
    _state.defer = True
    try:
        yield
    finally:
        _state.defer = False
    check_interrupted()  # a signal that arrived after the last safe point


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """The objective's computation: a pending signal raises on entry, a new one raises at once.

    Keep the trial's storage calls out of it (or inside :func:`shielded`): see the module.
    """
    check_interrupted()
    with _raising(True):
        yield


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Storage calls inside an :func:`interruptible` block (an epoch's ``report`` and
    ``should_prune``): a signal arriving meanwhile is recorded, and raised on exit."""
    with _raising(False):
        yield
    check_interrupted()


@contextlib.contextmanager
def _raising(at_once: bool) -> Iterator[None]:
    """Whether the handler raises in the main thread during the block; restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # a worker thread; signals are raised in the main thread
        return
    outer = _state.in_objective
    try:
        # Set inside the try: a signal raised just before the assignment still restores it.
        _state.in_objective = at_once
        yield
    finally:
        _state.in_objective = outer
