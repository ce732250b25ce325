"""``optuna-ctpe search --objective budget``: the size budget is a known constraint, so no trial
is spent on a configuration that cannot fit; an unreachable budget is an error at once."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import pytest


torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from optuna_ctpe import _attrs  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.slow]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A weight cache shared by the module's processes: the CNN is trained once, here."""
    from optuna_ctpe.tasks.digits import digits_task

    folder = tmp_path_factory.mktemp("cache")
    digits_task(seed=0, cache_dir=folder)
    return {**os.environ, "OPTUNA_CTPE_CACHE_DIR": str(folder), "OMP_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("optuna-ctpe")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "optuna_ctpe.cli"]
    return subprocess.run(
        command + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_budget_objective_spends_no_trial_over_the_budget(
    tmp_path: Path, env: dict[str, str]
) -> None:
    db = tmp_path / "k.db"
    args = [
        "search", "--storage", f"sqlite:///{db}", "--study-name", "k", "--objective", "budget",
        "--size-budget", "24", "--n-trials", "14", "--no-progress",
    ]  # fmt: skip
    result = _run(args, tmp_path, env)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{db}")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 14
    known = _attrs.known_constraint_key("size")
    for trial in complete:
        # The objective's own (black-box) record and the sampler's known value agree: within.
        assert trial.constraints["size"] <= 0
        assert trial.constraints[known] == pytest.approx(trial.constraints["size"])
        assert trial.user_attrs[_attrs.FEASIBLE] is True
    sampled = [t for t in complete if not t.user_attrs.get(_attrs.WARM_START)]
    assert sampled and all(isinstance(t.user_attrs[_attrs.REPAIRED], bool) for t in sampled)


def test_unreachable_budget_is_an_error_naming_the_smallest_size(
    tmp_path: Path, env: dict[str, str]
) -> None:
    args = [
        "search", "--storage", f"sqlite:///{tmp_path / 'u.db'}", "--objective", "budget",
        "--size-budget", "200", "--widths", "1.0", "--n-trials", "3", "--no-progress",
    ]  # fmt: skip
    result = _run(args, tmp_path, env)
    assert result.returncode == 2, result.stderr
    assert "--size-budget 200 cannot be met" in result.stderr
    assert "the smallest has" in result.stderr and "of fp32" in result.stderr


def test_unreachable_table_latency_budget_is_an_error(tmp_path: Path, env: dict[str, str]) -> None:
    """With a latency table the latency is known too: a budget no configuration meets is
    refused at set-up instead of running every trial infeasible."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    args = [
        "search", "--storage", f"sqlite:///{tmp_path / 'l.db'}", "--objective", "latency-budget",
        "--latency-budget", "1e-9", "--n-trials", "3", "--no-progress",
    ]  # fmt: skip
    result = _run(args, tmp_path, env)
    assert result.returncode == 2, result.stderr
    assert "the budgets of --objective latency-budget cannot be met" in result.stderr
    assert "latency" in result.stderr.split("cannot be met")[1]
