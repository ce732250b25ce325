"""Ctrl-C and SIGTERM for the command line: stop promptly, never half-way through bookkeeping.

Optuna handles a :class:`KeyboardInterrupt` raised inside the objective cleanly: the trial is
marked FAIL and ``optimize`` unwinds. Raised anywhere else, for example between the creation of
a trial in ``study.ask()`` and the start of the objective, it leaves that trial RUNNING forever.
So while a study runs sequentially, both signals are *deferred* outside the objective: the
handler records the signal, and the search raises it at the next safe point (the start of the
next objective call, a fine-tuning epoch, the end of a trial). Inside the objective, and outside
the optimisation loop (loading the task, measuring sensitivities), the handler raises at once.

With ``n_jobs > 1`` the main thread only waits for worker threads, so raising there is always
safe; the workers see the recorded signal at their next safe point.

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


__all__ = ["Terminated", "check_interrupted", "deferred", "handle_signals", "interruptible"]


class Terminated(KeyboardInterrupt):
    """Raised when the process receives SIGTERM (a :class:`KeyboardInterrupt`, which Optuna
    already handles)."""


class _State:
    def __init__(self) -> None:
        self.pending: int | None = None  # the signal received, if any
        self.defer = False  # inside a sequential optimisation loop
        self.in_objective = False  # inside the objective of that loop


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
    requires); the previous handlers are restored on exit."""
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


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Defer signals outside :func:`interruptible` blocks (around a sequential ``optimize``)."""
    _state.defer = True
    try:
        yield
    finally:
        _state.defer = False
    check_interrupted()  # a signal that arrived after the last safe point


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """The objective's body: a pending signal raises on entry, a new one raises at once."""
    check_interrupted()
    if threading.current_thread() is not threading.main_thread():
        yield  # a worker thread; signals are raised in the main thread
        return
    _state.in_objective = True
    try:
        yield
    finally:
        _state.in_objective = False
