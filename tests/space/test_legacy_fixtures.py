"""Spaces and studies written by 0.1.x load unchanged and mean what they meant.

The fixtures under ``tests/fixtures/`` were written by the code of 0.1.x (before weight formats
reached the space; ``make_0_1_fixtures.py`` there shows how), with what that code computed
from them in ``space_0_1.expected.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
import pytest

from optuna_ctpe import HessianSearchSpace
from optuna_ctpe.space.records import QuantConfig


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CONFIGS = [
    QuantConfig({"conv1": 8, "conv2": 4, "conv3": 2, "fc": 8}, {"conv2": 0.75}),
    QuantConfig({"conv1": 8, "conv2": 6, "conv3": 3, "fc": 8}, {"conv2": 1.0}),
]


@pytest.fixture
def expected() -> dict:
    return json.loads((FIXTURES / "space_0_1.expected.json").read_text())


def _check_meaning(space: HessianSearchSpace, expected: dict) -> None:
    assert {k: list(v) for k, v in space.choices.items()} == expected["choices"]
    assert {k: list(d.choices) for k, d in space.distributions.items()} == (
        expected["distributions"]
    )
    # Bit-widths stay integers with their old parameter names: no format names leak in.
    assert all(
        isinstance(c, int)
        for name, d in space.distributions.items()
        if name.startswith("bits:")
        for c in d.choices
    )
    assert [space.size(c) for c in CONFIGS] == expected["sizes"]
    assert [space.perturbation(c) for c in CONFIGS] == pytest.approx(expected["perturbations"])
    assert [space.to_params(c) for c in CONFIGS] == expected["params"]
    weights = space.prior_weights()
    assert list(weights) == list(expected["prior_weights"])
    for name, values in expected["prior_weights"].items():
        assert weights[name] == pytest.approx(values)
    assert space.warm_starts(size_ratio=0.15, n=2) == expected["warm_starts"]
    assert space.fp32_bits == expected["fp32_bits"]


def test_space_json_of_0_1_loads_and_means_the_same(expected: dict) -> None:
    text = (FIXTURES / "space_0_1.json").read_text()
    space = HessianSearchSpace.from_json(text)
    _check_meaning(space, expected)
    # Written again, a bit-width space is the very text 0.1.x wrote.
    assert json.loads(space.to_json()) == json.loads(text)


def test_study_of_0_1_loads_and_means_the_same(expected: dict, tmp_path: Path) -> None:
    # A copy: the journal is appended to by whoever opens it.
    path = tmp_path / "study.journal"
    path.write_bytes((FIXTURES / "study_0_1.journal").read_bytes())
    study = optuna.load_study(
        study_name="fixture", storage=JournalStorage(JournalFileBackend(str(path)))
    )
    space = HessianSearchSpace.load_from_study(study)
    _check_meaning(space, expected)
    for trial in study.trials:
        config = space.config_from_params(trial.params)
        assert trial.value == pytest.approx(space.perturbation(config))
    # The enqueued configurations come back as themselves.
    assert [space.config_from_params(t.params) for t in study.trials[2:]] == CONFIGS
