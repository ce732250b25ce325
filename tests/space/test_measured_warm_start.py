"""Warm starts checked by measurement: corrected when a joint answer misses its prediction."""

from __future__ import annotations

import math

import pytest

from optuna_ctpe.search_space import HessianSearchSpace
from optuna_ctpe.space import warm_start
from optuna_ctpe.space.records import LayerSensitivity
from optuna_ctpe.space.records import ParamTensor
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import WidthGroupSensitivity


BITS = (2, 4, 8)
RATIO = 0.12


def _space() -> HessianSearchSpace:
    """conv1 -> conv2 -> conv3 -> fc: three width groups whose narrowing is cheap by Ω."""
    layers = [
        LayerSensitivity("conv1", 0.5, 36, {b: 1.0 / b**2 for b in BITS}),
        LayerSensitivity("conv2", 2.0, 288, {b: 8.0 / b**2 for b in BITS}),
        LayerSensitivity("conv3", 2.0, 576, {b: 8.0 / b**2 for b in BITS}),
        LayerSensitivity("fc", 1.0, 16, {b: 0.5 / b**2 for b in BITS}),
    ]
    groups = [
        WidthGroupSensitivity(name, n, 0.01, {0.5: 0.1, 1.0: 0.0})
        for name, n in (("conv1", 4), ("conv2", 8), ("conv3", 8))
    ]
    tensors = [
        ParamTensor("conv1.weight", 36, "conv1", out_group="conv1"),
        ParamTensor("conv2.weight", 288, "conv2", out_group="conv2", in_group="conv1"),
        ParamTensor("conv3.weight", 576, "conv3", out_group="conv3", in_group="conv2"),
        ParamTensor("fc.weight", 16, "fc", in_group="conv3"),
    ]
    return HessianSearchSpace.from_sensitivities(
        layers, groups, tensors=tensors, bits=BITS, widths=(0.5, 1.0), budget=math.inf
    )


def _narrowed(space: HessianSearchSpace, params: dict) -> frozenset[str]:
    config = space.config_from_params(params)
    return frozenset(g for g, w in config.widths.items() if w < 1)


class _Counting:
    """A measure: Ω/2, plus ``penalty`` for configurations narrowing all of ``together``."""

    def __init__(self, space: HessianSearchSpace, together: frozenset[str], penalty: float):
        self.space, self.together, self.penalty = space, together, penalty
        self.calls: list[QuantConfig] = []

    def __call__(self, config: QuantConfig) -> float:
        self.calls.append(config)
        narrowed = {g for g, w in config.widths.items() if w < 1}
        extra = self.penalty if self.together and self.together <= narrowed else 0.0
        return self.space.perturbation(config) / 2 + extra


def test_a_prediction_that_holds_keeps_the_omega_ranking() -> None:
    space = _space()
    plain = space.warm_starts(size_ratio=RATIO, n=3)
    measure = _Counting(space, frozenset(), 0.0)
    measured = space.warm_starts(size_ratio=RATIO, n=3, measure=measure)
    assert measured[0] == plain[0]
    assert len(measure.calls) == len(set(measure.calls))  # each configuration measured once
    assert len(measure.calls) <= 3 + warm_start._MAX_CORRECTIONS


def test_a_joint_answer_that_misses_is_corrected() -> None:
    space = _space()
    ratio = 0.06  # too small for full widths: every ILP answer narrows all three groups
    plain = space.warm_starts(size_ratio=ratio, n=3)
    together = frozenset({"conv2", "conv3"})
    assert all(together <= _narrowed(space, params) for params in plain)
    # Narrowed together, the two groups lose far more than Ω says (resnet18's layer4 groups).
    measure = _Counting(space, together, penalty=100.0)
    measured = space.warm_starts(size_ratio=ratio, n=3, measure=measure)
    first = space.config_from_params(measured[0])
    assert not together <= _narrowed(space, measured[0])
    assert measure(first) < measure(space.config_from_params(plain[0])) - 50
    # Every answer returned fits the budget and was measured.
    for params in measured:
        config = space.config_from_params(params)
        assert space.size(config) <= ratio * space.fp32_bits
        assert config in measure.calls


def test_a_measured_decrease_does_not_promote_an_answer() -> None:
    space = _space()
    plain = space.warm_starts(size_ratio=RATIO, n=3)
    last = space.config_from_params(plain[-1])
    assert len(plain) > 1

    def measure(config: QuantConfig) -> float:  # noise: the last answer measures a gain
        return -1.0 if config == last else space.perturbation(config) / 2

    assert space.warm_starts(size_ratio=RATIO, n=3, measure=measure)[0] == plain[0]


def test_a_non_finite_measurement_is_named() -> None:
    space = _space()
    with pytest.raises(ValueError, match="measure returned nan"):
        space.warm_starts(size_ratio=RATIO, measure=lambda config: math.nan)
