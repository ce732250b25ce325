"""Load: 8 worker processes share 500 trials of ClusterTPESampler on each storage.

Every trial is accounted for, trial numbers are contiguous, every value lies in its
distribution, and constant liar keeps workers from proposing the configuration of a trial that
is still RUNNING. The numbers are printed (``pytest -s``); ``benchmarks/distributed.py``
measures throughput.

The bound on duplicates. The objective's space has 5**8 = 390625 configurations, so two
independent uniform proposals collide with probability 2.6e-6 and 500 trials with 7 others
running give ~0.01 collisions: any duplicate comes from the model concentrating the workers
on the same good configurations. A duplicate is *visible* when the later trial started
sampling after the earlier one had published its parameters: constant liar puts that trial in
g(x) and ``avoid_duplicates`` excludes its configuration, so visible duplicates can only come
from the fallback for an exhausted neighbourhood (every candidate of 8 batches already seen,
when the fallback may pick a RUNNING trial's configuration) and from the start-up phase
(random proposals are not published): we require at most 5 (1% of the trials; measured 0-2).
The others are races (both workers sampled at the same time
from the same trials, which no lie can prevent); each trial overlaps at most 7 others, and we
require at most 5% of the trials (25) in all. Without constant liar the same runs show several
visible duplicates (reported, not asserted: their number varies from run to run).
"""

from __future__ import annotations

from pathlib import Path
import time

import optuna
from optuna.trial import TrialState
import pytest

from _load_worker import CHOICES  # noqa: E402  (tests/ is on sys.path via conftest)
from _load_worker import concurrent_duplicates
from _load_worker import launch_workers
from _load_worker import N_PARAMS
from _load_worker import sampling_intervals
from _load_worker import wait_all


N_WORKERS = 8
N_TRIALS = 500


def run_load(target, tmp_path: Path, constant_liar: bool) -> dict:  # type: ignore[no-untyped-def]
    optuna.create_study(study_name=target.study_name, storage=target.storage())
    extra = ["--mixed"] + ([] if constant_liar else ["--no-constant-liar"])
    start = time.perf_counter()
    procs = launch_workers(
        target.kind,
        target.where,
        target.study_name,
        n_workers=N_WORKERS,
        n_trials=N_TRIALS,
        report_dir=tmp_path,
        extra=extra,
    )
    reports = wait_all(procs, timeout=300)
    wall = time.perf_counter() - start
    trials = optuna.load_study(study_name=target.study_name, storage=target.storage()).trials
    dups, visible = concurrent_duplicates(trials, sampling_intervals(reports))
    return {"trials": trials, "reports": reports, "wall": wall, "dups": dups, "visible": visible}


def check_accounting(trials: list[optuna.trial.FrozenTrial], reports: list[dict]) -> None:
    states = {s: sum(t.state == s for t in trials) for s in TrialState}
    started = [n for r in reports for n in r["started"]]
    # Every trial a worker started is stored once, and finished.
    assert len(started) == len(set(started)) == N_TRIALS
    assert sorted(started) == sorted(t.number for t in trials) == list(range(N_TRIALS))
    assert (
        states[TrialState.COMPLETE] + states[TrialState.FAIL] + states[TrialState.PRUNED]
        == N_TRIALS
    ), states
    assert states[TrialState.RUNNING] == states[TrialState.WAITING] == 0
    assert states[TrialState.FAIL] > 0 and states[TrialState.PRUNED] > 0  # the mix happened
    for t in trials:
        assert set(t.params) == {f"p{i}" for i in range(N_PARAMS)}, t.number
        for name, value in t.params.items():
            assert value in CHOICES and t.distributions[name].choices == CHOICES
        if t.state == TrialState.COMPLETE:
            assert t.value is not None and 0 <= t.value


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    ("kind", "constant_liar"),
    [("journal", True), ("journal", False), ("sqlite", True), ("postgres", True)],
)
def test_8_workers_500_trials(kind, constant_liar, tmp_path, request) -> None:  # type: ignore[no-untyped-def]
    from conftest import _drop
    from conftest import make_target

    target = make_target(kind, tmp_path)
    request.addfinalizer(lambda: _drop(target))
    result = run_load(target, tmp_path, constant_liar)
    check_accounting(result["trials"], result["reports"])
    print(
        f"\n[load] {kind} constant_liar={constant_liar}: {N_TRIALS} trials by {N_WORKERS} "
        f"workers in {result['wall']:.1f} s; concurrent duplicates {result['dups']} "
        f"(visible {result['visible']})"
    )
    if constant_liar:
        assert result["visible"] <= 5, result
        assert result["dups"] <= 0.05 * N_TRIALS, result
