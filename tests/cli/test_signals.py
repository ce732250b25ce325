"""Ctrl-C and SIGTERM in the search loop: raised only where it is safe, never inside storage.

The signals are sent to this process with :func:`signal.raise_signal`, from an SQLAlchemy hook
at the moment the objective writes to an SQLite study: the racy point where the command once
hung for the whole SQLite busy timeout (a :class:`KeyboardInterrupt` raised inside SQLAlchemy
can leave a read unfinished on its connection, and Optuna's tell of the failed trial then waits
on the lock it holds).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
import signal
import sqlite3
from typing import Any

import optuna
from optuna.trial import TrialState
import pytest

from optuna_ctpe.cli.signals import check_interrupted
from optuna_ctpe.cli.signals import deferred
from optuna_ctpe.cli.signals import handle_signals
from optuna_ctpe.cli.signals import interruptible
from optuna_ctpe.cli.signals import shielded
from optuna_ctpe.cli.signals import Terminated


SIGNALS = [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)]
IDS = ["SIGINT", "SIGTERM"]


@pytest.fixture
def handled() -> Iterator[None]:
    """The command's handlers for the test; Python's own are back afterwards."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with handle_signals():
        yield
    assert {s: signal.getsignal(s) for s in before} == before


# -- the primitives ------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "error"), SIGNALS, ids=IDS)
def test_a_signal_does_not_outlive_the_block_that_handled_it(signum: int, error: type) -> None:
    # Once raised inside the block, the signal is not raised again by later code of the same
    # process (a later in-process command, or the objective called as a library).
    def outlived() -> bool:
        try:
            check_interrupted()
        except KeyboardInterrupt:  # Terminated too
            return True
        return False

    with pytest.raises(error), handle_signals(), deferred(), interruptible():
        signal.raise_signal(signum)
    assert not outlived()
    with pytest.raises(error), handle_signals(), deferred():
        signal.raise_signal(signum)  # recorded; raised where the deferral ends
    assert not outlived()


@pytest.mark.parametrize(("signum", "error"), SIGNALS, ids=IDS)
def test_interruptible_raises_at_once(handled: None, signum: int, error: type) -> None:
    reached = []
    with pytest.raises(error), deferred(), interruptible():
        signal.raise_signal(signum)
        reached.append(True)
    assert not reached


@pytest.mark.parametrize(("signum", "error"), SIGNALS, ids=IDS)
def test_deferred_and_shielded_record_and_raise_at_the_safe_point(
    handled: None, signum: int, error: type
) -> None:
    steps = []
    with pytest.raises(error), deferred(), interruptible():
        with shielded():
            signal.raise_signal(signum)
            steps.append("the shielded block finished")
        steps.append("after the shield")
    assert steps == ["the shielded block finished"]

    steps.clear()
    with pytest.raises(error), deferred():
        signal.raise_signal(signum)
        steps.append("bookkeeping finished")
        with interruptible():  # the pending signal raises on entry
            steps.append("computation")
    assert steps == ["bookkeeping finished"]


def test_a_signal_after_the_last_safe_point_raises_when_the_loop_ends(handled: None) -> None:
    with pytest.raises(KeyboardInterrupt), deferred():
        signal.raise_signal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        check_interrupted()  # the record stays until the handlers are installed again


def test_the_state_is_restored_when_the_computation_raises(handled: None) -> None:
    with pytest.raises(ValueError), deferred(), interruptible():
        raise ValueError("a failing trial")
    # The loop goes on deferring: outside the computation a signal is only recorded.
    with pytest.raises(KeyboardInterrupt), deferred():
        signal.raise_signal(signal.SIGINT)
        recorded = True
    assert recorded


# -- the search loop -----------------------------------------------------------------------------


def _signal_on_write(study: optuna.Study, table: str, key: str, signum: int) -> Callable[[], int]:
    """Send ``signum`` to this process from inside SQLAlchemy's first write of a row about
    ``key`` to ``table``; returns a function giving how many signals were sent."""
    from sqlalchemy import event

    sent = []

    def hook(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if not sent and statement.startswith(f"INSERT INTO {table}") and key in repr(parameters):
            sent.append(signum)
            signal.raise_signal(signum)  # the handler runs here, inside SQLAlchemy

    engine = study._storage._backend.engine  # type: ignore[attr-defined]  # RDBStorage's engine
    event.listen(engine, "before_cursor_execute", hook)
    return lambda: len(sent)


def _objective_and_study(tmp_path: Path, finetune_epochs: int) -> tuple[object, optuna.Study]:
    torch = pytest.importorskip("torch")
    if finetune_epochs:
        pytest.importorskip("torch_pruning")
    from optuna_ctpe.cli.objective import Objective
    from optuna_ctpe.cli.settings import Settings
    from optuna_ctpe.nn.layers import model_layers
    from optuna_ctpe.search_space import HessianSearchSpace
    from optuna_ctpe.space.records import LayerSensitivity
    from optuna_ctpe.tasks import Task

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    bits = (2, 4, 8)
    layers = [
        LayerSensitivity(name, 1.0, layer.weight.numel(), {b: 1.0 / b for b in bits})
        for name, layer in model_layers(model).items()
    ]
    space = HessianSearchSpace(layers, bits=bits, widths=(1.0,), budget=1e9)

    def evaluate(net: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((net(x).argmax(1) == y).float().mean())

    def loss(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(net(batch[0]), batch[1])

    task = Task("t", model.eval(), loss, [(x, y)], [(x, y)], x[:1], evaluate)
    settings = Settings(
        task="t:t",
        seed=0,
        objective="budget",
        size_budget=1.0,
        bits=bits,
        widths=(1.0,),
        hessian_pruning=False,
        finetune_epochs=finetune_epochs,
    )
    # A short busy timeout: were a lock left behind, the test would fail in seconds, not hang.
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 's.db'}", engine_kwargs={"connect_args": {"timeout": 2}}
    )
    study = optuna.create_study(
        storage=storage, direction="maximize", sampler=optuna.samplers.RandomSampler(0)
    )
    return Objective(space, task, settings, "random"), study


def _assert_unlocked(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "s.db", timeout=0) as con:
        con.execute("BEGIN EXCLUSIVE")  # fails at once if any connection still holds a lock


@pytest.mark.parametrize("n_jobs", [1, 2])
@pytest.mark.parametrize(("signum", "error"), SIGNALS, ids=IDS)
def test_a_signal_during_the_objectives_storage_write_waits_for_the_end_of_the_trial(
    handled: None, tmp_path: Path, signum: int, error: type, n_jobs: int
) -> None:
    """The signal arrives while the objective stores the trial's accuracy: the write finishes,
    the trial completes with all its attributes, and the loop stops after it. With two threads
    the main thread runs the enqueued (warm-start) trials first, and the same holds there."""
    from optuna_ctpe.cli.search import _optimize

    objective, study = _objective_and_study(tmp_path, finetune_epochs=0)
    for _ in range(3):
        study.enqueue_trial({})
    sent = _signal_on_write(study, "trial_user_attributes", "accuracy", signum)
    args = argparse.Namespace(n_trials=10, timeout=None, n_jobs=n_jobs, no_progress=True)
    interrupted = _optimize(study, objective, args)  # type: ignore[arg-type]
    assert sent() == 1
    assert isinstance(interrupted, error)
    finished = [t for t in study.get_trials() if t.state != TrialState.WAITING]
    assert [t.state for t in finished] == [TrialState.COMPLETE]
    assert {"sampler", "accuracy", "size_kb", "feasible"} <= finished[0].user_attrs.keys()
    _assert_unlocked(tmp_path)


@pytest.mark.parametrize(("signum", "error"), SIGNALS, ids=IDS)
def test_a_signal_during_an_epochs_report_stops_the_fine_tuning_after_the_report(
    handled: None, tmp_path: Path, signum: int, error: type
) -> None:
    """The signal arrives while the first epoch's accuracy is reported (inside the interruptible
    fine-tuning): the report is stored, and the trial stops there, before a second epoch."""
    from optuna_ctpe.cli.search import _optimize

    objective, study = _objective_and_study(tmp_path, finetune_epochs=3)
    sent = _signal_on_write(study, "trial_intermediate_values", "", signum)
    args = argparse.Namespace(n_trials=10, timeout=None, n_jobs=1, no_progress=True)
    interrupted = _optimize(study, objective, args)  # type: ignore[arg-type]
    assert sent() == 1
    assert isinstance(interrupted, error)
    (trial,) = study.get_trials()
    assert trial.state == TrialState.FAIL  # interrupted inside the objective, as Optuna records
    assert list(trial.intermediate_values) == [0]
    _assert_unlocked(tmp_path)
