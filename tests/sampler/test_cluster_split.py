"""The cluster split on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from optuna_ctpe.sampler._cluster_split import cluster_split
from optuna_ctpe.sampler._cluster_split import quantile_split
from optuna_ctpe.sampler._cluster_split import transform


def split(scores, **kwargs):
    options = dict(n_clusters=3, transform_method="none", n_good_max=100)
    options.update(kwargs)
    return cluster_split(np.asarray(scores, dtype=float), **options)


THREE_GROUPS = [5.0, 0.0, 100.0, 0.1, 5.1, 101.0, 0.2, 5.2]  # best: 1,3,6; middle: 0,4,7


def test_dual_threshold_separates_good_middle_and_bad():
    s = split(THREE_GROUPS)
    assert s.good.tolist() == [1, 3, 6]
    assert s.bad.tolist() == [2, 5]
    assert s.middle.tolist() == [0, 4, 7]
    assert s.n_clusters == 3
    assert s.threshold == pytest.approx(0.2)
    assert s.fallback_reason == ""


def test_good_cluster_is_capped_by_keeping_its_best_members():
    s = split(THREE_GROUPS, n_good_max=2)
    assert s.good.tolist() == [1, 3]
    assert s.threshold == pytest.approx(0.1)
    # The capped-off member of the best cluster is a near miss.
    assert s.near_miss.tolist() == [6]
    assert s.middle.tolist() == [0, 4, 7]


def test_two_clusters_split_best_from_worst():
    s = split([0.0, 10.0, 0.5, 9.0, 1.0], n_clusters=2)
    assert s.good.tolist() == [0, 2, 4]
    assert s.bad.tolist() == [1, 3]


def test_all_equal_values_fall_back_to_quantile_split_in_trial_order():
    s = split([3.0] * 6, n_good_max=2)
    assert s.good.tolist() == [0, 1]
    assert s.bad.tolist() == [2, 3, 4, 5]
    assert s.middle.tolist() == [] and s.near_miss.tolist() == []
    assert s.n_clusters == 0
    assert "distinct" in s.fallback_reason


def test_ties_stay_in_one_cluster():
    s = split([1.0, 1.0, 1.0, 7.0, 7.0, 20.0, 20.0])
    assert s.good.tolist() == [0, 1, 2]
    assert s.bad.tolist() == [5, 6]


def test_single_observation_falls_back():
    s = split([4.2])
    assert s.good.tolist() == [0]
    assert s.bad.tolist() == []
    assert s.fallback_reason


def test_fewer_distinct_values_than_clusters_falls_back():
    s = split([1.0, 2.0, 1.0], n_good_max=1)
    assert s.fallback_reason
    assert s.good.tolist() == [0]
    assert s.bad.tolist() == [1, 2]


def test_infinities_are_extreme_members():
    scores = [np.inf, 0.0, 0.1, 5.0, 5.1, 50.0, 51.0, -np.inf]
    s = split(scores)
    assert s.good.tolist() == [1, 2, 7]
    assert s.bad.tolist() == [0, 5, 6]


def test_nan_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        split([1.0, np.nan, 2.0])


def test_log_transform_by_hand():
    values = transform(np.array([1.0, 2.0, 3.0, 11.0]), "log", n_good=2)
    # shifted = [0, 1, 2, 10]; the gap to the 2nd best is 1.
    np.testing.assert_allclose(values, np.log1p([0.0, 1.0, 2.0, 10.0]))


def test_log_transform_with_tied_best_uses_smallest_positive_gap():
    values = transform(np.array([1.0, 1.0, 3.0, 5.0]), "log", n_good=2)
    np.testing.assert_allclose(values, np.log1p([0.0, 0.0, 1.0, 2.0]))


def test_rank_transform_averages_ties():
    values = transform(np.array([3.0, 1.0, 3.0, 2.0]), "rank", n_good=1)
    np.testing.assert_allclose(values, [2.5 / 3, 0.0, 2.5 / 3, 1 / 3])


def test_unknown_transform_is_rejected():
    with pytest.raises(ValueError, match="transform"):
        transform(np.array([1.0, 2.0]), "sqrt", n_good=1)  # type: ignore[arg-type]


def test_auto_finds_three_well_separated_groups():
    rng = np.random.default_rng(0)
    scores = np.concatenate([c + 0.01 * rng.standard_normal(6) for c in (0.0, 10.0, 20.0)])
    s = split(scores, n_clusters="auto")
    assert s.n_clusters == 3
    assert sorted(s.good.tolist()) == list(range(6))
    assert sorted(s.bad.tolist()) == list(range(12, 18))


def test_split_is_deterministic():
    rng = np.random.default_rng(1)
    scores = rng.lognormal(size=200)
    first = split(scores, transform_method="log", n_good_max=20)
    second = split(scores, transform_method="log", n_good_max=20)
    assert first.good.tolist() == second.good.tolist()
    assert first.bad.tolist() == second.bad.tolist()


def test_quantile_split_matches_tpe():
    s = quantile_split(np.array([3.0, 1.0, 2.0, 1.0]), 2, "test")
    assert s.good.tolist() == [1, 3]
    assert s.bad.tolist() == [0, 2]
