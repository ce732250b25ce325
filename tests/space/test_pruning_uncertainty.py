"""The pruning rule and the priors read traces at their upper confidence bound (torch-free)."""

from __future__ import annotations

import json
import math

import pytest

from optuna_ctpe.search_space import HessianSearchSpace
from optuna_ctpe.search_space import LayerSensitivity
from optuna_ctpe.space.checks import make_spec
from optuna_ctpe.space.omega import omega_table
from optuna_ctpe.space.omega import upper_trace
from optuna_ctpe.space.pruning import uncertain_layers
from optuna_ctpe.space.records import DEFAULT_TRACE_Z
from optuna_ctpe.space.records import ParamTensor
from optuna_ctpe.space.records import WidthGroupSensitivity


BITS = (2, 4, 8)


def _layer(name: str, trace: float, stderr: float = 0.0) -> LayerSensitivity:
    # Error of b-bit quantization falling by 4x per bit, like uniform rounding noise.
    return LayerSensitivity(name, trace, 100, {b: 4.0 ** (-b) for b in BITS}, stderr)


def _space(stderr: float, **kwargs) -> HessianSearchSpace:  # type: ignore[no-untyped-def]
    """``a``: a well-measured trace of 1; ``b``: a trace clipped to 0 with ``stderr``."""
    return HessianSearchSpace(
        [_layer("a", 1.0), _layer("b", 0.0, stderr)], bits=BITS, **{"budget": 1.0, **kwargs}
    )


def test_upper_trace_adds_z_standard_errors() -> None:
    layer = _layer("a", 0.5, 0.25)
    assert upper_trace(layer, 0.0) == 0.5
    assert upper_trace(layer, 2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="z must be"):
        upper_trace(layer, -1.0)


def test_a_clipped_trace_is_not_read_as_insensitive() -> None:
    # Ω_ref = Ω(a, 4 bits) = 1/256. At z=0, b's Ω is 0 everywhere: every bit-width survives,
    # the monotonicity floor included. At z=1, b reads as 2.0, twice as sensitive as a, so it
    # keeps only 8 bits: its trace could be that large.
    point = _space(2.0, trace_z=0.0)
    assert point.choices["bits:b"] == (2, 4, 8)
    assert point.choices["bits:a"] == (4, 8)
    upper = _space(2.0, trace_z=1.0)
    assert upper.choices["bits:b"] == (8,)
    assert upper.choices["bits:a"] == (4, 8)  # Ω_ref stays the point estimate


def test_a_precise_trace_prunes_as_before() -> None:
    # With no standard error the upper bound is the point estimate, whatever z is.
    assert _space(0.0, trace_z=3.0).choices == _space(0.0, trace_z=0.0).choices


def test_the_upper_bound_orders_the_monotonicity_floor() -> None:
    # c's weights quantize with little error, so the threshold keeps its 2 bits whichever way
    # its trace is read; only the floor can remove them. By its mean (0.1) c is less sensitive
    # than a (1.0), by its upper bound (2.0) more, so a's minimum of 4 bits becomes its floor.
    a = LayerSensitivity("a", 1.0, 100, {b: 16 * 4.0 ** (-b) for b in BITS})
    c = LayerSensitivity("c", 0.1, 100, {b: 4.0 ** (-b) / 100 for b in BITS}, 1.9)
    point = HessianSearchSpace([a, c], bits=BITS, budget=1.0, trace_z=0.0)
    upper = HessianSearchSpace([a, c], bits=BITS, budget=1.0, trace_z=1.0)
    assert point.choices == {"bits:a": (4, 8), "bits:c": (2, 4, 8)}
    assert upper.choices == {"bits:a": (4, 8), "bits:c": (4, 8)}


def test_priors_put_less_weight_on_the_cheap_choices_of_an_uncertain_layer() -> None:
    # budget=inf keeps every choice, so only the risk term differs.
    point = _space(2.0, trace_z=0.0, budget=math.inf).prior_weights()["bits:b"]
    upper = _space(2.0, trace_z=1.0, budget=math.inf).prior_weights()["bits:b"]
    assert upper[0] < point[0]
    assert upper[-1] > point[-1]


def test_uncertain_layers_are_those_whose_lower_bound_is_not_above_zero() -> None:
    layers = [_layer("sure", 1.0, 0.1), _layer("noisy", 1.0, 0.6), _layer("clipped", 0.0, 0.3)]
    spec = make_spec(layers, [], None, BITS, (1.0,), 16.0, None, trace_z=1.0)
    assert uncertain_layers(spec) == ["clipped"]
    spec2 = make_spec(layers, [], None, BITS, (1.0,), 16.0, None, trace_z=2.0)
    assert uncertain_layers(spec2) == ["noisy", "clipped"]
    space = HessianSearchSpace(layers, bits=BITS, trace_z=2.0)
    assert space.uncertain_layers == ["noisy", "clipped"]


def test_the_omega_table_has_a_point_and_an_upper_reading() -> None:
    spec = make_spec([_layer("a", 1.0, 0.5)], [], None, BITS, (1.0,), 16.0, None, trace_z=2.0)
    assert omega_table(spec)["bits:a"][2] == pytest.approx(1.0 / 16)
    assert omega_table(spec, upper=True)["bits:a"][2] == pytest.approx(2.0 / 16)


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf, "1", None])
def test_a_bad_trace_z_is_refused_by_name(bad: object) -> None:
    with pytest.raises(ValueError, match="trace_z must be"):
        _space(1.0, trace_z=bad)


def test_default_and_replacement_keep_trace_z() -> None:
    space = _space(2.0)
    assert space.trace_z == DEFAULT_TRACE_Z
    assert space.with_budget(math.inf).trace_z == DEFAULT_TRACE_Z


def test_json_round_trips_trace_z() -> None:
    space = _space(2.0, trace_z=1.5)
    again = HessianSearchSpace.from_json(space.to_json())
    assert again.trace_z == 1.5
    assert again.choices == space.choices


def test_a_space_saved_before_trace_z_loads_with_its_own_choices() -> None:
    # An old file has no trace_z; it was pruned on point estimates and loads so.
    old = json.loads(_space(2.0, trace_z=0.0).to_json())
    del old["trace_z"]
    loaded = HessianSearchSpace.from_json(old)
    assert loaded.trace_z == 0.0
    assert loaded.choices["bits:b"] == (2, 4, 8)
    # The field matters: choices made at z=1 are not what z=0 gives, so the check refuses them.
    new = json.loads(_space(2.0, trace_z=1.0).to_json())
    del new["trace_z"]
    with pytest.raises(ValueError, match="inconsistent"):
        HessianSearchSpace.from_json(new)


def _with_group(stderr: float, **kwargs) -> HessianSearchSpace:  # type: ignore[no-untyped-def]
    """Layer ``a`` (trace 1) and a width group of it whose trace is clipped to 0 with
    ``stderr``: removing half its channels removes a squared norm of 0.01."""
    group = WidthGroupSensitivity("a", 4, 0.0, {0.5: 0.01, 1.0: 0.0}, trace_stderr=stderr)
    return HessianSearchSpace(
        [_layer("a", 1.0)],
        [group],
        tensors=[ParamTensor("a.weight", 100, "a", out_group="a")],
        bits=BITS,
        widths=(0.5, 1.0),
        **{"budget": 1.0, **kwargs},
    )


def test_a_width_group_reads_its_trace_at_the_upper_bound_too() -> None:
    # Ω_ref = Ω(a, 4 bits) = 1/256. The group's point Ω at 0.5 is 0, so the ratio survives;
    # its upper Ω (trace 1, z=1) is 0.01 > Ω_ref, so the ratio is pruned.
    assert _with_group(1.0, trace_z=0.0).choices["width:a"] == (0.5, 1.0)
    assert _with_group(1.0).choices["width:a"] == (1.0,)
    assert _with_group(0.0).choices["width:a"] == (0.5, 1.0)
    upper = omega_table(_with_group(1.0)._spec, upper=True)["width:a"]
    assert upper[0.5] == pytest.approx(0.01)


def test_group_standard_errors_round_trip_and_old_files_load_without() -> None:
    space = _with_group(1.0)
    data = json.loads(space.to_json())
    assert data["groups"][0]["trace_stderr"] == 1.0
    assert HessianSearchSpace.from_json(space.to_json()).choices == space.choices
    # A space saved before groups had standard errors: no field, read as exact.
    del data["groups"][0]["trace_stderr"]
    data["choices"]["width:a"] = [0.5, 1.0]
    old = HessianSearchSpace.from_json(data)
    assert old.groups["a"].trace_stderr == 0.0
    assert old.choices["width:a"] == (0.5, 1.0)
    with pytest.raises(ValueError, match="trace_stderr of group 'a'"):
        _with_group(-1.0)
