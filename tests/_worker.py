"""A worker process for the storage tests: ``python _worker.py KIND PATH STUDY N_TRIALS SEED``.

KIND is ``journal`` or ``sqlite``. It prints the parameters it proposed as JSON when asked to
(``--print``), so tests can compare processes.
"""

from __future__ import annotations

import json
import sys

import optuna

from optuna_ctpe import ClusterTPESampler


def storage_for(kind: str, path: str) -> optuna.storages.BaseStorage:
    if kind == "journal":
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    if kind == "sqlite":
        # Several processes write to one file: wait for the lock instead of failing at once.
        return optuna.storages.RDBStorage(
            f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 120}}
        )
    if kind == "memory":
        return optuna.storages.InMemoryStorage()
    raise ValueError(f"unknown storage kind {kind!r}")


def objective(trial: optuna.Trial) -> float:
    bits = [trial.suggest_categorical(f"bits_{i}", [2, 3, 4, 6, 8]) for i in range(6)]
    x = trial.suggest_float("x", -2.0, 2.0)
    return sum(4.0 ** (-b) * (i + 1) for i, b in enumerate(bits)) + 0.01 * sum(bits) + x * x


def main() -> None:
    kind, path, study_name, n_trials, seed = sys.argv[1:6]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = (
        optuna.load_study(
            study_name=study_name,
            storage=storage_for(kind, path),
            sampler=ClusterTPESampler(seed=int(seed), n_startup_trials=5),
        )
        if kind != "memory"
        else optuna.create_study(sampler=ClusterTPESampler(seed=int(seed), n_startup_trials=5))
    )
    study.optimize(objective, n_trials=int(n_trials))
    if "--print" in sys.argv:
        print(json.dumps([t.params for t in study.trials], sort_keys=True))


if __name__ == "__main__":
    main()
