"""Optuna's own reusable sampler test suites, run against ClusterTPESampler."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from optuna.samplers import BaseSampler

from optuna_ctpe import ClusterTPESampler


suites = pytest.importorskip(
    "optuna.testing.pytest_samplers",
    reason="Optuna's reusable sampler suites (optuna.testing.pytest_samplers) ship from 4.8 on",
)
BasicSamplerTestCase = suites.BasicSamplerTestCase
MultiObjectiveSamplerTestCase = suites.MultiObjectiveSamplerTestCase
RelativeSamplerTestCase = suites.RelativeSamplerTestCase


# Optuna runs TPESampler in these suites with n_startup_trials=0 because the relative tests
# call sample_relative right after one trial and expect every parameter back.
@pytest.fixture(params=["defaults", "rest-auto", "group"])
def _variant(request: pytest.FixtureRequest) -> dict:
    return {
        "defaults": {},
        "rest-auto": {"middle_weight": 1.0, "n_clusters": "auto", "transform": "rank"},
        "group": {"group": True, "constant_liar": False},
    }[request.param]


class TestBasic(BasicSamplerTestCase):
    @pytest.fixture
    def sampler(self, _variant: dict) -> Callable[[], BaseSampler]:
        return lambda: ClusterTPESampler(n_startup_trials=0, **_variant)


class TestRelative(RelativeSamplerTestCase):
    @pytest.fixture
    def sampler(self, _variant: dict) -> Callable[[], BaseSampler]:
        return lambda: ClusterTPESampler(n_startup_trials=0, **_variant)


class TestMultiObjective(MultiObjectiveSamplerTestCase):
    @pytest.fixture
    def sampler(self, _variant: dict) -> Callable[[], BaseSampler]:
        return lambda: ClusterTPESampler(n_startup_trials=0, **_variant)
