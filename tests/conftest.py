"""Shared storage fixtures: journal file, SQLite and (when configured) PostgreSQL.

PostgreSQL tests read the server's SQLAlchemy URL from ``OPTUNA_CTPE_POSTGRES_URL`` and are
skipped when it is unset; ``.ci/postgres.sh start`` starts a local server and prints the URL.
"""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path
import sys
import uuid

import optuna
import pytest


# tests/ (the _worker helpers) and its wing folders are importable, so a module can share a
# sibling wing's fixtures (test_hostile_inputs uses test_search_space's spaces, test_deploy_packed
# test_transformers' tiny models) when it is run alone too.
_TESTS = Path(__file__).parent
_WINGS = sorted(p for p in _TESTS.iterdir() if p.is_dir() and p.name[0] not in "._")
for _folder in (_TESTS, *_WINGS):
    sys.path.insert(0, str(_folder))

POSTGRES_ENV = "OPTUNA_CTPE_POSTGRES_URL"
STORAGE_KINDS = ("journal", "sqlite", "postgres")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread for a module's tests, the caller's count restored after.

    Small models run fastest on one thread, and the CI machine has two cores. Modules ask for
    it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``; torch is imported
    here, not at the top, so that the sampler's tests run without it.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def postgres_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


def skip_without_postgres() -> str:
    """The PostgreSQL URL, or skip the test with the reason."""
    url = postgres_url()
    if url is None:
        pytest.skip(
            f"PostgreSQL tests need a server: set {POSTGRES_ENV} to its SQLAlchemy URL "
            '(`eval "$(.ci/postgres.sh start)"` starts one on 127.0.0.1:55432).'
        )
    pytest.importorskip("psycopg2", reason="PostgreSQL tests need psycopg2 (psycopg2-binary)")
    return url


class StorageTarget:
    """Where one test's study lives: the KIND and WHERE arguments of ``_load_worker.py``."""

    def __init__(self, kind: str, where: str, study_name: str) -> None:
        self.kind = kind
        self.where = where
        self.study_name = study_name

    def storage(self, **kwargs) -> optuna.storages.BaseStorage:  # type: ignore[no-untyped-def]
        from _load_worker import make_storage

        return make_storage(self.kind, self.where, **kwargs)

    def __repr__(self) -> str:
        return f"StorageTarget({self.kind!r}, {self.where!r}, {self.study_name!r})"


def make_target(kind: str, tmp_path: Path) -> StorageTarget:
    name = f"test-{uuid.uuid4().hex[:12]}"
    if kind == "journal":
        return StorageTarget(kind, str(tmp_path / "study.log"), name)
    if kind == "sqlite":
        return StorageTarget(kind, str(tmp_path / "study.db"), name)
    if kind == "postgres":
        return StorageTarget(kind, skip_without_postgres(), name)
    raise ValueError(f"unknown storage kind {kind!r}")


def _drop(target: StorageTarget) -> None:
    if target.kind != "postgres":
        return  # the files go with tmp_path
    try:
        optuna.delete_study(study_name=target.study_name, storage=target.where)
    except Exception:  # noqa: BLE001 - cleanup of a shared server must never fail a test
        pass


@pytest.fixture(params=STORAGE_KINDS)
def storage_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageTarget]:
    """A fresh study location on each storage kind (PostgreSQL skipped when not configured)."""
    target = make_target(request.param, tmp_path)
    yield target
    _drop(target)


@pytest.fixture(params=("sqlite", "postgres"))
def rdb_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageTarget]:
    """A fresh study location on the RDB storages, which support Optuna's heartbeat."""
    target = make_target(request.param, tmp_path)
    yield target
    _drop(target)


@pytest.fixture
def postgres_target(tmp_path: Path) -> Iterator[StorageTarget]:
    target = make_target("postgres", tmp_path)
    yield target
    _drop(target)
