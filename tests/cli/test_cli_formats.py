"""``optuna-ctpe search`` over weight formats, and the uniform baseline it enqueues."""

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

from optuna_ctpe.search_space import HessianSearchSpace  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.slow]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A weight cache shared by the module's processes: the CNN is trained once, here."""
    from optuna_ctpe.tasks.digits import digits_task

    folder = tmp_path_factory.mktemp("cache")
    digits_task(seed=0, cache_dir=folder)
    return {**os.environ, "OPTUNA_CTPE_CACHE_DIR": str(folder), "OMP_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "optuna_ctpe.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("ratio", [10, 7])
def test_uniform_baseline_is_enqueued_and_kept(
    ratio: int, tmp_path: Path, env: dict[str, str]
) -> None:
    db = tmp_path / "u.db"
    args = [
        "search", "--storage", f"sqlite:///{db}", "--study-name", "u", "--objective", "budget",
        "--size-budget", str(ratio), "--n-trials", "3", "--sampler", "tpe", "--widths", "1.0",
        "--no-progress",
    ]  # fmt: skip
    result = _run(args, tmp_path, env)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="u", storage=f"sqlite:///{db}")
    space = HessianSearchSpace.load_from_study(study)
    budget_bits = study.user_attrs["ctpe:settings"]["size_budget"] * space.fp32_bits
    fits = space.uniform_formats(size_bits=int(budget_bits))
    assert fits, "the digits grid has a uniform bit-width within this budget"
    baseline = [t for t in study.trials if "ctpe:uniform_baseline" in t.user_attrs]
    assert len(baseline) == 1
    trial = baseline[0]
    choice = trial.user_attrs["ctpe:uniform_baseline"]
    assert trial.number == 0 and trial.state == TrialState.COMPLETE
    assert choice in fits
    # Every searched layer takes the choice, and the pruned space still holds it there.
    assert trial.params and set(trial.params.values()) == {choice}
    for name, distribution in space.distributions.items():
        assert name not in trial.params or choice in distribution.choices
    config = space.config_from_params(trial.params)
    assert space.size(config) <= budget_bits
    assert trial.user_attrs["size_bytes"] * 8 == pytest.approx(space.size(config), rel=1e-6)
    assert "(uniform " in result.stdout
