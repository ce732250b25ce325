"""A worker process for the load and fault tests (and ``benchmarks/distributed.py``).

    python tests/_load_worker.py KIND WHERE STUDY --n-trials N --seed S [options]

KIND is ``journal`` (WHERE: a log file), ``sqlite`` (WHERE: a database file) or ``postgres``
(WHERE: an SQLAlchemy URL). The worker loads STUDY, optimizes a cheap but not instant discrete
objective and writes a JSON report (``--report``): the trial numbers it started, how long it
spent in the sampler and in total. Options select the sampler, constant liar, Optuna's heartbeat
with retries of failed trials, a per-trial timeout, and faults (see ``--help``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
from typing import Any

import optuna
from optuna.samplers import BaseSampler
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState


# The load objective's search space: 8 categorical parameters with 5 choices each, 390625
# configurations. TPE concentrates on a few hundred good ones, so workers that ignore each
# other propose the same configuration at the same time; 500 trials need not repeat one.
N_PARAMS = 8
CHOICES = (0, 1, 2, 3, 4)
SPACE_SIZE = len(CHOICES) ** N_PARAMS


def make_storage(
    kind: str,
    where: str,
    *,
    heartbeat: tuple[int, int] | None = None,
    max_retry: int | None = None,
) -> optuna.storages.BaseStorage:
    """A storage of KIND at WHERE; ``heartbeat=(interval, grace)`` enables Optuna's heartbeat.

    With a heartbeat, trials whose worker stopped beating are failed when any worker starts a
    trial, and ``RetryHeartbeatStaleTrialCallback(max_retry)`` re-enqueues them.
    """
    if kind == "journal":
        if heartbeat is not None:
            raise ValueError("JournalStorage has no heartbeat in Optuna 5 (not a BaseHeartbeat).")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(where))
    hb: dict[str, Any] = {}
    if heartbeat is not None:
        hb = {
            "heartbeat_interval": heartbeat[0],
            "grace_period": heartbeat[1],
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(
                max_retry=max_retry
            ),
        }
    if kind == "sqlite":
        # Several processes write to one file: wait for the lock instead of failing at once.
        return optuna.storages.RDBStorage(
            f"sqlite:///{where}", engine_kwargs={"connect_args": {"timeout": 120}}, **hb
        )
    if kind == "postgres":
        # pool_pre_ping replaces connections the server dropped (e.g. after a restart).
        return optuna.storages.RDBStorage(where, engine_kwargs={"pool_pre_ping": True}, **hb)
    raise ValueError(f"unknown storage kind {kind!r}")


def load_value(params: dict[str, Any]) -> float:
    """The load objective: a separable bowl around (0, ..., 0) plus a rugged term in [0, 4).

    The rugged term (a hash of the configuration) keeps many configurations near the optimum
    competitive, as real noisy objectives do, so the search does not collapse onto a handful.
    """
    key = json.dumps([params[f"p{i}"] for i in range(N_PARAMS)])
    rugged = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32
    return float(sum((i + 1) * params[f"p{i}"] for i in range(N_PARAMS)) + 4.0 * rugged)


def concurrent_duplicates(
    trials: list[optuna.trial.FrozenTrial],
    sampling: dict[int, tuple[float, float]] | None = None,
) -> tuple[int, int]:
    """Trials that got the parameters of another trial RUNNING when they started.

    A trial b counts when some other trial a has b's parameters and
    ``a.datetime_start <= b.datetime_start <= a.datetime_complete``: b was proposed while a was
    being evaluated. Returns ``(all, visible)``: *visible* ones are those whose sampling began
    after a's sampling (and publication of its parameters) had ended and before a finished (a
    FAIL trial leaves the observations, so its configuration may be proposed again), according
    to SAMPLING (trial number -> wall-clock interval of ``sample_relative``, from the workers'
    reports);
    those are the ones constant liar can prevent, the rest are races between workers that
    sampled at the same moment.
    """
    sampling = sampling or {}
    by_params: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for t in trials:
        if t.datetime_start is not None and t.params:
            by_params.setdefault(json.dumps(t.params, sort_keys=True), []).append(t)
    count = visible = 0
    for group in by_params.values():
        for b in group:
            running = [
                a
                for a in group
                if a is not b
                and a.datetime_start <= b.datetime_start
                and (a.datetime_complete is None or b.datetime_start <= a.datetime_complete)
            ]
            if running:
                count += 1
                if b.number in sampling and any(
                    a.number in sampling
                    and sampling[a.number][1] < sampling[b.number][0]
                    and (
                        a.datetime_complete is None
                        or a.datetime_complete.timestamp() > sampling[b.number][0]
                    )
                    for a in running
                ):
                    visible += 1
    return count, visible


def sampling_intervals(reports: list[dict]) -> dict[int, tuple[float, float]]:
    out: dict[int, tuple[float, float]] = {}
    for r in reports:
        out.update({int(k): tuple(v) for k, v in r["relative"].items()})
    return out


def launch_workers(
    kind: str,
    where: str,
    study: str,
    *,
    n_workers: int,
    n_trials: int,
    report_dir: Path,
    extra: list[str] = (),  # type: ignore[assignment]
    seed0: int = 0,
) -> list[tuple[subprocess.Popen, Path]]:
    """Start N_WORKERS worker processes sharing N_TRIALS (as evenly as possible)."""
    procs = []
    for w in range(n_workers):
        share = n_trials // n_workers + (1 if w < n_trials % n_workers else 0)
        report = Path(report_dir) / f"worker-{w}.json"
        cmd = [sys.executable, __file__, kind, where, study, "--n-trials", str(share)]
        cmd += ["--seed", str(seed0 + w), "--report", str(report), *extra]
        procs.append((subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True), report))
    return procs


def wait_all(procs: list[tuple[subprocess.Popen, Path]], timeout: float) -> list[dict]:
    """Wait for the workers; raise with their stderr if one fails; return their reports."""
    deadline = time.monotonic() + timeout
    reports = []
    for proc, report in procs:
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        if proc.returncode != 0:
            raise RuntimeError(f"worker {proc.pid} exited with {proc.returncode}:\n{err}")
        reports.append(json.loads(report.read_text()))
    return reports


class _Timing(BaseSampler):
    """Wraps a sampler and adds up the wall time spent in it (the sampler overhead)."""

    def __init__(self, inner: BaseSampler) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.relative: dict[int, tuple[float, float]] = {}  # trial number -> sampling interval

    def _timed(self, name: str, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return getattr(self.inner, name)(*args)
        finally:
            self.seconds += time.perf_counter() - start

    def infer_relative_search_space(self, study, trial):  # type: ignore[no-untyped-def]
        return self._timed("infer_relative_search_space", study, trial)

    def sample_relative(self, study, trial, search_space):  # type: ignore[no-untyped-def]
        begin = time.time()
        try:
            return self._timed("sample_relative", study, trial, search_space)
        finally:
            self.relative[trial.number] = (begin, time.time())

    def sample_independent(self, study, trial, name, dist):  # type: ignore[no-untyped-def]
        return self._timed("sample_independent", study, trial, name, dist)

    def before_trial(self, study, trial):  # type: ignore[no-untyped-def]
        return self._timed("before_trial", study, trial)

    def after_trial(self, study, trial, state, values):  # type: ignore[no-untyped-def]
        return self._timed("after_trial", study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def make_sampler(name: str, seed: int, constant_liar: bool) -> BaseSampler:
    if name == "ctpe":
        from optuna_ctpe import ClusterTPESampler

        return ClusterTPESampler(seed=seed, constant_liar=constant_liar)
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, constant_liar=constant_liar, multivariate=True
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}")


def sqlalchemy_errors() -> type[BaseException]:
    try:
        from sqlalchemy.exc import OperationalError

        return OperationalError
    except ImportError:  # pragma: no cover - the RDB storages need sqlalchemy anyway
        return optuna.exceptions.StorageInternalError


def is_storage_error(error: BaseException | None) -> bool:
    """Whether ERROR is, or was raised while handling, a storage (database) error.

    Optuna 5.0's ``_run_trial`` turns a storage error in ``tell`` into an
    ``UnboundLocalError`` ('updated_state') when the server is still unreachable, with the
    storage error as its context, so the whole chain is inspected.
    """
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, (optuna.exceptions.StorageInternalError, sqlalchemy_errors())):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


class TrialTimeout(Exception):
    """Raised inside the objective when it exceeds ``--timeout``."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise TrialTimeout("the trial exceeded its time limit")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["journal", "sqlite", "postgres"])
    parser.add_argument("where")
    parser.add_argument("study")
    parser.add_argument("--n-trials", type=int, required=True, help="trials this worker runs")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--sampler", default="ctpe", choices=["ctpe", "tpe", "random"])
    parser.add_argument("--no-constant-liar", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.005, help="seconds per trial")
    parser.add_argument("--report", help="write a JSON report here")
    parser.add_argument("--heartbeat", type=int, nargs=2, metavar=("INTERVAL", "GRACE"))
    parser.add_argument("--max-retry", type=int, default=3)
    parser.add_argument(
        "--until-complete",
        type=int,
        help="stop when the study has this many COMPLETE trials (MaxTrialsCallback)",
    )
    parser.add_argument("--timeout", type=float, help="per-trial time limit in seconds")
    parser.add_argument(
        "--hang-on",
        type=int,
        default=-1,
        help="on this worker's n-th trial (0-based), write --marker and sleep an hour",
    )
    parser.add_argument("--marker", help="file the hanging trial writes (JSON: number, params)")
    parser.add_argument(
        "--retry-storage-errors",
        type=int,
        default=0,
        help="on a storage error (e.g. the server restarted), reconnect and go on, this often",
    )
    parser.add_argument("--mixed", action="store_true", help="some trials raise or are pruned")
    args = parser.parse_args(argv)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(
        args.kind,
        args.where,
        heartbeat=tuple(args.heartbeat) if args.heartbeat else None,
        max_retry=args.max_retry,
    )
    sampler = _Timing(make_sampler(args.sampler, args.seed, not args.no_constant_liar))
    study = optuna.load_study(study_name=args.study, storage=storage, sampler=sampler)
    started: list[int] = []
    if args.timeout:
        signal.signal(signal.SIGALRM, _on_alarm)

    def objective(trial: optuna.Trial) -> float:
        started.append(trial.number)
        params = {f"p{i}": trial.suggest_categorical(f"p{i}", CHOICES) for i in range(N_PARAMS)}
        if len(started) - 1 == args.hang_on:
            marker = Path(args.marker)
            marker.write_text(json.dumps({"trial": trial.number, "params": params}))
            time.sleep(3600)
        if args.timeout:
            signal.setitimer(signal.ITIMER_REAL, args.timeout)
        try:
            time.sleep(args.sleep)
            value = load_value(params)
        finally:
            if args.timeout:
                signal.setitimer(signal.ITIMER_REAL, 0)
        if args.mixed:
            # Deterministic in the parameters, so a repeated configuration behaves the same.
            key = sum(params.values())
            if key % 7 == 3:
                raise RuntimeError("objective failed (on purpose)")
            if key % 7 == 5:
                trial.report(value, step=0)
                raise optuna.TrialPruned()
        return value

    callbacks = []
    if args.until_complete is not None:
        callbacks.append(MaxTrialsCallback(args.until_complete, states=(TrialState.COMPLETE,)))
    start = time.perf_counter()
    retries = args.retry_storage_errors
    remaining = args.n_trials
    while True:
        before = len(started)
        try:
            study.optimize(
                objective,
                n_trials=remaining,
                catch=(RuntimeError, TrialTimeout),
                callbacks=callbacks,
                gc_after_trial=False,
            )
            break
        except Exception as e:
            if not is_storage_error(e):
                raise
            remaining -= len(started) - before
            if retries <= 0 or remaining <= 0:
                raise
            retries -= 1
            print(f"worker {os.getpid()}: storage error, retrying in 1 s: {e!r}", file=sys.stderr)
            time.sleep(1.0)
    wall = time.perf_counter() - start
    if args.report:
        Path(args.report).write_text(
            json.dumps(
                {
                    "started": started,
                    "sampler_seconds": sampler.seconds,
                    "relative": sampler.relative,
                    "wall_seconds": wall,
                    "pid": os.getpid(),
                }
            )
        )


if __name__ == "__main__":
    sys.exit(main())
