"""Ties without torch: layers that must share one choice (issue 16, item 6). Validation, one
parameter per tie, suggest under ClusterTPESampler and TPESampler, pruning, the ILP and warm
starts, the repair of a known constraint, priors, and versioned JSON."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest

from optuna_ctpe import ClusterTPESampler
from optuna_ctpe import HessianSearchSpace
from optuna_ctpe.space.omega import omega_reference
from optuna_ctpe.space.records import LayerSensitivity
from optuna_ctpe.space.records import ParamTensor
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import WidthGroupSensitivity
from optuna_ctpe.space.size import layer_bits
from optuna_ctpe.space.warm_start import warm_start_configs


BITS = (2, 3, 4, 6, 8)
FORMATS = (
    "int2-g128-asym-gptq",
    "int3-g128-asym-gptq",
    "int3-pc-sym-rtn",
    "int4-g128-asym-gptq",
    "int4-pc-sym-rtn",
    "int8-pc-sym-rtn",
)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# "q", "k", "v" tied; "up" and "gate" tied; "o" and "down" alone. Sensitivities differ by
# orders of magnitude inside each tie, so an untied ILP gives tied layers different choices.
NAMES = ("q", "k", "v", "o", "gate", "up", "down")
TRACES = (0.01, 5.0, 0.2, 1.0, 3.0, 0.001, 0.5)
SIZES = (256, 256, 128, 256, 512, 512, 512)
TIES = [("q", "k", "v"), ("gate", "up")]


def _layers(grid=BITS) -> list[LayerSensitivity]:  # type: ignore[no-untyped-def]
    out = []
    for i, (n, t, size) in enumerate(zip(NAMES, TRACES, SIZES)):
        if grid == BITS:
            errors = {b: size * 4.0 ** (-b) for b in BITS}
        else:
            base = {f: 4.0 ** (-int(f[3])) for f in FORMATS}
            errors = {
                f: size * e * (1 + i / 10) * (0.7 if "gptq" in f else 1.0) for f, e in base.items()
            }
        out.append(LayerSensitivity(n, t, size, errors))
    return out


def _bits_space(**kwargs) -> HessianSearchSpace:  # type: ignore[no-untyped-def]
    kwargs.setdefault("budget", math.inf)
    return HessianSearchSpace(_layers(), bits=BITS, **kwargs)


def _format_space(**kwargs) -> HessianSearchSpace:  # type: ignore[no-untyped-def]
    kwargs.setdefault("budget", math.inf)
    tensors = [
        ParamTensor(f"{n}.weight", size * 128, n, scales=size) for n, size in zip(NAMES, SIZES)
    ]
    layers = [
        LayerSensitivity(layer.name, layer.mean_trace, layer.n_params * 128, layer.errors)
        for layer in _layers(FORMATS)
    ]
    return HessianSearchSpace(layers, tensors=tensors, formats=FORMATS, **kwargs)


def _grouped_space(**kwargs) -> HessianSearchSpace:  # type: ignore[no-untyped-def]
    """Bits and widths: "a" and "b" read the same input; "c" reads their group's outputs."""
    bits = (2, 4, 8)
    layers = [
        LayerSensitivity("a", 0.01, 64, {b: 4.0 ** (-b) for b in bits}),
        LayerSensitivity("b", 4.0, 64, {b: 4.0 ** (-b) for b in bits}),
        LayerSensitivity("c", 1.0, 128, {b: 4.0 ** (-b) for b in bits}),
    ]
    groups = [WidthGroupSensitivity("a", 8, 1.0, {0.5: 0.01, 1.0: 0.0})]
    tensors = [
        ParamTensor("a.weight", 64, "a", out_group="a", scales=8, scale_group="a"),
        ParamTensor("b.weight", 64, "b", scales=8),
        ParamTensor("c.weight", 128, "c", in_group="a", scales=8),
        ParamTensor("c.bias", 8),
    ]
    kwargs.setdefault("budget", math.inf)
    return HessianSearchSpace(
        layers, groups, tensors=tensors, bits=bits, widths=(0.5, 1.0), **kwargs
    )


def _tied(config: QuantConfig, ties) -> bool:  # type: ignore[no-untyped-def]
    choices = config.layer_choices()
    return all(len({choices[n] for n in tie}) == 1 for tie in ties)


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ties, match",
    [
        ([("q", "nope")], r"ties\[0\] names unknown layers \['nope'\]"),
        (
            [("q", "k"), ("v", "k")],
            r"ties\[1\] holds the layers \['k'\], already tied by ties\[0\]",
        ),
        ([("q",)], r"ties\[0\] must tie two or more layers, got \['q'\]"),
        ([()], r"ties\[0\] must tie two or more layers"),
        ([("q", "q")], r"ties\[0\] names the layers \['q'\] more than once"),
        ([("q", "down")], r"ties\[0\] holds the fixed layers \['down'\]"),
        (["qk"], r"ties\[0\] must be a sequence of layer names, got 'qk'"),
        ("q", r"ties must be a sequence of sequences"),
        ([("q", 3)], r"ties\[0\] must hold layer names, got 3"),
    ],
)
def test_each_rule_of_ties_is_checked(ties, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        _bits_space(fixed_bits={"down": 8}, ties=ties)


def test_ties_are_stored_in_model_order() -> None:
    space = _bits_space(ties=[("up", "gate"), ("v", "q", "k")])
    assert space.ties == (("q", "k", "v"), ("gate", "up"))
    assert space.spec.leader("v") == "q" and space.spec.leader("o") == "o"
    assert _bits_space().ties == ()


def test_tied_fixes_a_tie_holding_a_fixed_layer() -> None:
    space = _bits_space(fixed_bits={"q": 8}).tied(TIES)
    assert space.ties == (("gate", "up"),)
    assert dict(space.fixed_bits) == {"q": 8, "k": 8, "v": 8}
    with pytest.raises(ValueError, match=r"fixed layers of different bit-widths \[4, 8\]"):
        _bits_space(fixed_bits={"q": 8, "v": 4}).tied(TIES)
    # tied replaces the ties; () unties.
    assert _bits_space(ties=TIES).tied(()).ties == ()


def test_a_configuration_breaking_a_tie_is_refused() -> None:
    space = _bits_space(ties=TIES)
    bits = dict.fromkeys(NAMES, 4)
    assert space.size(QuantConfig(bits)) > 0
    broken = QuantConfig({**bits, "k": 8})
    for call in (space.size, space.perturbation, space.to_params):
        with pytest.raises(ValueError, match=r"breaks the tie \['q', 'k', 'v'\].*\['k'\] differ"):
            call(broken)
    # Untied, the same configuration is fine.
    assert _bits_space().size(broken) > 0


# -- one parameter per tie --------------------------------------------------------------------


@pytest.mark.parametrize("make", [_bits_space, _format_space])
def test_a_tie_is_one_parameter(make) -> None:  # type: ignore[no-untyped-def]
    untied, tied = make(), make(ties=TIES)
    prefix = "format:" if tied.formats else "bits:"
    assert len(untied.distributions) == len(NAMES)
    assert len(tied.distributions) == len(NAMES) - sum(len(t) - 1 for t in TIES)
    assert set(tied.distributions) == {prefix + n for n in ("q", "o", "gate", "down")}
    assert set(tied.choices) == set(tied.distributions)
    assert set(tied.prior_weights()) == set(tied.distributions)
    assert tied.log10_size_before == pytest.approx(4 * math.log10(len(tied.spec.grid)))
    params = {name: d.choices[0] for name, d in tied.distributions.items()}
    config = tied.config_from_params({**params, prefix + "k": "ignored"})
    assert _tied(config, TIES) and config.layer_choices()["v"] == params[prefix + "q"]
    assert tied.to_params(config) == params
    assert tied.config_from_params(tied.to_params(config)) == config
    # keeping and with_budget keep the ties.
    assert tied.keeping([tied.spec.grid[-1]]).ties == tied.ties
    assert tied.with_budget(1.0).ties == tied.ties


@pytest.mark.parametrize("make", [_bits_space, _format_space, _grouped_space])
@pytest.mark.parametrize("sampler", ["ctpe", "tpe"])
def test_every_suggested_configuration_ties(make, sampler) -> None:  # type: ignore[no-untyped-def]
    ties = [("a", "b")] if make is _grouped_space else TIES
    space = make(ties=ties, budget=16.0)
    target = 0.5 * space.size(space.uniform(space.spec.grid[-1]))
    if sampler == "ctpe":
        chosen = ClusterTPESampler(
            seed=0,
            n_startup_trials=5,
            prior_weights=space.prior_weights(),
            known_constraints=space.size_constraint(size_bits=int(target)),
        )
    else:
        chosen = optuna.samplers.TPESampler(seed=0, n_startup_trials=5)
    study = optuna.create_study(sampler=chosen)
    configs = []

    def objective(trial: optuna.Trial) -> float:
        config = space.suggest(trial)
        configs.append(config)
        assert set(trial.params) == set(space.distributions)
        return space.perturbation(config) + space.size(config) / space.fp32_bits

    study.optimize(objective, n_trials=25)
    assert len(configs) == 25 and all(_tied(c, ties) for c in configs)
    # Tied layers really vary together (the test is not vacuous).
    assert len({c.layer_choices()[ties[0][1]] for c in configs}) > 1
    if sampler == "ctpe":
        assert all(space.size(c) <= target for c in configs[5:])


# -- pruning, priors ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_bits_space, _format_space])
def test_a_tie_keeps_what_all_its_layers_keep(make) -> None:  # type: ignore[no-untyped-def]
    budget = 0.25 if make is _format_space else 4.0
    untied, tied = make(budget=budget), make(budget=budget, ties=TIES)
    prefix = "format:" if tied.formats else "bits:"
    for tie in TIES:
        each = [set(untied.choices[prefix + n]) for n in tie]
        common = set.intersection(*each)
        kept = tied.choices[prefix + tie[0]]
        assert set(kept) == (common or set.union(*each))
        # Smallest first by the tie's stored bits.
        full = dict.fromkeys(tied.spec.groups, 1.0)
        sizes = [sum(layer_bits(tied.spec, n, c, full) for n in tie) for c in kept]
        assert sizes == sorted(sizes)
    # The pruning is not vacuous: the sensitive "k" loses choices that "q" keeps.
    assert set(untied.choices[prefix + "k"]) < set(untied.choices[prefix + "q"])
    assert tied.choices[prefix + "q"] == untied.choices[prefix + "k"]
    # Untouched layers keep their choices.
    assert tied.choices[prefix + "o"] == untied.choices[prefix + "o"]


def test_priors_weigh_a_tie_by_its_summed_omega() -> None:
    tied = _bits_space(ties=TIES)
    omega, scale = tied.omega, omega_reference(tied.spec)
    summed = np.array([sum(omega[f"bits:{n}"][b] for n in TIES[0]) for b in BITS])
    logits = ((1 - np.array(BITS) / 8) - np.log1p(summed / scale)) / 0.5
    expected = np.exp(logits - logits.max())
    expected = 0.9 * expected / expected.sum() + 0.1 / len(BITS)
    assert tied.prior_weights()["bits:q"] == pytest.approx(expected.tolist())
    # Not the leader's own Ω: "q" alone is nearly insensitive and would favour 2 bits.
    assert _bits_space().prior_weights()["bits:q"] != pytest.approx(expected.tolist())


# -- the ILP, warm starts and the repair ------------------------------------------------------


@pytest.mark.parametrize("make", [_bits_space, _format_space, _grouped_space])
def test_warm_starts_tie_and_fit(make) -> None:  # type: ignore[no-untyped-def]
    ties = [("a", "b")] if make is _grouped_space else TIES
    untied, tied = make(), make(ties=ties)
    ratio = 0.6 if make is _grouped_space else 0.4
    target = ratio * untied.size(untied.uniform(untied.spec.grid[-1]))
    # Untied, the ILP gives tied layers different choices: the test can fail.
    untied_configs = warm_start_configs(untied.spec, untied.choices, untied.omega, target, 3)
    assert not all(_tied(c, ties) for c in untied_configs)
    configs = warm_start_configs(tied.spec, tied.choices, tied.omega, target, 3)
    assert configs and all(_tied(c, ties) for c in configs)
    assert all(tied.size(c) <= target for c in configs)
    for params in tied.warm_starts(size_bits=int(target), n=3):
        assert set(params) <= set(tied.distributions)
        config = tied.config_from_params(params)
        assert _tied(config, ties) and tied.size(config) <= target
    # The tied ILP is exact over tied configurations: no tied configuration of the grid
    # within the target has less Ω (checked by enumeration on the small grouped space).
    if make is _grouped_space:
        dists = tied.distributions
        every = [
            tied.config_from_params(dict(zip(dists, values)))
            for values in itertools.product(*(d.choices for d in dists.values()))
        ]
        best = min(tied.perturbation(c) for c in every if tied.size(c) <= target)
        assert tied.perturbation(configs[0]) == pytest.approx(best)


def test_measured_warm_starts_tie() -> None:
    tied = _bits_space(ties=TIES)
    target = 0.4 * tied.size(tied.uniform(8))
    calls = []

    def measure(config: QuantConfig) -> float:
        calls.append(config)
        return 3 * tied.perturbation(config)  # always a miss: the table is corrected

    for params in tied.warm_starts(size_bits=int(target), n=3, measure=measure):
        assert _tied(tied.config_from_params(params), TIES)
    assert calls and all(_tied(c, TIES) for c in calls)


@pytest.mark.parametrize("make", [_bits_space, _format_space, _grouped_space])
def test_repair_moves_a_tie_as_one(make) -> None:  # type: ignore[no-untyped-def]
    ties = [("a", "b")] if make is _grouped_space else TIES
    space = make(ties=ties)
    ratio = 0.6 if make is _grouped_space else 0.35
    target = ratio * space.size(space.uniform(space.spec.grid[-1]))
    constraint = space.size_constraint(size_bits=int(target))
    assert set(constraint.distributions) == set(space.distributions)
    rng = np.random.default_rng(0)
    for _ in range(30):
        params = {
            n: d.choices[rng.integers(len(d.choices))] for n, d in space.distributions.items()
        }
        config = space.config_from_params(params)
        # The constraint prices the tie on all its layers: its value is the exact size's.
        (excess,) = constraint(params)
        assert excess == pytest.approx(space.size(config) / int(target) - 1)
        repaired = constraint.repair(params)
        assert set(repaired) == set(params)
        fixed = space.config_from_params(repaired)
        assert _tied(fixed, ties) and space.size(fixed) <= int(target)


def test_relaxed_for_size_keeps_the_ties() -> None:
    space = _bits_space(budget=1.0, ties=TIES)
    relaxed = space.relaxed_for_size(0.1)
    assert relaxed.ties == space.ties
    smallest = relaxed.config_from_params(
        {n: d.choices[0] for n, d in relaxed.distributions.items()}
    )
    assert _tied(smallest, TIES) and relaxed.size(smallest) <= 0.1 * relaxed.fp32_bits


# -- JSON ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_bits_space, _format_space, _grouped_space])
def test_json_round_trip_keeps_the_ties(make) -> None:  # type: ignore[no-untyped-def]
    ties = [("a", "b")] if make is _grouped_space else TIES
    space = make(ties=ties, budget=4.0)
    data = json.loads(space.to_json())
    assert data["version"] == 3 and data["ties"] == [list(t) for t in space.ties]
    loaded = HessianSearchSpace.from_json(space.to_json())
    assert loaded.ties == space.ties and dict(loaded.choices) == dict(space.choices)
    study = optuna.create_study()
    space.save_to_study(study)
    assert HessianSearchSpace.load_from_study(study).ties == space.ties
    # Without ties the file is what it was (no "ties" key, the old version).
    plain = json.loads(make(budget=4.0).to_json())
    assert "ties" not in plain and plain["version"] == (2 if space.formats else 1)
    # A file of version 2 naming ties is not read as tied (ties are a version-3 field), and
    # its choices, which name every layer, then load as the untied space they are.
    untied = json.loads(make(budget=4.0).to_json())
    untied["version"] = 2
    assert HessianSearchSpace.from_json({**untied, "ties": data["ties"]}).ties == ()


def test_a_space_file_without_ties_loads_untied() -> None:
    space = HessianSearchSpace.from_json((FIXTURES / "space_0_1.json").read_text())
    assert space.ties == () and space.spec.leaders() == list(space.spec.layers)


def test_hand_edited_ties_are_refused() -> None:
    data = json.loads(_bits_space(ties=TIES).to_json())
    data["ties"] = [["q", "k"]]
    with pytest.raises(ValueError, match="stored choices differ"):
        HessianSearchSpace.from_json(data)
    data["ties"] = [["q"]]
    with pytest.raises(ValueError, match=r"ties\[0\] must tie two or more layers"):
        HessianSearchSpace.from_json(data)
