"""Size and latency budgets as known constraints (optuna_ctpe.space.budget, the face's
size_constraint and latency_constraint)."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest

from optuna_ctpe.search_space import HessianSearchSpace
from optuna_ctpe.search_space import LayerSensitivity
from optuna_ctpe.search_space import ParamTensor
from optuna_ctpe.search_space import WidthGroupSensitivity


BITS = (2, 3, 4, 6, 8)


def _space(n_layers: int = 8, seed: int = 0) -> HessianSearchSpace:
    """Layers of different sizes and sensitivities, nothing pruned or fixed."""
    rng = np.random.default_rng(seed)
    layers = [
        LayerSensitivity(
            f"l{i}",
            float(10 ** rng.uniform(-3, 1)),
            int(rng.integers(50, 2000)),
            {b: 4.0 ** (-b) for b in BITS},
        )
        for i in range(n_layers)
    ]
    return HessianSearchSpace.from_sensitivities(layers, bits=BITS, budget=math.inf)


def _with_groups() -> HessianSearchSpace:
    """conv(1->4) -> conv(4->8) -> fc(8->2); groups prune conv outputs (and the scales)."""
    bits = (2, 4, 8)
    layers = [
        LayerSensitivity("conv1", 0.5, 36, {b: 1.0 / b**2 for b in bits}),
        LayerSensitivity("conv2", 2.0, 288, {b: 8.0 / b**2 for b in bits}),
        LayerSensitivity("fc", 1.0, 16, {b: 0.5 / b**2 for b in bits}),
    ]
    groups = [
        WidthGroupSensitivity("conv1", 4, 1.0, {0.5: 0.01, 1.0: 0.0}),
        WidthGroupSensitivity("conv2", 8, 2.0, {0.5: 1.0, 1.0: 0.0}),
    ]
    tensors = [
        ParamTensor("conv1.weight", 36, "conv1", out_group="conv1", scales=4, scale_group="conv1"),
        ParamTensor("conv1.bias", 4, None, out_group="conv1"),
        ParamTensor(
            "conv2.weight",
            288,
            "conv2",
            out_group="conv2",
            in_group="conv1",
            scales=8,
            scale_group="conv2",
        ),
        ParamTensor("conv2.bias", 8, None, out_group="conv2"),
        ParamTensor("fc.weight", 16, "fc", in_group="conv2", scales=2),
        ParamTensor("fc.bias", 2),
    ]
    return HessianSearchSpace.from_sensitivities(
        layers, groups, tensors=tensors, bits=bits, widths=(0.5, 1.0), budget=math.inf
    )


def _every_config(space: HessianSearchSpace) -> list[dict]:
    dists = space.distributions
    return [
        dict(zip(dists, values))
        for values in itertools.product(*(d.choices for d in dists.values()))
    ]


@pytest.mark.parametrize("make", [_space, _with_groups])
def test_size_values_are_the_relative_excess(make) -> None:  # type: ignore[no-untyped-def]
    space = make()
    constraint = space.size_constraint(0.12)
    rng = np.random.default_rng(1)
    for _ in range(20):
        params = {
            n: d.choices[rng.integers(len(d.choices))] for n, d in space.distributions.items()
        }
        size = space.size(space.config_from_params(params))
        (value,) = constraint(params)
        assert value == pytest.approx(size / (0.12 * space.fp32_bits) - 1.0)
    assert constraint.names == ("size",)
    assert constraint.distributions == space.distributions


@pytest.mark.parametrize("make", [_space, _with_groups])
def test_repair_fits_every_configuration(make) -> None:  # type: ignore[no-untyped-def]
    space = make()
    target = 0.1 * space.fp32_bits
    constraint = space.size_constraint(size_bits=int(target))
    infeasible = [p for p in _every_config(space) if constraint(p)[0] > 0][:200]
    assert infeasible
    for params in infeasible:
        repaired = constraint.repair(params)
        assert constraint(repaired)[0] <= 0
        assert space.size(space.config_from_params(repaired)) <= int(target)
        # Only lowered: the rule never spends size on a configuration it has to shrink.
        assert space.size(space.config_from_params(repaired)) < space.size(
            space.config_from_params(params)
        )


def test_repair_follows_the_exchange_rule() -> None:
    """Just over the budget, the repair makes the one change of least Ω per bit saved."""
    space = _space()
    omega = space.omega
    safest = {n: 8 for n in space.distributions}
    full = space.size(space.config_from_params(safest))
    # 8 -> 6 bits on the smallest layer saves 2 bits per weight of it; a budget 1 bit short.
    constraint = space.size_constraint(size_bits=full - 1)
    repaired = constraint.repair(safest)
    changed = {n for n in safest if repaired[n] != safest[n]}
    assert len(changed) == 1
    (name,) = changed
    n_params = {f"bits:{n}": s.n_params for n, s in space.sensitivities.items()}
    # The cheapest single change that removes the 1-bit excess, by Ω increase (the saving is
    # capped at the excess, so every sufficient change saves the same).
    best = min(
        ((n, b) for n in safest for b in space.choices[n] if b < 8),
        key=lambda nb: omega[nb[0]][nb[1]] - omega[nb[0]][8],
    )
    assert (name, repaired[name]) == best
    assert n_params[name] * (8 - repaired[name]) >= 1


def test_repair_keeps_fixed_parameters() -> None:
    space = _space()
    params = {n: 8 for n in space.distributions}
    fixed = {"bits:l0", "bits:l3"}
    # Within reach with the fixed ones at 8 bits: the others at 3 bits.
    reachable = {n: 8 if n in fixed else 3 for n in params}
    constraint = space.size_constraint(size_bits=space.size(space.config_from_params(reachable)))
    repaired = constraint.repair(params, fixed)
    assert constraint(repaired)[0] <= 0
    assert all(repaired[n] == 8 for n in fixed)
    assert constraint.repair(params, fixed) == repaired  # deterministic


def test_repaired_omega_beats_uniform_precision() -> None:
    """From the safest configuration the exchange rule ends no worse (in Ω) than the uniform
    precision that fits."""
    space = _space(n_layers=12, seed=3)
    for ratio in (0.09, 0.12, 0.2):
        constraint = space.size_constraint(ratio)
        repaired = constraint.repair({n: 8 for n in space.distributions})
        fitting = [b for b in BITS if space.size(space.uniform(b)) <= ratio * space.fp32_bits]
        uniform = space.perturbation(space.uniform(max(fitting)))
        assert space.perturbation(space.config_from_params(repaired)) <= uniform + 1e-12


def test_infeasible_budget_names_the_smallest_size() -> None:
    space = _space()
    smallest = space.size(space.uniform(2))
    with pytest.raises(ValueError, match=f"smallest configuration has {smallest} bits"):
        space.size_constraint(size_bits=smallest - 1)
    space.size_constraint(size_bits=smallest)  # exactly the smallest fits


def test_picklable() -> None:
    constraint = _with_groups().size_constraint(0.2)
    again = pickle.loads(pickle.dumps(constraint))
    params = {n: d.choices[-1] for n, d in constraint.distributions.items()}
    assert again(params) == constraint(params)
    assert again.repair(params) == constraint.repair(params)


def test_validation() -> None:
    space = _space()
    with pytest.raises(ValueError, match="exactly one"):
        space.size_constraint()
    with pytest.raises(ValueError, match="size_ratio"):
        space.size_constraint(1.5)
    constraint = space.size_constraint(0.2)
    with pytest.raises(ValueError, match="lacks the searched parameter"):
        constraint({})
    with pytest.raises(ValueError, match="not one of its choices"):
        constraint({**{n: 8 for n in space.distributions}, "bits:l0": 5})


# -- latency ------------------------------------------------------------------------------------


def _table(space: HessianSearchSpace, seed: int = 0):  # type: ignore[no-untyped-def]
    """A latency table of the space's layers: int4 containers share their time (3 and 4 bits),
    so latency is not monotone in the bits."""
    from optuna_ctpe.deploy.latency_table import LatencyTable
    from optuna_ctpe.deploy.latency_table import LayerLatency

    rng = np.random.default_rng(seed)
    layers = {}
    for name in space.sensitivities:
        scale = float(rng.uniform(0.5, 2.0))
        container = {2: 0.9, 3: 0.7, 4: 0.7, 6: 1.0, 8: 1.0, 32: 2.0}
        layers[name] = LayerLatency(name, (), {(b, ()): scale * container[b] for b in (*BITS, 32)})
    return LatencyTable(layers, 0.5, 10.0, 1, {"runtime": "test"}, 0.01)


def test_latency_values_match_the_table_and_repair_fits() -> None:
    space = _space()
    table = _table(space)
    fastest = table.predict(space.uniform(3))
    budget = 1.05 * fastest
    constraint = space.latency_constraint(table, budget)
    assert constraint.names == ("latency",)
    rng = np.random.default_rng(2)
    for _ in range(30):
        params = {
            n: d.choices[rng.integers(len(d.choices))] for n, d in space.distributions.items()
        }
        (value,) = constraint(params)
        assert value == pytest.approx(table.predict(space.config_from_params(params)) / budget - 1)
        repaired = constraint.repair(params)
        assert constraint(repaired)[0] <= 0


def test_latency_of_a_tied_space_reads_every_layer_of_a_tie() -> None:
    space = _space().tied([("l0", "l3", "l5"), ("l1", "l2")])
    table = _table(space)
    budget = 1.05 * table.predict(space.uniform(3))
    constraint = space.latency_constraint(table, budget, size_ratio=0.2)
    assert set(constraint.distributions) == set(space.distributions)
    rng = np.random.default_rng(3)
    for _ in range(30):
        params = {
            n: d.choices[rng.integers(len(d.choices))] for n, d in space.distributions.items()
        }
        config = space.config_from_params(params)
        size, latency = constraint(params)
        # The followers' entries are read at their leader's bit-width.
        assert latency == pytest.approx(table.predict(config) / budget - 1)
        assert size == pytest.approx(space.size(config) / (0.2 * space.fp32_bits) - 1)
        repaired = space.config_from_params(constraint.repair(params))
        assert all(v <= 0 for v in constraint(space.to_params(repaired)))
        assert repaired.bits["l3"] == repaired.bits["l5"] == repaired.bits["l0"]


def test_latency_and_size_together() -> None:
    space = _space()
    table = _table(space)
    constraint = space.latency_constraint(
        table, 1.2 * table.predict(space.uniform(4)), size_ratio=0.1
    )
    assert constraint.names == ("size", "latency")
    repaired = constraint.repair({n: 8 for n in space.distributions})
    assert all(v <= 0 for v in constraint(repaired))


def test_latency_errors() -> None:
    space = _space()
    table = _table(space)
    with pytest.raises(ValueError, match="no configuration of the space fits"):
        space.latency_constraint(table, 0.5 * table.predict(space.uniform(3)))
    with pytest.raises(ValueError, match="latency_ms"):
        space.latency_constraint(table, -1.0)
    other = _space(n_layers=3)
    with pytest.raises(ValueError, match="layers"):
        other.latency_constraint(table, 100.0)


# -- relaxing the pruning for a tight budget ------------------------------------------------------


def test_keep_allocation_keeps_the_unpruned_grids_warm_starts() -> None:
    layers = [
        LayerSensitivity(f"l{i}", float(t), n, {b: 4.0 ** (-b) for b in BITS})
        for i, (t, n) in enumerate(
            [(5.0, 400), (0.01, 3000), (1.0, 800), (20.0, 200), (0.1, 1500)]
        )
    ]
    space = HessianSearchSpace.from_sensitivities(layers, bits=BITS, budget=1.0)
    ratio = 2.5 / 32
    relaxed = space.relaxed_for_size(ratio)
    kept = space.relaxed_for_size(ratio, keep_allocation=True)
    allocations = space.with_budget(math.inf).warm_starts(ratio, n=3)
    assert kept.budget >= relaxed.budget
    for params in allocations:
        assert all(value in kept.choices[name] for name, value in params.items())
    # The plain relaxation does not keep them here: the option is what readmits them.
    assert not all(
        value in relaxed.choices[name] for params in allocations for name, value in params.items()
    )
    # Without the option, the relaxation is as it was.
    assert relaxed.choices == space.relaxed_for_size(ratio, keep_allocation=False).choices
