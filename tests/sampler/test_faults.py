"""Faults: killed workers, a restarted database server, and objectives that misbehave.

Optuna's heartbeat (``RDBStorage(heartbeat_interval=..., grace_period=...,
heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(...))``) fails a trial whose worker
died and re-enqueues its parameters; ClusterTPESampler must then drop the dead trial from g(x)
(with constant liar a RUNNING trial sits in g(x) until then).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
import random
import re
import signal
import subprocess
import sys
import time

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
import pytest

from _load_worker import launch_workers  # noqa: E402  (tests/ is on sys.path via conftest)
from conftest import POSTGRES_ENV
from optuna_ctpe import ClusterTPESampler


WORKER = str(Path(__file__).resolve().parents[1] / "_load_worker.py")
REPO = Path(__file__).resolve().parents[2]
INTERVAL, GRACE = 1, 4


def states_of(study: optuna.Study) -> dict[TrialState, int]:
    trials = study.get_trials(deepcopy=False)
    return {s: sum(t.state == s for t in trials) for s in TrialState}


def run_heartbeat_worker(target, n_trials: int, seed: int, *extra: str) -> None:  # type: ignore[no-untyped-def]
    """Run one more worker (heartbeat on) on ``target``'s study to its end; it must succeed."""
    worker = subprocess.run(
        [
            sys.executable, WORKER, target.kind, target.where, target.study_name,
            "--n-trials", str(n_trials), "--seed", str(seed),
            "--heartbeat", str(INTERVAL), str(GRACE), *extra,
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr


def test_journal_storage_has_no_heartbeat_in_optuna_5() -> None:
    # Stale RUNNING trials of a killed worker are therefore failed only on RDB storages;
    # the worker helper refuses the combination instead of silently ignoring it.
    from optuna.storages._heartbeat import BaseHeartbeat

    from _load_worker import make_storage

    assert not issubclass(optuna.storages.JournalStorage, BaseHeartbeat)
    assert issubclass(optuna.storages.RDBStorage, BaseHeartbeat)
    with pytest.raises(ValueError, match="no heartbeat"):
        make_storage("journal", "unused.log", heartbeat=(1, 2))


class _Recorder(ClusterTPESampler):
    """Records which trials each sampling call put into g(x) (the bad group)."""

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.bad_groups: list[set[int]] = []

    def _group_trials(self, study, trials):  # type: ignore[no-untyped-def]
        grouped = super()._group_trials(study, trials)
        self.bad_groups.append({t.number for t in grouped.bad})
        return grouped


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkilled_worker_trial_is_failed_retried_and_leaves_g(rdb_target, tmp_path) -> None:  # type: ignore[no-untyped-def]
    n_complete = 20
    heartbeat = (INTERVAL, GRACE)
    optuna.create_study(study_name=rdb_target.study_name, storage=rdb_target.storage())
    marker = tmp_path / "hang.json"
    victim = subprocess.Popen(
        [
            sys.executable, WORKER, rdb_target.kind, rdb_target.where, rdb_target.study_name,
            "--n-trials", "100", "--seed", "0", "--heartbeat", str(INTERVAL), str(GRACE),
            "--hang-on", "6", "--marker", str(marker), "--until-complete", str(n_complete),
        ]
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert victim.poll() is None, "the worker died before hanging"
        assert time.monotonic() < deadline, "the worker never reached its hanging trial"
        time.sleep(0.05)
    time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    killed = json.loads(marker.read_text())["trial"]

    storage = rdb_target.storage(heartbeat=heartbeat, max_retry=2)
    sampler = _Recorder(seed=1, n_startup_trials=2)
    study = optuna.load_study(study_name=rdb_target.study_name, storage=storage, sampler=sampler)
    from _load_worker import load_value

    def objective(trial: optuna.Trial) -> float:
        params = {f"p{i}": trial.suggest_categorical(f"p{i}", (0, 1, 2, 3, 4)) for i in range(8)}
        return load_value(params)

    # Within the grace period the dead trial is still RUNNING: constant liar keeps it in g(x).
    study.optimize(objective, n_trials=1)
    assert study.trials[killed].state == TrialState.RUNNING
    assert killed in sampler.bad_groups[-1]

    # After the grace period the next trial's start fails it (and enqueues a retry) ...
    time.sleep(GRACE + 1.5)
    sampler.bad_groups.clear()
    study.optimize(objective, n_trials=3)
    trials = study.trials
    assert trials[killed].state == TrialState.FAIL
    # ... and it leaves g(x) for good.
    assert sampler.bad_groups and all(killed not in bad for bad in sampler.bad_groups)
    retries = [
        t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed
    ]
    assert len(retries) == 1
    assert retries[0].params == trials[killed].params

    # Another worker finishes the study: the requested number of COMPLETE trials, none lost.
    run_heartbeat_worker(rdb_target, 100, 2, "--until-complete", str(n_complete))
    final = optuna.load_study(study_name=rdb_target.study_name, storage=storage)
    states = states_of(final)
    assert states[TrialState.COMPLETE] == n_complete, states
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
    assert final.trials[retries[0].number].state == TrialState.COMPLETE
    assert sorted(t.number for t in final.trials) == list(range(len(final.trials)))


def _restart_command() -> list[str]:
    """How to restart the PostgreSQL server of ``OPTUNA_CTPE_POSTGRES_URL``, or skip."""
    custom = os.environ.get("OPTUNA_CTPE_POSTGRES_RESTART")
    if custom:
        return ["bash", "-c", custom]
    base = Path(os.environ.get("OPTUNA_CTPE_PG_DIR", "/tmp/optuna-ctpe-pg"))
    url_file = base / "url"
    if not url_file.exists() or url_file.read_text().strip() != os.environ.get(POSTGRES_ENV):
        pytest.skip(
            f"the server of {POSTGRES_ENV} was not started by .ci/postgres.sh, so this test "
            "cannot restart it (set OPTUNA_CTPE_POSTGRES_RESTART to a command that does)."
        )
    return ["bash", str(REPO / ".ci" / "postgres.sh"), "restart"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_postgres_restart_during_a_study_loses_nothing(postgres_target, tmp_path) -> None:  # type: ignore[no-untyped-def]
    restart = _restart_command()
    n_complete = 80
    optuna.create_study(study_name=postgres_target.study_name, storage=postgres_target.storage())
    procs = launch_workers(
        "postgres", postgres_target.where, postgres_target.study_name,
        n_workers=3, n_trials=300, report_dir=tmp_path,
        extra=["--sleep", "0.05", "--heartbeat", str(INTERVAL), str(GRACE),
               "--until-complete", str(n_complete), "--retry-storage-errors", "20"],
    )  # fmt: skip
    storage = postgres_target.storage()
    deadline = time.monotonic() + 90
    while True:
        study = optuna.load_study(study_name=postgres_target.study_name, storage=storage)
        if states_of(study)[TrialState.COMPLETE] >= 15:
            break
        assert time.monotonic() < deadline, "the workers made no progress"
        time.sleep(0.2)
    before = {t.number: t.value for t in study.get_trials(states=(TrialState.COMPLETE,))}
    subprocess.run(restart, check=True, capture_output=True, timeout=120)
    del storage, study  # its pooled connections died with the server

    errors: list[str] = []
    retried = 0
    # Trials whose objective met the outage itself (a suggest call failed) and whose worker
    # could record the failure once the server was back: FAIL by their own worker, not stale.
    failed_by_worker: set[int] = set()
    for proc, _ in procs:
        _, err = proc.communicate(timeout=180)
        failed_by_worker.update(
            int(number)
            for number in re.findall(
                r"Trial (\d+) failed with parameters: .* because of the following error: "
                r"\w*(?:OperationalError|StorageInternalError)",
                err,
            )
        )
        if proc.returncode != 0:
            errors.append(err)
            print("[restart] a worker gave up:", err.strip().splitlines()[-1])
        retried += err.count("storage error, retrying")
        if proc.returncode != 0:
            # No retry left: the worker must say what went wrong, not die silently.
            assert "StorageInternalError" in err or "OperationalError" in err, err
    print(
        f"\n[restart] {len(before)} COMPLETE before the restart; storage errors retried by "
        f"the workers: {retried}; workers that gave up: {len(errors)} of {len(procs)}"
    )

    storage = postgres_target.storage(heartbeat=(INTERVAL, GRACE), max_retry=3)
    after = optuna.load_study(study_name=postgres_target.study_name, storage=storage)
    complete_after = {t.number: t.value for t in after.get_trials(states=(TrialState.COMPLETE,))}
    # Nothing stored before the restart is lost or changed.
    assert {n: complete_after.get(n) for n in before} == before
    # Trials interrupted by the restart are RUNNING at worst; the heartbeat fails and retries
    # them, and a worker brings the study to the requested count.
    time.sleep(GRACE + 1)
    run_heartbeat_worker(postgres_target, 300, 9, "--until-complete", str(n_complete))
    final = optuna.load_study(study_name=postgres_target.study_name, storage=storage)
    states = states_of(final)
    assert states[TrialState.COMPLETE] >= n_complete, states
    # A trial created just before the outage, whose worker lost the connection before its
    # first heartbeat and before sampling, has no heartbeat row: Optuna never fails it. It has
    # no parameters either, so it never enters l(x) or g(x) (ClusterTPESampler skips trials
    # that do not set the searched parameters). Anything else must be finished.
    zombies = [t for t in final.trials if t.state == TrialState.RUNNING]
    print(f"[restart] left RUNNING without a heartbeat: {[t.number for t in zombies]}")
    assert all(not t.params for t in zombies), zombies
    # Every trial the heartbeat failed was re-enqueued once, with the parameters it had set
    # (a trial can die between two suggest calls; its retry samples the rest). The finisher
    # stops as soon as the study holds enough COMPLETE trials (MaxTrialsCallback), so a retry
    # enqueued by its own start may still be WAITING: queued for the next worker, not lost.
    failed = {
        t.number: t
        for t in final.trials
        if t.state == TrialState.FAIL and t.number not in failed_by_worker
    }
    retries = {
        RetryHeartbeatStaleTrialCallback.retry_history(t)[-1]: t
        for t in final.trials
        if RetryHeartbeatStaleTrialCallback.retry_history(t)
    }
    assert set(retries) == set(failed), (retries, failed, failed_by_worker)
    for number, retry in retries.items():
        assert failed[number].params.items() <= retry.params.items(), (retry, failed[number])
        assert retry.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.FAIL), retry
    # The next worker runs the queued retries first.
    waiting = [t.number for t in final.trials if t.state == TrialState.WAITING]
    if waiting:
        run_heartbeat_worker(postgres_target, len(waiting), 10)
        final = optuna.load_study(study_name=postgres_target.study_name, storage=storage)
        assert all(final.trials[n].state == TrialState.COMPLETE for n in waiting), waiting
    print(f"[restart] failed by the heartbeat and retried: {sorted(failed)}; queued: {waiting}")
    assert states_of(final)[TrialState.WAITING] == 0
    assert sorted(t.number for t in final.trials) == list(range(len(final.trials)))


class TrialTimeout(Exception):
    pass


def _alarm(signum, frame):  # type: ignore[no-untyped-def]
    raise TrialTimeout("the trial exceeded its 0.2 s limit")


@pytest.mark.timeout(120)
def test_objectives_that_raise_return_nan_inf_or_time_out(storage_target) -> None:  # type: ignore[no-untyped-def]
    """Each trial misbehaves at random; the study still reaches 25 COMPLETE trials."""
    n_complete = 25
    storage = storage_target.storage()
    study = optuna.create_study(
        study_name=storage_target.study_name,
        storage=storage,
        sampler=ClusterTPESampler(seed=0, n_startup_trials=5),
    )
    rng = random.Random(0)
    outcomes: dict[int, str] = {}

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -5.0, 5.0)
        bits = trial.suggest_categorical("bits", [2, 4, 8])
        kind = rng.choice(["ok", "ok", "raise", "nan", "inf", "-inf", "slow"])
        outcomes[trial.number] = kind
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.2)  # per-trial timeout -> TrialTimeout -> FAIL
        try:
            if kind == "slow":
                time.sleep(5.0)
            if kind == "raise":
                raise ValueError("objective blew up")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(kind, x * x + bits)

    study.optimize(
        objective,
        n_trials=500,
        catch=(ValueError, TrialTimeout),
        callbacks=[MaxTrialsCallback(n_complete, states=(TrialState.COMPLETE,))],
    )
    trials = study.trials
    states = states_of(study)
    assert states[TrialState.COMPLETE] == n_complete
    assert states[TrialState.RUNNING] == 0
    for t in trials:
        kind = outcomes[t.number]
        expected = TrialState.FAIL if kind in ("raise", "nan", "slow") else TrialState.COMPLETE
        assert t.state == expected, (t.number, kind, t.state)
        if kind in ("inf", "-inf"):
            assert t.value == (math.inf if kind == "inf" else -math.inf)
        assert -5.0 <= t.params["x"] <= 5.0 and t.params["bits"] in (2, 4, 8)
    assert {"raise", "nan", "slow", "inf", "-inf"} <= set(outcomes.values())
