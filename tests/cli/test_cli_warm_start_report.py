"""``optuna-ctpe search``'s report: each ILP warm start's predicted loss increase beside its
measured accuracy, from the Ω stored with the enqueued trial."""

from __future__ import annotations

import contextlib
import io
import re

import pytest


torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

import optuna  # noqa: E402

from optuna_ctpe import _attrs  # noqa: E402
from optuna_ctpe.cli import main  # noqa: E402
from optuna_ctpe.cli.report import search_report  # noqa: E402
from optuna_ctpe.search_space import HessianSearchSpace  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[optuna.Study, str]:
    """A short search with a size budget (two warm starts), and the report it printed."""
    folder = tmp_path_factory.mktemp("search")
    db = folder / "s.db"
    argv = ["search", "--storage", f"sqlite:///{db}", "--study-name", "s", "--n-trials", "3"]
    argv += ["--cache-dir", str(folder / "cache"), "--widths", "0.5,1.0", "--no-progress"]
    argv += ["--objective", "budget", "--size-budget", "0.15"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return optuna.load_study(study_name="s", storage=f"sqlite:///{db}"), printed.getvalue()


def _warm(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.user_attrs.get(_attrs.WARM_START)]


def test_warm_starts_carry_their_predicted_omega(searched: tuple[optuna.Study, str]) -> None:
    study, _ = searched
    space = HessianSearchSpace.load_from_study(study)
    warm = _warm(study)
    assert warm, "a size budget enqueues ILP warm starts"
    for trial in warm:
        # The stored Ω is the space's own summed Ω of the enqueued configuration.
        expected = space.perturbation(space.config_from_params(trial.params))
        assert trial.user_attrs[_attrs.PREDICTED_OMEGA] == pytest.approx(expected)
        assert expected > 0


def test_report_sets_prediction_beside_measurement(searched: tuple[optuna.Study, str]) -> None:
    study, report = searched
    assert "ILP warm starts, predicted against measured:" in report
    section = report.split("ILP warm starts, predicted against measured:")[1]
    fp32 = study.user_attrs[_attrs.BASELINES]["fp32"][_attrs.ACCURACY]
    warm = _warm(study)
    omegas = [t.user_attrs[_attrs.PREDICTED_OMEGA] for t in warm]
    accuracies = [t.user_attrs[_attrs.ACCURACY] for t in warm]
    for trial in warm:
        row = re.search(rf"^trial {trial.number}\s+(.*)$", section, re.MULTILINE)
        assert row is not None, section
        predicted, p_rank, accuracy, drop, m_rank = row.group(1).split()
        omega = trial.user_attrs[_attrs.PREDICTED_OMEGA]
        assert float(predicted) == pytest.approx(omega / 2, rel=1e-3, abs=1e-3)
        # Competition ranks over the warm starts: ties share the better rank.
        assert int(p_rank) == 1 + sum(o < omega for o in omegas)
        assert float(accuracy) == pytest.approx(trial.user_attrs[_attrs.ACCURACY], abs=1e-4)
        assert float(drop) == pytest.approx(fp32 - trial.user_attrs[_attrs.ACCURACY], abs=1e-4)
        assert int(m_rank) == 1 + sum(a > trial.user_attrs[_attrs.ACCURACY] for a in accuracies)


def test_old_warm_starts_without_omega_show_a_dash(searched: tuple[optuna.Study, str]) -> None:
    study, _ = searched
    # A study written before Ω was stored: the same warm starts, without the attribute.
    old = optuna.create_study(directions=study.directions, study_name="old")
    for trial in study.trials:
        attrs = {k: v for k, v in trial.user_attrs.items() if k != _attrs.PREDICTED_OMEGA}
        old.add_trial(
            optuna.trial.create_trial(
                params=trial.params,
                distributions=trial.distributions,
                values=trial.values,
                user_attrs=attrs,
            )
        )
    space = HessianSearchSpace.load_from_study(study)
    report = search_report(old, space, study.user_attrs[_attrs.BASELINES], "sqlite:///x")
    section = report.split("ILP warm starts, predicted against measured:")[1]
    for trial in _warm(old):
        row = re.search(rf"^trial {trial.number}\s+(.*)$", section, re.MULTILINE)
        assert row is not None
        assert row.group(1).split()[:2] == ["-", "-"]


def test_no_section_without_warm_starts(searched: tuple[optuna.Study, str]) -> None:
    study, _ = searched
    bare = optuna.create_study(directions=study.directions, study_name="bare")
    space = HessianSearchSpace.load_from_study(study)
    report = search_report(bare, space, study.user_attrs[_attrs.BASELINES], "sqlite:///x")
    assert "ILP warm starts" not in report
