"""``optuna-ctpe search`` with the latency objectives: a latency budget whose chosen
configuration meets it when timed again, the three-objective Pareto front, the latency table
stored with the study, and the usage errors of the latency options."""

from __future__ import annotations

import math
import os
from pathlib import Path
import subprocess
import sys

import pytest


torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
pytest.importorskip("onnxruntime", reason="latency objectives need the deploy extra")
pytest.importorskip("onnxscript", reason="latency objectives need the deploy extra")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from optuna_ctpe import _attrs  # noqa: E402
from optuna_ctpe import _optuna_compat as compat  # noqa: E402
from optuna_ctpe.cli.choose import recommended_trial  # noqa: E402
from optuna_ctpe.deploy.latency import ModelTimer  # noqa: E402
from optuna_ctpe.deploy.latency_table import LatencyTable  # noqa: E402
from optuna_ctpe.search_space import HessianSearchSpace  # noqa: E402
from optuna_ctpe.tasks.digits import digits_task  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.slow]

#: Small studies: the tests check the plumbing, not the search.
FEW = ["--n-trials", "3", "--no-progress", "--bits", "4,8", "--widths", "0.75,1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weight cache shared by the module's processes: the CNN is trained once, here."""
    folder = tmp_path_factory.mktemp("cache")
    digits_task(seed=0, cache_dir=folder)
    return folder


@pytest.fixture
def env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "OPTUNA_CTPE_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("optuna-ctpe")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "optuna_ctpe.cli"]
    return subprocess.run(
        command + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _load(db: Path) -> optuna.Study:
    return optuna.load_study(study_name="optuna-ctpe", storage=f"sqlite:///{db}")


def test_latency_budget_search_meets_the_budget_when_timed_again(
    tmp_path: Path, env: dict[str, str], cache_dir: Path
) -> None:
    # A budget far above any configuration of a 47k-parameter CNN (well under a millisecond):
    # the test checks the constraint's plumbing, never the speed of one configuration.
    budget = 1000.0
    db = tmp_path / "s.db"
    result = _run(
        ["search", "--storage", f"sqlite:///{db}", "--objective", "latency-budget"]
        + ["--latency-budget", str(budget), *FEW],
        tmp_path,
        env,
    )
    assert result.returncode == 0, result.stderr
    assert "Most accurate configuration within the latency budget" in result.stdout
    assert "speedup vs FP32" in result.stdout and "latency ms" in result.stdout
    assert "timed again as a whole exported model" in result.stderr
    study = _load(db)
    assert len(study.directions) == 1
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert trials
    table = LatencyTable.from_json(_attrs.read_chunked(study.user_attrs, _attrs.LATENCY_TABLE))
    space = HessianSearchSpace.load_from_study(study)
    for trial in trials:
        assert trial.user_attrs[_attrs.LATENCY_SOURCE] == "table"
        # The recorded latency is the stored table's prediction of the trial's configuration.
        config = space.config_from_params(trial.params)
        assert trial.user_attrs[_attrs.LATENCY_MS] == pytest.approx(table.predict(config))
        assert compat.trial_constraints(trial)["latency"] <= 0
        assert trial.user_attrs[_attrs.FEASIBLE] is True
    baselines = study.user_attrs[_attrs.BASELINES]
    assert baselines["fp32"][_attrs.LATENCY_MS] == pytest.approx(table.fp32_ms)
    assert baselines["uniform8"][_attrs.LATENCY_MS] > 0

    best = recommended_trial(study)
    assert best is not None
    task = digits_task(seed=0, cache_dir=cache_dir)
    timer = ModelTimer(space, task.model, task.example_inputs, repeats=50)
    again = timer(space.config_from_params(best.params)).median_ms
    assert 0 < again <= budget


def test_an_unreachable_latency_budget_leaves_every_trial_infeasible(
    tmp_path: Path, env: dict[str, str]
) -> None:
    db = tmp_path / "s.db"
    result = _run(
        ["search", "--storage", f"sqlite:///{db}", "--objective", "latency-budget"]
        + ["--latency-budget", "1e-9", "--latency-source", "measured", *FEW],
        tmp_path,
        env,
    )
    assert result.returncode == 0, result.stderr
    assert "No completed trial meets the latency budget yet" in result.stdout
    for trial in _load(db).get_trials(states=(TrialState.COMPLETE,)):
        assert trial.user_attrs[_attrs.LATENCY_SOURCE] == "measured"
        assert compat.trial_constraints(trial)["latency"] > 0
        assert trial.user_attrs[_attrs.FEASIBLE] is False


def test_pareto_latency_runs_three_objectives_and_reports(
    tmp_path: Path, env: dict[str, str]
) -> None:
    db = tmp_path / "p.db"
    result = _run(
        ["search", "--storage", f"sqlite:///{db}", "--objective", "pareto-latency"]
        + ["--latency-batch", "4", *FEW],
        tmp_path,
        env,
    )
    assert result.returncode == 0, result.stderr
    assert "fastest first" in result.stdout and "speedup vs 8-bit" in result.stdout
    study = _load(db)
    assert (
        study.directions
        == [optuna.study.StudyDirection.MAXIMIZE] + [optuna.study.StudyDirection.MINIMIZE] * 2
    )
    assert study.metric_names == ["accuracy", "latency_ms", "size_kb"]
    settings = study.user_attrs[_attrs.SETTINGS]
    assert (settings["latency_source"], settings["latency_batch"]) == ("table", 4)
    table = LatencyTable.from_json(_attrs.read_chunked(study.user_attrs, _attrs.LATENCY_TABLE))
    assert table.batch == 4
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        accuracy, latency, size_kb = trial.values
        assert latency == trial.user_attrs[_attrs.LATENCY_MS]
        assert math.isfinite(latency) and latency > 0
        assert size_kb == trial.user_attrs[_attrs.SIZE_KB]

    # Resuming adopts the stored latency settings; contradicting them is a usage error.
    n_complete = len(study.get_trials(states=(TrialState.COMPLETE,)))
    again = _run(
        ["search", "--storage", f"sqlite:///{db}", "--n-trials", "1", "--no-progress"],
        tmp_path,
        env,
    )
    assert again.returncode == 0, again.stderr
    assert len(_load(db).get_trials(states=(TrialState.COMPLETE,))) == n_complete + 1
    clash = _run(["search", "--storage", f"sqlite:///{db}", "--latency-batch", "2"], tmp_path, env)
    assert clash.returncode == 2
    assert "--latency-batch 2 conflicts with study 'optuna-ctpe'" in clash.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--objective latency-budget", "--objective latency-budget needs --latency-budget MS"),
        ("--latency-budget 5", "--latency-budget applies to --objective latency-budget or"),
        ("--objective latency-budget --latency-budget 0", "must be a positive number of milli"),
        ("--objective pareto-latency --latency-source guess", "invalid choice: 'guess'"),
        ("--objective pareto-latency --latency-batch 0", "must be a positive integer, got '0'"),
    ],
)
def test_latency_usage_errors(
    args: str, message: str, tmp_path: Path, env: dict[str, str]
) -> None:
    db = tmp_path / "e.db"
    result = _run(["search", "--storage", f"sqlite:///{db}", *args.split()], tmp_path, env)
    assert result.returncode == 2
    assert message in result.stderr
    assert not db.exists() or not optuna.get_all_study_summaries(f"sqlite:///{db}")
