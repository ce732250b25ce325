"""Storage for the command line: URL parsing, heartbeats and the clean-up of abandoned trials.

``optuna-ctpe search`` must leave its storage consistent however it ends, and must cope with the
trials that a killed process (SIGKILL, a lost machine) left RUNNING. Two mechanisms do that:

* RDB storages (SQLite, PostgreSQL, MySQL, ...) run Optuna's heartbeat: every worker refreshes
  its running trial's heartbeat, and a trial whose heartbeat is older than the grace period is
  failed by whichever worker looks next and re-enqueued once by
  :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` (Optuna 5's name for
  ``RetryFailedTrialCallback``).
* Every storage additionally gets an owner tag per trial (the system attribute
  ``ctpe:worker`` = ``host:pid:start-time``). At start-up, a RUNNING trial whose owner ran on this
  host and no longer exists is failed at once, without waiting for a grace period, as is a
  RUNNING trial that never got its tag and started long ago (:data:`UNTAGGED_GRACE`). On
  journal files, which have no heartbeat, this is the only clean-up: a trial abandoned by a
  worker on *another* host stays RUNNING there until ``optuna-ctpe`` runs on that host again.
"""

from __future__ import annotations

from dataclasses import dataclass
import datetime
import os
from pathlib import Path
import socket
import time
from typing import Any
import warnings

import optuna
from optuna.storages import BaseStorage
from optuna.storages import RDBStorage
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from optuna_ctpe import _attrs
from optuna_ctpe import _optuna_compat as compat
from optuna_ctpe.cli.options import UsageError

__all__ = [
    "HEARTBEAT_INTERVAL",
    "GRACE_PERIOD",
    "StorageSpec",
    "UNTAGGED_GRACE",
    "fail_abandoned_trials",
    "owner_is_dead",
    "open_storage",
    "parse_storage",
    "worker_id",
]

#: Seconds between heartbeats of a running trial (RDB storages).
HEARTBEAT_INTERVAL = 10
#: Seconds without a heartbeat after which another worker fails the trial. Three missed beats,
#: so that a worker stalled by a long garbage collection or a busy disk is not failed.
GRACE_PERIOD = 3 * HEARTBEAT_INTERVAL
#: Seconds after which a RUNNING trial without a worker tag counts as abandoned. Generous, since
#: trial start times come from the creating worker's clock, which may differ from ours.
UNTAGGED_GRACE = 300
#: Attempts at opening an RDB storage whose schema another worker may be creating.
_SCHEMA_ATTEMPTS = 5

_PROCESS_START = f"{time.time():.3f}"


@dataclass(frozen=True)
class StorageSpec:
    """A parsed ``--storage`` value.

    Attributes:
        kind: ``"rdb"`` (an SQLAlchemy URL) or ``"journal"`` (an append-only journal file).
        location: The SQLAlchemy URL, or the journal file's path.
    """

    kind: str
    location: str

    @property
    def local_file(self) -> Path | None:
        """The file of a journal or file-based SQLite storage; None for servers and memory."""
        if self.kind == "journal":
            return Path(self.location)
        if self.location.startswith("sqlite:///"):
            path = self.location[len("sqlite:///") :]
            return Path(path) if path and path != ":memory:" else None
        return None

    @property
    def dashboard_url(self) -> str:
        """The argument that makes ``optuna-dashboard`` open this storage from any directory."""
        local = self.local_file
        if local is None:
            return self.location
        if self.kind == "journal":
            return str(local.resolve())
        return "sqlite:///" + str(local.resolve())


def parse_storage(value: str) -> StorageSpec:
    """Parse ``--storage``: ``sqlite:///FILE``, any SQLAlchemy URL, ``journal:///FILE`` or a
    path ending in ``.log`` (a journal file).

    Raises:
        UsageError: On an empty value, a scheme SQLAlchemy does not know, or a path without a
            scheme that does not end in ``.log``.
    """
    value = value.strip()
    if not value:
        raise UsageError("--storage must not be empty.")
    if value.startswith("journal://"):
        # journal:///abs/file.log (an empty host, as in sqlite:///) or journal://rel/file.log.
        path = value[len("journal://") :]
        if not path or path.endswith("/"):
            raise UsageError(f"--storage {value!r}: a journal URL needs a file name.")
        return StorageSpec("journal", path)
    if "://" not in value:
        if value.endswith(".log"):
            return StorageSpec("journal", value)
        raise UsageError(
            f"--storage {value!r} has no scheme; use sqlite:///FILE.db, journal:///FILE.log (or a "
            "path ending in .log), or an SQLAlchemy URL such as postgresql://user@host/db."
        )
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    from sqlalchemy.exc import NoSuchModuleError

    try:
        # get_dialect() loads the dialect class only, not its database driver: the scheme is
        # checked here, a missing driver is reported when the storage is opened.
        make_url(value).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        scheme = value.split("://", 1)[0]
        raise UsageError(
            f"--storage {value!r}: unknown storage scheme {scheme!r}; use sqlite:///FILE.db, "
            "journal:///FILE.log (or a path ending in .log), or an SQLAlchemy URL such as "
            "postgresql://user@host/db."
        ) from None
    return StorageSpec("rdb", value)


def open_storage(spec: StorageSpec, *, heartbeat: bool) -> BaseStorage:
    """Open the storage ``spec`` describes.

    Args:
        spec: The parsed ``--storage``.
        heartbeat: Run Optuna's heartbeat and retry trials it fails (RDB storages only); the
            ``search`` command wants it, read-only commands such as ``export`` do not.
    """
    if spec.kind == "journal":
        from optuna.storages.journal import JournalFileBackend
        from optuna.storages.journal import JournalStorage

        Path(spec.location).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(spec.location))
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.exc import ProgrammingError

    sqlite = spec.location.startswith("sqlite")

    def open_rdb() -> RDBStorage:
        kwargs: dict[str, Any] = {"engine_kwargs": _SQLITE_ENGINE_KWARGS if sqlite else None}
        with warnings.catch_warnings():
            # The heartbeat has been "experimental" since Optuna 2.8; it is what Optuna documents
            # for fault-tolerant distributed optimisation, so the warning is only noise here.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if heartbeat:
                kwargs.update(
                    heartbeat_interval=HEARTBEAT_INTERVAL,
                    grace_period=GRACE_PERIOD,
                    # One retry: a trial killed with its worker is re-run with the same
                    # parameters, but a configuration that kills workers by itself (out of
                    # memory) is not retried forever.
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                )
            storage = RDBStorage(spec.location, **kwargs)
        if sqlite:
            _begin_immediately(storage.engine)
        return storage

    for attempt in range(_SCHEMA_ATTEMPTS - 1):
        try:
            return open_rdb()
        except (IntegrityError, OperationalError, ProgrammingError):
            # Workers started together on a new database race to create Optuna's schema (the
            # loser fails on the alembic_version row, or on an existing table: PostgreSQL's
            # DuplicateTable is a ProgrammingError); once the winner has committed, opening again
            # finds the schema in place.
            time.sleep(0.2 * (attempt + 1))
    return open_rdb()


#: SQLite engine options: wait up to 120 s for a lock (the default gives up after 5 s, and
#: workers sharing one file, with their heartbeat threads, must wait for each other's writes
#: instead of failing), and no transactions begun by the driver (see :func:`_begin_immediately`).
_SQLITE_ENGINE_KWARGS = {"connect_args": {"timeout": 120, "isolation_level": None}}


def _begin_immediately(engine: Any) -> None:
    """Make every transaction on an SQLite ``engine`` take the write lock when it begins.

    Python's sqlite3 driver opens a transaction only at the first write, so the read that
    precedes it runs outside any transaction. Optuna's ``ask`` pops an enqueued trial by reading
    that it is WAITING and then marking it RUNNING (``SELECT ... FOR UPDATE``, which SQLite
    ignores): two workers could both read WAITING, both run the trial, and the second to finish
    failed with "Cannot tell a COMPLETE trial". ``BEGIN IMMEDIATE`` makes the read and the write
    one atomic step; waiting for the lock is bounded by the 120 s timeout. This is SQLAlchemy's
    documented recipe for transactional SQLite (pysqlite "serializable isolation").
    """
    from sqlalchemy import event

    def begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine, "begin", begin)


def worker_id() -> str:
    """``host:pid:start-time`` of this process; the start time keeps the tag unique if the pid
    is reused."""
    return f"{socket.gethostname()}:{os.getpid()}:{_PROCESS_START}"


def owner_is_dead(owner: str) -> bool:
    """Whether the process a :func:`worker_id` names is known to be gone (same host only)."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine: only a heartbeat can tell
    if owner == worker_id():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    # Alive. A new process reusing the pid is indistinguishable without platform-specific
    # start-time checks; assuming it is the owner only delays the clean-up to the heartbeat.
    return False


def fail_abandoned_trials(study: optuna.Study, *, only_own: bool = False) -> list[int]:
    """Fail the RUNNING trials whose worker process is gone, and return their numbers.

    A trial counts as abandoned if its worker ran on this host and has exited, or if it carries
    no worker tag and started more than :data:`UNTAGGED_GRACE` seconds ago (its worker died
    between creating and tagging it).

    Args:
        study: The study to clean up.
        only_own: Fail only the trials this process tagged (the clean-up on exit), instead of
            the abandoned ones (the clean-up on start-up).

    Trials of other hosts are left to the heartbeat (RDB storages). The storage's failed-trial
    callback (the retry of RDB storages) runs for each trial failed here, exactly as if the
    heartbeat had failed it.
    """
    storage = compat.storage_of(study)
    me = worker_id()
    now = datetime.datetime.now()
    failed: list[int] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.system_attrs.get(_attrs.WORKER)
        if only_own:
            if owner != me:
                continue
        elif isinstance(owner, str):
            if not owner_is_dead(owner):
                continue
        elif trial.datetime_start is None or (
            (now - trial.datetime_start).total_seconds() < UNTAGGED_GRACE
        ):
            # Untagged: a live worker tags its trial within milliseconds of creating it, so
            # only an old untagged trial is known to be abandoned (its worker died in between).
            continue
        try:
            if not storage.set_trial_state_values(compat.trial_id(trial), state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker finished or failed it first
        failed.append(trial.number)
        get_callback = getattr(storage, "get_heartbeat_stale_trial_callback", None)
        callback = get_callback() if get_callback is not None else None
        if callback is not None and not only_own:
            callback(study, storage.get_trial(compat.trial_id(trial)))
    return failed
