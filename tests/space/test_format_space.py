"""Format spaces without torch: records, Ω, pruning over formats, priors, the ILP, uniform
baselines, parameter names and versioned JSON."""

from __future__ import annotations

import itertools
import json
import math
import pickle

import optuna
import pytest

from optuna_ctpe import HessianSearchSpace
from optuna_ctpe.space.formats import parse_format
from optuna_ctpe.space.records import LayerSensitivity
from optuna_ctpe.space.records import ParamTensor
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.size import size_bits_formats


FORMATS = (
    "int2-g128-asym-gptq",
    "int3-g128-asym-gptq",
    "int3-g128-asym-rtn",
    "int3-pc-sym-rtn",
    "int4-g128-asym-gptq",
    "int4-pc-sym-rtn",
    "int8-pc-sym-rtn",
)
# Weight errors per format, as measured they fall with bits and GPTQ beats round to nearest
# on the same grid; layer "c" has a trace of 0.
ERRORS = {
    "int2-g128-asym-gptq": 6.0,
    "int3-g128-asym-gptq": 1.4,
    "int3-g128-asym-rtn": 2.0,
    "int3-pc-sym-rtn": 3.0,
    "int4-g128-asym-gptq": 0.35,
    "int4-pc-sym-rtn": 0.8,
    "int8-pc-sym-rtn": 0.003,
}
ROWS, INPUTS = 64, 256


def _layers(traces=(1.0, 3.0, 0.2, 0.5)) -> list[LayerSensitivity]:
    names = "abcd"
    return [
        LayerSensitivity(n, t, ROWS * INPUTS, {f: e * (1 + i / 10) for f, e in ERRORS.items()})
        for i, (n, t) in enumerate(zip(names, traces))
    ]


def _tensors() -> list[ParamTensor]:
    return [ParamTensor(f"{n}.weight", ROWS * INPUTS, n, scales=ROWS) for n in "abcd"] + [
        ParamTensor(f"{n}.bias", ROWS) for n in "abcd"
    ]


def _space(**kwargs) -> HessianSearchSpace:  # type: ignore[no-untyped-def]
    kwargs.setdefault("formats", FORMATS)
    return HessianSearchSpace(_layers(), tensors=_tensors(), **kwargs)


def test_format_parameters_are_named_and_valued_by_format_names() -> None:
    space = _space(budget=math.inf)
    assert set(space.distributions) == {f"format:{n}" for n in "abcd"}
    for dist in space.distributions.values():
        assert all(isinstance(c, str) and parse_format(c) for c in dist.choices)
    # Formats come ordered by the model's size in each, smallest first.
    sizes = [space.size(space.uniform(f)) for f in space.formats]
    assert sizes == sorted(sizes) and set(space.formats) == set(FORMATS)
    assert space.bits == (2, 3, 4, 8)


def test_dominated_formats_are_pruned_per_layer() -> None:
    space = _space(budget=math.inf)
    for name in "abcd":
        kept = space.choices[f"format:{name}"]
        # Round to nearest on the same g128 grid is as large as GPTQ and worse: dominated.
        assert "int3-g128-asym-rtn" not in kept
        sizes = [size_bits_formats(space.spec, {**_uniform8(), name: c}) for c in kept]
        errors = [space.sensitivities[name].errors[c] for c in kept]
        assert sizes == sorted(sizes)
        assert errors == sorted(errors, reverse=True)  # every step up in size loses error
        # Nothing kept is dominated by another grid format.
        for c in kept:
            for d in FORMATS:
                if d == c:
                    continue
                size_d = size_bits_formats(space.spec, {**_uniform8(), name: d})
                size_c = size_bits_formats(space.spec, {**_uniform8(), name: c})
                errs = space.sensitivities[name].errors
                assert not (
                    size_d <= size_c
                    and errs[d] <= errs[c]
                    and (size_d, errs[d]) != (size_c, errs[c])
                )


def _uniform8() -> dict[str, str]:
    return dict.fromkeys("abcd", "int8-pc-sym-rtn")


def test_threshold_and_monotonicity_over_formats() -> None:
    space = _space(budget=1.0)
    rank = {f: i for i, f in enumerate(space.formats)}
    by_trace = sorted("abcd", key=lambda n: space.sensitivities[n].mean_trace)
    floors = [min(rank[c] for c in space.choices[f"format:{n}"]) for n in by_trace]
    assert floors == sorted(floors)  # a more sensitive layer never gets a smaller floor
    for name in "abcd":
        kept = space.choices[f"format:{name}"]
        assert "int8-pc-sym-rtn" in kept  # the safest is always kept
        # Pruned tighter than with an infinite budget.
        assert set(kept) <= set(_space(budget=math.inf).choices[f"format:{name}"])
    assert space.log10_size_after < _space(budget=math.inf).log10_size_after


def test_config_size_and_omega_are_exact() -> None:
    space = _space(budget=math.inf)
    formats = {
        "a": "int3-g128-asym-gptq",
        "b": "int8-pc-sym-rtn",
        "c": "int2-g128-asym-gptq",
        "d": "int4-pc-sym-rtn",
    }
    config = QuantConfig({}, formats=formats)
    assert config.bits == {"a": 3, "b": 8, "c": 2, "d": 4}
    assert space.size(config) == size_bits_formats(space.spec, config.formats)
    expected = sum(
        space.sensitivities[n].mean_trace * space.sensitivities[n].errors[f]
        for n, f in config.formats.items()
    )
    assert space.perturbation(config) == pytest.approx(expected)
    params = space.to_params(config)
    assert params["format:a"] == "int3-g128-asym-gptq"
    assert space.config_from_params(params) == config


def test_quantconfig_of_bit_widths_is_unchanged() -> None:
    old = QuantConfig({"a": 4}, {"g": 0.5})
    assert old.key() == ((("a", 4),), (("g", 0.5),))
    assert hash(old) == hash(((("a", 4),), (("g", 0.5),)))
    assert repr(old) == "QuantConfig(bits={'a': 4}, widths={'g': 0.5})"
    fmt = QuantConfig({}, formats={"a": "int4-pc-sym-rtn"})
    assert fmt != QuantConfig({"a": 4})  # a format configuration is not a bit-width one
    assert pickle.loads(pickle.dumps(fmt)) == fmt
    with pytest.raises(ValueError, match="disagree"):
        QuantConfig({"a": 3}, formats={"a": "int4-pc-sym-rtn"})


def test_a_bit_width_config_is_refused_by_a_format_space_and_back() -> None:
    space = _space()
    with pytest.raises(ValueError, match="format per layer"):
        space.size(QuantConfig(dict.fromkeys("abcd", 4)))
    bits_space = HessianSearchSpace(
        [LayerSensitivity("a", 1.0, 10, {2: 1.0, 4: 0.1, 8: 0.01})], bits=(2, 4, 8)
    )
    with pytest.raises(ValueError, match="format per layer"):
        bits_space.size(QuantConfig({}, formats={"a": "int4-pc-sym-rtn"}))


@pytest.mark.parametrize("ratio", [0.11, 0.14, 0.2])
def test_warm_starts_fit_and_beat_every_fitting_uniform_on_omega(ratio: float) -> None:
    space = _space(budget=math.inf)
    target = ratio * space.fp32_bits
    starts = [space.config_from_params(p) for p in space.warm_starts(size_ratio=ratio, n=2)]
    assert starts and all(space.size(c) <= target for c in starts)
    # Brute force over the kept choices: the ILP's first answer is the least Ω that fits.
    names = [f"format:{n}" for n in "abcd"]
    best = min(
        space.perturbation(c)
        for c in (
            space.config_from_params(dict(zip(names, combo)))
            for combo in itertools.product(*(space.choices[n] for n in names))
        )
        if space.size(c) <= target
    )
    assert space.perturbation(starts[0]) == pytest.approx(best)


def test_uniform_formats_fit_largest_first_and_survive_relaxing() -> None:
    space = _space(budget=0.5)
    target = 0.11 * space.fp32_bits
    fits = space.uniform_formats(size_ratio=0.11)
    sizes = [space.size(space.uniform(f)) for f in fits]
    assert fits and all(s <= target for s in sizes) and sizes == sorted(sizes, reverse=True)
    outside = [f for f in space.formats if f not in fits]
    assert all(space.size(space.uniform(f)) > target for f in outside)
    # At this budget the tight pruning removes every fitting uniform configuration ...
    held = [f for f in fits if all(f in space.choices[f"format:{n}"] for n in "abcd")]
    assert not held
    # ... and relaxing for the size keeps one of them.
    relaxed = space.relaxed_for_size(size_ratio=0.11)
    kept = [f for f in fits if all(f in relaxed.choices[f"format:{n}"] for n in "abcd")]
    assert kept
    relaxed.to_params(relaxed.uniform(kept[0]))  # enqueueable


def test_keeping_keeps_a_format_everywhere_and_round_trips() -> None:
    space = _space(budget=0.5)
    kept = space.keeping(["int3-pc-sym-rtn"])
    for n in "abcd":
        assert "int3-pc-sym-rtn" in kept.choices[f"format:{n}"]
    assert kept.always_kept == ("int3-pc-sym-rtn",)
    with pytest.raises(ValueError, match="not a choice of the grid"):
        space.keeping(["int5-pc-sym-rtn"])
    again = HessianSearchSpace.from_json(kept.to_json())
    assert again.choices == kept.choices and again.formats == kept.formats
    assert json.loads(kept.to_json())["version"] == 2


def test_format_space_json_and_study_round_trip() -> None:
    space = _space()
    text = space.to_json()
    data = json.loads(text)
    assert data["version"] == 2 and data["formats"] == list(space.formats)
    again = HessianSearchSpace.from_json(text)
    assert again.choices == space.choices and again.omega == space.omega
    study = optuna.create_study()
    space.save_to_study(study)
    loaded = HessianSearchSpace.load_from_study(study)
    assert loaded.distributions == space.distributions


def test_prior_weights_favour_small_safe_formats() -> None:
    space = _space(budget=math.inf)
    weights = space.prior_weights(floor=0.0)
    for name, w in weights.items():
        assert len(w) == len(space.choices[name]) and sum(w) == pytest.approx(1.0)

    # Layer c has the least trace: its weight leans further to small formats than layer b's.
    def mean_rank(name: str) -> float:
        w = weights[name]
        return sum(i * x for i, x in enumerate(w)) / (len(w) - 1)

    assert mean_rank("format:c") < mean_rank("format:b")


def test_fixed_layers_take_their_legacy_format() -> None:
    space = _space(fixed_bits={"a": 8})
    assert space.choices["format:a"] == ("int8-pc-sym-rtn",)
    assert space.uniform("int3-g128-asym-gptq").formats["a"] == "int8-pc-sym-rtn"


def test_formats_need_tensors_with_channel_counts() -> None:
    with pytest.raises(ValueError, match="without its channel count"):
        HessianSearchSpace(_layers(), formats=FORMATS)


def test_a_bit_width_space_keeps_a_uniform_bit_width_when_asked() -> None:
    layers = [
        LayerSensitivity("a", 5.0, 100, {2: 4.0, 3: 1.0, 4: 0.25, 8: 0.001}),
        LayerSensitivity("b", 0.1, 100, {2: 4.0, 3: 1.0, 4: 0.25, 8: 0.001}),
    ]
    space = HessianSearchSpace(layers, bits=(2, 3, 4, 8), budget=0.2)
    assert 3 not in space.choices["bits:a"]
    assert space.uniform_formats(size_bits=600) == [3, 2]  # 2 x 100 weights, no scales
    kept = space.keeping([3])
    assert all(3 in kept.choices[f"bits:{n}"] for n in "ab")
    assert kept.to_params(kept.uniform(3)) == {"bits:a": 3, "bits:b": 3}
    # Stored: version 2, and read back with the same choices.
    assert HessianSearchSpace.from_json(kept.to_json()).choices == kept.choices
    # Without always_kept the space is written as version 1, as 0.1.x wrote it.
    assert json.loads(space.to_json())["version"] == 1
