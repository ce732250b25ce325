"""The table of ``--objective`` values (optuna_ctpe.cli.objectives) and the rooms that read it:
the parser offers its names, the settings take their directions and metric names from it, and
the objective returns its metrics in its order. Torch-free."""

from __future__ import annotations

from typing import Any

import optuna
import pytest

from optuna_ctpe import _attrs
from optuna_ctpe import _optuna_compat as compat
from optuna_ctpe.cli.objective import Objective
from optuna_ctpe.cli.objectives import LATENCY_OBJECTIVES
from optuna_ctpe.cli.objectives import objective_kind
from optuna_ctpe.cli.objectives import OBJECTIVES
from optuna_ctpe.cli.root import build_parser
from optuna_ctpe.cli.settings import resolve
from optuna_ctpe.cli.settings import Settings
from optuna_ctpe.tasks import Task


def _requested(**given: object) -> dict[str, object]:
    return {f: given.get(f) for f in Settings.__dataclass_fields__}


def _settings(name: str) -> Settings:
    extra = {"latency_budget_ms": 1.0} if objective_kind(name).latency_budget else {}
    return resolve(_requested(objective=name, **extra), None, "new", lambda s: None)


def test_every_row_is_consistent() -> None:
    assert list(OBJECTIVES) == ["pareto", "budget", "latency-budget", "pareto-latency"]
    for name, kind in OBJECTIVES.items():
        assert kind.name == name
        assert len(kind.metrics) == len(kind.directions) >= 1
        assert kind.metrics[0] == _attrs.ACCURACY and kind.directions[0] == "maximize"
        # A budget bounds a single objective; a Pareto study has none to bound.
        single = len(kind.metrics) == 1
        assert single == (kind.size_budget != "none")
        assert not kind.latency_budget or (single and kind.latency)
        assert (_attrs.LATENCY_MS in kind.metrics) <= kind.latency
    assert LATENCY_OBJECTIVES == ("latency-budget", "pareto-latency")
    with pytest.raises(ValueError, match="objective must be one of .*got 'speed'"):
        objective_kind("speed")


def test_the_parser_offers_the_table() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    option = next(a for a in commands["search"]._actions if "--objective" in a.option_strings)
    assert tuple(option.choices) == tuple(OBJECTIVES)
    assert all(kind.help in option.help for kind in OBJECTIVES.values())


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_settings_read_the_table(name: str) -> None:
    settings = _settings(name)
    kind = OBJECTIVES[name]
    assert settings.kind is kind
    assert settings.directions == list(kind.directions)
    assert settings.metric_names == list(kind.metrics)
    assert settings.has_latency == kind.latency
    assert (settings.size_budget is not None) == (kind.size_budget == "default")


class _Space:
    """What Objective reads of a space, without torch: one searched layer."""

    fp32_bits = 32_000

    def suggest(self, trial: optuna.Trial) -> Any:
        return trial.suggest_categorical("bits:fc", [2, 4, 8])

    def size(self, config: int) -> int:
        return 1000 * config

    def applied(self, model: Any, config: int, inputs: Any, cache: Any) -> Any:
        raise AssertionError("not called: _score is replaced")


class _Meter:
    source, runtime_name = "table", "fake"

    def __call__(self, config: int) -> float:
        return 0.5 * config


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objective_returns_the_rows_metrics_in_order(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(name)
    task = Task("t", None, lambda m, b: 0.0, [], [], None, lambda m: 0.75)
    latency = _Meter() if settings.has_latency else None
    space: Any = _Space()
    objective = Objective(space, task, settings, "ctpe", latency=latency)
    monkeypatch.setattr(objective, "_score", lambda config, trial: 0.75)
    study = optuna.create_study(directions=settings.directions)
    study.enqueue_trial({"bits:fc": 4})
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    metrics = {_attrs.ACCURACY: 0.75, _attrs.SIZE_KB: 4000 / 8 / 1024, _attrs.LATENCY_MS: 2.0}
    assert trial.values == [metrics[m] for m in settings.metric_names]
    if len(settings.directions) == 1:
        expected = {}
        if settings.size_budget is not None:  # 4000 bits against the budget's share of 32000
            expected["size"] = 4000 / (settings.size_budget * 32_000) - 1
        if OBJECTIVES[name].latency_budget:  # 2 ms against 1 ms
            expected["latency"] = 1.0
        assert compat.trial_constraints(trial) == pytest.approx(expected)
        assert trial.user_attrs[_attrs.FEASIBLE] == all(v <= 0 for v in expected.values())
