"""Tests of HessianSearchSpace's torch-free side: pruning, sizes, priors, warm starts, JSON."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import optuna
import pytest

from optuna_ctpe import ClusterTPESampler
from optuna_ctpe.search_space import HessianSearchSpace
from optuna_ctpe.search_space import LayerSensitivity
from optuna_ctpe.search_space import ParamTensor
from optuna_ctpe.search_space import QuantConfig
from optuna_ctpe.search_space import WidthGroupSensitivity


BITS = (2, 4, 8)


def _layer(name: str, trace: float, n: int = 100) -> LayerSensitivity:
    # Error of b-bit quantization falling by 4x per bit, like uniform rounding noise.
    return LayerSensitivity(name, trace, n, {b: 4.0 ** (-b) for b in BITS})


def _three_layers(**kwargs) -> HessianSearchSpace:  # type: ignore[no-untyped-def]
    return HessianSearchSpace.from_sensitivities(
        [_layer("a", 1.0), _layer("b", 10.0), _layer("c", 0.1)],
        bits=BITS,
        **{"budget": 1.0, **kwargs},
    )


def _with_groups(budget: float = 1.0) -> HessianSearchSpace:
    """conv(1->4) -> conv(4->8) -> fc(8->2); groups prune conv outputs, fc stays whole."""
    layers = [
        LayerSensitivity("conv1", 0.5, 36, {b: 1.0 / b**2 for b in BITS}),
        LayerSensitivity("conv2", 2.0, 288, {b: 8.0 / b**2 for b in BITS}),
        LayerSensitivity("fc", 1.0, 16, {b: 0.5 / b**2 for b in BITS}),
    ]
    groups = [
        WidthGroupSensitivity("conv1", 4, 1.0, {0.5: 0.01, 1.0: 0.0}),
        WidthGroupSensitivity("conv2", 8, 2.0, {0.5: 1.0, 1.0: 0.0}),
    ]
    tensors = [
        ParamTensor("conv1.weight", 36, "conv1", out_group="conv1"),
        ParamTensor("conv1.bias", 4, None, out_group="conv1"),
        ParamTensor("conv2.weight", 288, "conv2", out_group="conv2", in_group="conv1"),
        ParamTensor("conv2.bias", 8, None, out_group="conv2"),
        ParamTensor("fc.weight", 16, "fc", in_group="conv2"),
        ParamTensor("fc.bias", 2),
    ]
    return HessianSearchSpace.from_sensitivities(
        layers, groups, tensors=tensors, bits=BITS, widths=(0.5, 1.0), budget=budget
    )


# -- pruning rule ------------------------------------------------------------------------------


def test_hand_computed_pruning() -> None:
    # Omega_ref = max trace x err(4 bits) = 10 / 256. Layer a at 2 bits: 1/16 > ref -> dropped;
    # b at 2 bits: 10/16 > ref -> dropped, at 4 bits: = ref -> kept; c keeps everything.
    space = _three_layers()
    assert dict(space.choices) == {"bits:a": (4, 8), "bits:b": (4, 8), "bits:c": (2, 4, 8)}
    assert space.log10_size_before == pytest.approx(3 * math.log10(3))
    assert space.log10_size_after == pytest.approx(math.log10(2 * 2 * 3))
    assert space.omega["bits:b"][4] == pytest.approx(10 / 256)


def test_budget_scales_threshold() -> None:
    assert all(len(c) == 3 for c in _three_layers(budget=math.inf).choices.values())
    # A tiny budget leaves only the safest choice everywhere (and no searched parameter).
    tiny = _three_layers(budget=1e-9)
    assert all(c == (8,) for c in tiny.choices.values())
    assert tiny.distributions == {}
    # budget=16: the threshold 10/16 admits b at 2 bits too.
    assert _three_layers(budget=16).choices["bits:b"] == (2, 4, 8)


def test_monotonicity_lifts_more_sensitive_layer() -> None:
    # "big" has a smaller trace than "small" but huge weights, so Omega drops its low bits;
    # the more sensitive "small" must then not go below big's minimum either.
    big = LayerSensitivity("big", 1.0, 10, {2: 100.0, 4: 1.0, 8: 0.01})
    small = LayerSensitivity("small", 2.0, 10, {2: 0.001, 4: 0.0001, 8: 0.0})
    space = HessianSearchSpace.from_sensitivities([big, small], bits=BITS, budget=1.0)
    assert space.choices["bits:big"] == (4, 8)
    assert space.choices["bits:small"] == (4, 8)


@settings(max_examples=60, deadline=None)
@given(
    traces=st.lists(st.floats(0.0, 100.0), min_size=2, max_size=7),
    scales=st.lists(st.floats(0.01, 100.0), min_size=7, max_size=7),
    budget=st.floats(0.01, 10.0),
)
def test_monotonicity_property(traces: list[float], scales: list[float], budget: float) -> None:
    layers = [
        LayerSensitivity(f"l{i}", t, 10, {b: scales[i] * 2.0 ** (-b) for b in BITS})
        for i, t in enumerate(traces)
    ]
    space = HessianSearchSpace.from_sensitivities(layers, bits=BITS, budget=budget)
    mins = {n: min(space.choices["bits:" + n]) for n in space.sensitivities}
    for x, y in itertools.permutations(space.sensitivities.values(), 2):
        if x.mean_trace > y.mean_trace:
            assert mins[x.name] >= mins[y.name]
    assert all(max(c) == 8 for c in space.choices.values())


def test_fixed_layers_are_not_searched() -> None:
    space = _three_layers(fixed_bits={"a": 6, "c": 8})
    assert list(space.distributions) == ["bits:b"]
    config = space.config_from_params({"bits:b": 4})
    assert dict(config.bits) == {"a": 6, "b": 4, "c": 8}
    assert space.log10_size_before == pytest.approx(math.log10(3))
    # A fixed bit-width off the grid (6) is a constant: sizes and warm starts still work.
    assert space.size(config) == 100 * (6 + 4 + 8)
    assert space.warm_starts(size_bits=1800) == [{"bits:b": 4}]


def test_width_pruning_and_size() -> None:
    space = _with_groups()
    # Omega_ref = max(0.5/16, 2*8/16, 1*0.5/16) = 1.0; conv2 at 0.5 width: 2*1.0 > 1 -> dropped.
    assert space.choices["width:conv1"] == (0.5, 1.0)
    assert space.choices["width:conv2"] == (1.0,)
    full = space.uniform(8)
    assert space.size(full) == 8 * (36 + 288 + 16) + 32 * (4 + 8 + 2)
    assert space.fp32_bits == 32 * (36 + 4 + 288 + 8 + 16 + 2)
    half = QuantConfig({"conv1": 4, "conv2": 2, "fc": 8}, {"conv1": 0.5, "conv2": 0.5})
    # conv1: 2 of 4 channels; conv2: 4 of 8 outputs x 2 of 4 inputs; fc: 4 of 8 inputs.
    expected = 4 * 18 + 32 * 2 + 2 * 72 + 32 * 4 + 8 * 8 + 32 * 2
    assert space.size(half) == expected


def test_kept_channels_override_rounding() -> None:
    group = WidthGroupSensitivity("g", 10, 1.0, {0.75: 0.1, 1.0: 0.0}, {0.75: 8, 1.0: 10})
    assert group.kept(0.75) == 8
    assert WidthGroupSensitivity("g", 10, 1.0, {0.75: 0.1, 1.0: 0.0}).kept(0.75) == 8  # round(7.5)


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": (1, 2, 8)}, r"bits must hold integers in \[2, 16\], got 1"),
        ({"bits": (2, 17)}, "got 17"),
        ({"bits": ()}, "bits must be a non-empty sequence"),
        ({"bits": (2, 2, 8)}, "must not repeat"),
        ({"widths": (0.0, 1.0)}, r"widths must hold ratios in \(0, 1\], got 0.0"),
        ({"widths": (0.5, 1.5)}, "got 1.5"),
        ({"widths": []}, "widths must be a non-empty"),
        ({"budget": 0}, "budget must be a number > 0"),
        ({"fixed_bits": {"zz": 8}}, "fixed_bits names unknown layer 'zz'"),
        ({"fixed_bits": {"a": 1}}, r"fixed_bits\['a'\] must hold integers"),
    ],
)
def test_argument_validation(kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        HessianSearchSpace.from_sensitivities([_layer("a", 1.0)], **{"bits": BITS, **kwargs})


@pytest.mark.parametrize(
    "layer, match",
    [
        (_layer("a", float("nan")), "mean_trace of layer 'a' must be finite and >= 0, got nan"),
        (_layer("a", -1.0), "must be finite and >= 0, got -1.0"),
        (LayerSensitivity("a", 1.0, 10, {2: 1.0, 4: 0.1}), r"lack the bit-widths \[8\]"),
        (LayerSensitivity("a", 1.0, 0, {b: 0.1 for b in BITS}), "n_params of layer 'a'"),
        (LayerSensitivity("", 1.0, 1, {b: 0.1 for b in BITS}), "non-empty string"),
        (LayerSensitivity("a", 1.0, 1, {2: -1.0, 4: 0.1, 8: 0.0}), r"errors\[2\] of layer 'a'"),
    ],
)
def test_sensitivity_validation(layer, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        HessianSearchSpace.from_sensitivities([layer], bits=BITS)


def test_structure_validation() -> None:
    with pytest.raises(ValueError, match="twice"):
        HessianSearchSpace.from_sensitivities([_layer("a", 1.0), _layer("a", 2.0)], bits=BITS)
    with pytest.raises(ValueError, match="layers must be a non-empty sequence"):
        HessianSearchSpace.from_sensitivities([], bits=BITS)
    group = WidthGroupSensitivity("g", 4, 1.0, {0.5: 0.1, 1.0: 0.0})
    with pytest.raises(ValueError, match="tensors is required"):
        HessianSearchSpace.from_sensitivities(
            [_layer("a", 1.0)], [group], bits=BITS, widths=(0.5, 1.0)
        )
    with pytest.raises(ValueError, match="unknown out_group 'h'"):
        HessianSearchSpace.from_sensitivities(
            [_layer("a", 1.0)],
            [group],
            tensors=[ParamTensor("a.weight", 100, "a", "h")],
            bits=BITS,
            widths=(0.5, 1.0),
        )
    with pytest.raises(ValueError, match="unknown layer 'zz'"):
        HessianSearchSpace.from_sensitivities(
            [_layer("a", 1.0)], tensors=[ParamTensor("a.weight", 100, "zz")], bits=BITS
        )


def test_config_validation() -> None:
    space = _three_layers()
    with pytest.raises(ValueError, match=r"params\['bits:a'\]=2 is not one of its choices"):
        space.config_from_params({"bits:a": 2, "bits:b": 4, "bits:c": 2})
    with pytest.raises(ValueError, match="lacks the searched parameter 'bits:b'"):
        space.config_from_params({"bits:a": 4, "bits:c": 2})
    with pytest.raises(ValueError, match="config.bits must name exactly the layers"):
        space.size(QuantConfig({"a": 4}))


# -- serialisation -----------------------------------------------------------------------------


def test_records_behind_the_face() -> None:
    # What the torch wings take instead of the face: the space's records, equal to what its
    # methods compute on.
    from optuna_ctpe.space import io
    from optuna_ctpe.space.params import uniform_config
    from optuna_ctpe.space.records import spec_of
    from optuna_ctpe.space.records import SpaceSpec

    space = _with_groups()
    assert isinstance(space.spec, SpaceSpec)
    assert spec_of(space) is space.spec and spec_of(space.spec) is space.spec
    assert uniform_config(space.spec, 4, 0.5) == space.uniform(4, 0.5)
    assert io.to_json(space.spec) == space.to_json()  # choices recomputed: the same JSON
    with pytest.raises(TypeError, match="space must be a HessianSearchSpace or a SpaceSpec"):
        spec_of({"bits": (4, 8)})


def test_json_round_trip() -> None:
    spaces = [_three_layers(fixed_bits={"a": 8}), _with_groups(), _three_layers(budget=math.inf)]
    for space in spaces:
        text = space.to_json()
        again = HessianSearchSpace.from_json(text)
        assert again.to_json() == text
        assert again.distributions == space.distributions
        assert HessianSearchSpace.from_json(json.loads(text)).to_json() == text


def _edit(text: str, **changes) -> str:  # type: ignore[no-untyped-def]
    data = json.loads(text)
    data.update(changes)
    return json.dumps(data)


def test_malformed_json_is_a_clear_error() -> None:
    text = _with_groups().to_json()
    data = json.loads(text)
    cases = {
        "{not json": "not valid JSON",
        "[1, 2]": "must be an object with schema",
        _edit(text, schema="other"): "must be an object with schema",
        _edit(text, version=99): "schema version 99",
        json.dumps({k: v for k, v in data.items() if k != "layers"}): "mistyped field 'layers'",
        _edit(text, bits=[1, 8]): "bits must hold integers",
        _edit(text, choices={**data["choices"], "bits:conv1": [8]}): "inconsistent",
    }
    for bad, match in cases.items():
        with pytest.raises(ValueError, match=match):
            HessianSearchSpace.from_json(bad)


def _many_layers(n: int) -> HessianSearchSpace:
    return HessianSearchSpace.from_sensitivities(
        [_layer(f"block{i}.very_long_module_name.conv", 0.1 * (i + 1)) for i in range(n)],
        bits=BITS,
    )


@pytest.mark.parametrize("storage_kind", ["memory", "sqlite"])
def test_study_attribute_round_trip(storage_kind: str, tmp_path: Path) -> None:
    storage = None if storage_kind == "memory" else f"sqlite:///{tmp_path / 'study.db'}"
    space = _many_layers(60)
    study = optuna.create_study(storage=storage, study_name="s")
    space.save_to_study(study)
    attrs = study.user_attrs
    assert attrs["ctpe:search_space"]["n_chunks"] > 1
    assert all(len(json.dumps(v)) <= 2048 for v in attrs.values())
    reloaded = optuna.load_study(study_name="s", storage=storage) if storage else study
    assert HessianSearchSpace.load_from_study(reloaded).to_json() == space.to_json()


def test_study_attribute_errors() -> None:
    study = optuna.create_study()
    with pytest.raises(ValueError, match="holds no search space"):
        HessianSearchSpace.load_from_study(study)
    _three_layers().save_to_study(study)
    study.set_user_attr("ctpe:search_space:0", "tampered")
    with pytest.raises(ValueError, match="fails its checksum"):
        HessianSearchSpace.load_from_study(study)


# -- Optuna integration, priors and warm starts ------------------------------------------------


def test_suggest_in_a_study_with_priors() -> None:
    space = _with_groups(budget=2.0)
    priors = space.prior_weights()
    assert set(priors) == set(space.distributions)
    for name, weights in priors.items():
        assert len(weights) == len(space.distributions[name].choices)
        assert sum(weights) == pytest.approx(1.0)
    seen: list[QuantConfig] = []

    def objective(trial: optuna.Trial) -> float:
        config = space.suggest(trial)
        seen.append(config)
        assert set(config.bits) == {"conv1", "conv2", "fc"}
        return space.size(config) / space.fp32_bits + space.perturbation(config)

    study = optuna.create_study(sampler=ClusterTPESampler(seed=0, prior_weights=priors))
    study.optimize(objective, n_trials=15)
    assert set(study.best_params) == set(space.distributions)
    for config in seen:
        for layer, b in config.bits.items():
            assert b in space.choices["bits:" + layer]
    assert space.config_from_params(study.best_params) in seen


def test_prior_prefers_cheap_and_safe() -> None:
    # c is insensitive: its cheapest choice is also safe and gets the most weight; b is the most
    # sensitive layer, whose 4-bit choice sits at the threshold: 8 bits gets more weight.
    priors = _three_layers().prior_weights()
    assert np.argmax(priors["bits:c"]) == 0
    assert np.argmax(priors["bits:b"]) == 1
    with pytest.raises(ValueError, match="temperature must be a number > 0, got 0"):
        _three_layers().prior_weights(temperature=0)
    with pytest.raises(ValueError, match="floor must be a number in"):
        _three_layers().prior_weights(floor=2)


def test_prior_never_rules_a_choice_out() -> None:
    # Without pruning, 2 bits on the most sensitive layer has Omega 16x the reference: it gets
    # little weight, but at least the uniform floor.
    priors = _three_layers(budget=math.inf).prior_weights(floor=0.1)
    assert min(priors["bits:b"]) >= 0.1 / 3
    assert priors["bits:b"][0] < priors["bits:b"][2]
    assert _three_layers().prior_weights(floor=1.0)["bits:c"] == pytest.approx([1 / 3] * 3)


def _brute_force_best(space: HessianSearchSpace, target: float, widths: bool) -> float:
    names = [n for n in space.choices if widths or n.startswith("bits:")]
    best = math.inf
    for values in itertools.product(*[space.choices[n] for n in names]):
        params = dict(zip(names, values))
        params.update({n: 1.0 for n in space.choices if n not in params})
        config = space.config_from_params(params)
        if space.size(config) <= target:
            best = min(best, space.perturbation(config))
    return best


def test_warm_start_is_the_ilp_optimum_for_bits() -> None:
    space = _three_layers()
    for ratio in (0.11, 0.15, 0.2, 0.25):
        starts = space.warm_starts(size_ratio=ratio, n=3)
        first = space.config_from_params(starts[0])
        target = ratio * space.fp32_bits
        assert space.size(first) <= target
        assert space.perturbation(first) == pytest.approx(_brute_force_best(space, target, False))
        for params in starts:
            assert set(params) == set(space.distributions)
            assert space.size(space.config_from_params(params)) <= target


def test_warm_start_with_widths_fits_and_beats_bits_only() -> None:
    space = _with_groups(budget=3.0)
    assert len(space.distributions) == 5
    for ratio in (0.08, 0.1, 0.15):
        target = ratio * space.fp32_bits
        first = space.config_from_params(space.warm_starts(size_ratio=ratio)[0])
        assert space.size(first) <= target
        assert space.perturbation(first) <= _brute_force_best(space, target, False) + 1e-12
        assert space.perturbation(first) >= _brute_force_best(space, target, True) - 1e-12


def test_warm_start_errors() -> None:
    space = _three_layers()
    with pytest.raises(ValueError, match="exactly one of size_ratio and size_bits"):
        space.warm_starts()
    with pytest.raises(ValueError, match=r"size_ratio must be in \(0, 1\], got 2"):
        space.warm_starts(size_ratio=2)
    with pytest.raises(ValueError, match="no configuration of the pruned space fits"):
        space.warm_starts(size_bits=10)
    assert space.warm_starts(size_bits=int(space.fp32_bits), n=1) == [
        {"bits:a": 8, "bits:b": 8, "bits:c": 8}
    ]


def test_config_is_hashable_and_picklable() -> None:
    import pickle

    config = QuantConfig({"a": 4}, {"g": 0.5})
    assert pickle.loads(pickle.dumps(config)) == config
    assert len({config, QuantConfig({"a": 4}, {"g": 0.5})}) == 1
    with pytest.raises(TypeError):
        config.bits["a"] = 2  # type: ignore[index]


def test_module_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import optuna_ctpe.search_space, optuna_ctpe.space.warm_start, "
        "optuna_ctpe.tasks; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_relaxed_for_size_readmits_only_what_the_target_needs() -> None:
    space = _three_layers()  # cheapest pruned configuration: a4 b4 c2 = 1000 of 9600 bits
    assert space.relaxed_for_size(size_bits=1000) is space
    # 960 bits needs layer a at 2 bits: the threshold rises to Omega(a, 2) / Omega_ref = 1.6.
    relaxed = space.relaxed_for_size(size_bits=960)
    assert relaxed.budget == pytest.approx(1.6)
    assert relaxed.choices["bits:a"] == (2, 4, 8) and relaxed.choices["bits:b"] == (4, 8)
    # 700 bits needs b at 2 bits too: Omega(b, 2) / Omega_ref = 16.
    assert space.relaxed_for_size(size_bits=700).budget == pytest.approx(16.0)
    with pytest.raises(ValueError, match="no configuration of the full grid fits 500 bits"):
        space.relaxed_for_size(size_bits=500)
