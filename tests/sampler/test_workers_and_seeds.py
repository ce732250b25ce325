"""Parallel worker processes on shared storage, and seeded reproducibility across processes."""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

import optuna
from optuna.trial import TrialState
import pytest

from optuna_ctpe import ClusterTPESampler


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _worker import objective  # noqa: E402
from _worker import storage_for  # noqa: E402


WORKER = str(Path(__file__).resolve().parents[1] / "_worker.py")


def run_seeded(seed: int, n_trials: int = 30) -> list[dict]:
    study = optuna.create_study(sampler=ClusterTPESampler(seed=seed, n_startup_trials=5))
    study.optimize(objective, n_trials=n_trials)
    return [t.params for t in study.trials]


def test_same_seed_same_trials_in_process():
    assert run_seeded(3) == run_seeded(3)


def test_different_seed_different_trials():
    assert run_seeded(3) != run_seeded(4)


def test_same_seed_same_trials_in_a_spawned_process():
    out = subprocess.run(
        [sys.executable, WORKER, "memory", "-", "-", "30", "3", "--print"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert json.loads(out) == json.loads(json.dumps(run_seeded(3), sort_keys=True))


def test_reseed_rng_changes_sampling():
    sampler = ClusterTPESampler(seed=0, n_startup_trials=3)
    first = optuna.create_study(sampler=sampler)
    first.optimize(objective, n_trials=12)
    sampler = ClusterTPESampler(seed=0, n_startup_trials=3)
    sampler.reseed_rng()
    second = optuna.create_study(sampler=sampler)
    second.optimize(objective, n_trials=12)
    assert [t.params for t in first.trials] != [t.params for t in second.trials]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_four_processes_finish_200_trials_with_none_lost(tmp_path, kind):
    path = str(tmp_path / ("study.log" if kind == "journal" else "study.db"))
    optuna.create_study(study_name="shared", storage=storage_for(kind, path))
    workers = [
        subprocess.Popen([sys.executable, WORKER, kind, path, "shared", "50", str(seed)])
        for seed in range(4)
    ]
    assert [w.wait(timeout=600) for w in workers] == [0, 0, 0, 0]

    trials = optuna.load_study(study_name="shared", storage=storage_for(kind, path)).trials
    assert len(trials) == 200
    assert sorted(t.number for t in trials) == list(range(200))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # Constant liar and distinct seeds: workers should rarely propose identical configurations.
    distinct = {json.dumps(t.params, sort_keys=True) for t in trials}
    assert len(distinct) >= 190
