"""Storage opened by the command line: SQLite shared by several worker processes."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
import sqlite3

import optuna
import pytest
from sqlalchemy import text

from optuna_ctpe.cli.storage import open_storage
from optuna_ctpe.cli.storage import parse_storage


def _open(db: Path) -> optuna.storages.RDBStorage:
    storage = open_storage(parse_storage(f"sqlite:///{db}"), heartbeat=False)
    assert isinstance(storage, optuna.storages.RDBStorage)
    return storage


def test_sqlite_read_in_a_transaction_holds_the_write_lock(tmp_path: Path) -> None:
    """A transaction that has only read already excludes other writers, so a read-then-write
    (Optuna popping an enqueued trial) cannot interleave with another worker's."""
    db = tmp_path / "study.db"
    storage = _open(db)
    with storage.engine.connect() as connection, connection.begin():
        connection.execute(text("SELECT count(*) FROM trials")).scalar_one()
        other = sqlite3.connect(db, timeout=0, isolation_level=None)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()
    # Released at the end of the transaction.
    other = sqlite3.connect(db, timeout=5, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    other.close()


def _pop_trials(db: str, n: int, out: multiprocessing.Queue) -> None:
    study = optuna.load_study(study_name="s", storage=_open(Path(db)))
    out.put([study.ask().number for _ in range(n)])


def test_sqlite_workers_never_pop_one_enqueued_trial_twice(tmp_path: Path) -> None:
    """Three processes ask concurrently while 60 enqueued trials wait: each trial is handed to
    exactly one of them."""
    db = tmp_path / "study.db"
    study = optuna.create_study(study_name="s", storage=_open(db))
    for i in range(60):
        study.enqueue_trial({"x": float(i)})
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = context.Queue()
    workers = [context.Process(target=_pop_trials, args=(str(db), 20, out)) for _ in range(3)]
    for worker in workers:
        worker.start()
    numbers = [number for _ in workers for number in out.get(timeout=120)]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert sorted(numbers) == list(range(60))
    states = {t.state for t in study.get_trials(deepcopy=False)}
    assert states == {optuna.trial.TrialState.RUNNING}


def test_schema_race_lost_to_another_worker_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that loses the race to create Optuna's tables (PostgreSQL raises DuplicateTable,
    a ProgrammingError) opens the storage again instead of failing."""
    from sqlalchemy.exc import ProgrammingError

    from optuna_ctpe.cli import storage as storage_module

    real = storage_module.RDBStorage
    calls = []

    def racing(*args: object, **kwargs: object) -> optuna.storages.RDBStorage:
        calls.append(args)
        if len(calls) == 1:
            raise ProgrammingError("CREATE TABLE studies", {}, Exception("DuplicateTable"))
        return real(*args, **kwargs)

    monkeypatch.setattr(storage_module, "RDBStorage", racing)
    assert isinstance(_open(tmp_path / "study.db"), optuna.storages.RDBStorage)
    assert len(calls) == 2
