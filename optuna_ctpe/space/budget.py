"""Size and latency budgets as *known* constraints: checked and repaired before a trial runs.

A configuration's size (:mod:`optuna_ctpe.space.size`) and its latency predicted by a lookup
table (HAWQ-V3's, :class:`optuna_ctpe.deploy.latency_table.LatencyTable`) are functions of its
parameters alone. :class:`BudgetConstraint` is that function in the form
:class:`optuna_ctpe.ClusterTPESampler` (``known_constraints=``) reads: called on a parameter dict
it returns one relative excess per budget (``cost / budget - 1``, feasible when all are <= 0, the
values the CLI records with ``set_constraint``); :attr:`~BudgetConstraint.distributions` declares
the parameters it reads; :meth:`~BudgetConstraint.repair` moves an infeasible configuration into
the budget by the exchange rule below.

**The exchange rule.** The ILP of :func:`optuna_ctpe.space.warm_start.ilp_allocation` trades Ω
against cost; its LP relaxation is solved greedily by taking, in turn, the exchange of least Ω
increase per unit of cost saved (the multiple-choice knapsack's exchange argument). The repair
does that from the proposal: while a budget is exceeded, it changes the one parameter whose
change costs the least Ω per unit of *excess removed* (the summed relative excess over the budgets,
``Σ max(0, cost/budget − 1)``), among the changes that reduce the excess. The excess saved is
capped by the excess left, so near the budget the rule prefers the cheapest change that is just
enough over a large cut. Ω is the point estimate of :func:`~optuna_ctpe.space.omega.omega_table`,
as the warm starts read it. The rule is deterministic (no random draw) and ends: each change lowers
the excess. Size grows with every choice, so under a size budget alone it
always fits unless the parameters it may not change already exceed the budget. A latency table
need not be monotone (3 and 4 bits share int4's kernels); when no single change lowers the
excess, the rule starts again from the smallest configuration (every parameter it may change at
its least choice) and returns the better of the two.

Pure Python over the space's records: no torch, and no import of the latency table's module
(the face, :meth:`optuna_ctpe.HessianSearchSpace.latency_constraint`, hands its entries over as
a :class:`LatencyEntries`).
"""

from __future__ import annotations

from collections.abc import Collection
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
import functools
from typing import Any

from optuna.distributions import CategoricalDistribution

from optuna_ctpe._validation import check_real
from optuna_ctpe.space.formats import as_format
from optuna_ctpe.space.formats import format_bits
from optuna_ctpe.space.omega import tied_table
from optuna_ctpe.space.params import BITS_PREFIX
from optuna_ctpe.space.params import Choices
from optuna_ctpe.space.params import FORMAT_PREFIX
from optuna_ctpe.space.params import searched
from optuna_ctpe.space.params import tied_param
from optuna_ctpe.space.params import width_param
from optuna_ctpe.space.params import WIDTH_PREFIX
from optuna_ctpe.space.records import ParamTensor
from optuna_ctpe.space.records import SpaceSpec
from optuna_ctpe.space.size import FLOAT_BITS


__all__ = ["BudgetConstraint", "LatencyEntries", "budget_constraint"]

#: An entry's key: (bit-width, the width ratios of the layer's groups in their order).
EntryKey = tuple[int, tuple[float, ...]]


@dataclass(frozen=True)
class LatencyEntries:
    """A latency lookup table as plain data: per layer, its groups and its entries.

    Attributes:
        layers: Layer name -> (the width groups that prune it, in order; ``(bits, ratios)`` ->
            milliseconds).
        remainder_ms: Milliseconds of the rest of the model, added to every prediction.
    """

    layers: Mapping[str, tuple[tuple[str, ...], Mapping[EntryKey, float]]] = field(hash=False)
    remainder_ms: float


@dataclass(frozen=True, eq=False)
class BudgetConstraint:
    """A size and/or latency budget of a search space, as a known constraint.

    Build it with :func:`budget_constraint` (or the face's ``size_constraint`` and
    ``latency_constraint``), which checks that some configuration fits. Picklable: it holds
    plain records only.

    Attributes:
        spec: The space's validated inputs.
        choices: The space's kept choices (every parameter, searched or not).
        omega: The space's Ω table (point estimates), for the repair's exchange rule.
        size_bits: The size budget in bits, or None.
        latency: The latency entries, or None.
        latency_ms: The latency budget in milliseconds (with ``latency``), or None.
    """

    spec: SpaceSpec
    choices: Choices
    omega: Mapping[str, Mapping[Any, float]]
    size_bits: float | None = None
    latency: LatencyEntries | None = None
    latency_ms: float | None = None

    # -- the known-constraint protocol (see optuna_ctpe.sampler.KnownConstraint) --------------

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the values a call returns, ``"size"`` and/or ``"latency"``."""
        return (("size",) if self.size_bits is not None else ()) + (
            ("latency",) if self.latency is not None else ()
        )

    @property
    def distributions(self) -> dict[str, CategoricalDistribution]:
        """The parameters the budgets read (the space's searched ones, as it suggests them)."""
        return {
            name: CategoricalDistribution(list(self.choices[name]))
            for name in searched(self.choices)
        }

    def __call__(self, params: Mapping[str, Any]) -> tuple[float, ...]:
        """The relative excess over each budget, ``cost / budget - 1`` (feasible when <= 0).

        Args:
            params: The searched parameters (others are ignored; unsearched ones take their
                single choice).

        Raises:
            ValueError: If a searched parameter is missing or off its choices.
        """
        return self._excesses(self._costs(self._values(params)))

    def repair(self, params: Mapping[str, Any], fixed: Collection[str] = ()) -> dict[str, Any]:
        """``params`` moved into the budgets by the exchange rule (see the module docstring).

        Args:
            params: The searched parameters of an infeasible configuration.
            fixed: Parameters the repair must not change (e.g. enqueued ones).

        Returns:
            ``params`` with some searched parameters changed; within the budgets unless the
            parameters in ``fixed`` alone exceed them.
        """
        values = self._values(params)
        free = [n for n in searched(self.choices) if n not in fixed]
        result = self._descend(values, free)
        if _total(self._excesses(self._costs(result))) > 0:
            smallest = {**values, **{n: self._smallest(n) for n in free}}
            restart = self._descend(smallest, free)
            if _total(self._excesses(self._costs(restart))) < _total(
                self._excesses(self._costs(result))
            ):
                result = restart
        return {**dict(params), **{n: result[n] for n in searched(self.choices)}}

    def _smallest(self, name: str) -> Any:
        """``name``'s choice of least storage: its least bit-width, or in a format space the
        format of fewest bits on the layer's tensors (scales and zero points included)."""
        options = self.choices[name]
        if not name.startswith(FORMAT_PREFIX) or len(options) == 1:
            return min(options)
        # Formats rank the same at every width: price them on the unpruned tensors.
        values = {n: 1.0 if n.startswith(WIDTH_PREFIX) else c[0] for n, c in self.choices.items()}
        tensors, _ = self._affected[name]
        return min(
            options, key=lambda c: sum(self._tensor_bits(t, {**values, name: c}) for t in tensors)
        )

    # -- costs -----------------------------------------------------------------------------

    def _values(self, params: Mapping[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, options in self.choices.items():
            if name not in params:
                if len(options) > 1:
                    raise ValueError(f"params lacks the searched parameter {name!r}.")
                values[name] = options[0]
                continue
            if params[name] not in options:
                raise ValueError(
                    f"params[{name!r}]={params[name]!r} is not one of its choices {list(options)}."
                )
            values[name] = params[name]
        return values

    def _tensor_bits(self, t: ParamTensor, values: Mapping[str, Any]) -> float:
        """A tensor's storage under ``values``, as :func:`~optuna_ctpe.space.size.size_bits`."""
        numel, scales = t.numel, t.scales
        for g in (t.out_group, t.in_group):
            if g is not None:
                group = self.spec.groups[g]
                numel = numel // group.n_channels * group.kept(values[width_param(g)])
        if t.scale_group is not None:
            group = self.spec.groups[t.scale_group]
            scales = scales // group.n_channels * group.kept(values[width_param(t.scale_group)])
        if t.layer is not None and self.spec.formats:
            # A format prices its own scales and zero points (space.size.layer_bits).
            fmt = as_format(values[tied_param(self.spec, t.layer)])
            return numel * fmt.bits if scales == 0 else format_bits(fmt, scales, numel // scales)
        bits = values[tied_param(self.spec, t.layer)] if t.layer is not None else FLOAT_BITS
        return numel * bits + scales * FLOAT_BITS

    def _layer_ms(self, layer: str, values: Mapping[str, Any]) -> float:
        assert self.latency is not None
        groups, entries = self.latency.layers[layer]
        key = (
            int(values[tied_param(self.spec, layer)]),
            tuple(float(values[width_param(g)]) for g in groups),
        )
        return entries[key]

    def _costs(self, values: Mapping[str, Any]) -> list[float]:
        if self._additive is not None:
            base, terms = self._additive
            return [
                b + sum(options[values[name]][i] for name, options in terms.items())
                for i, b in enumerate(base)
            ]
        costs = []
        if self.size_bits is not None:
            costs.append(sum(self._tensor_bits(t, values) for t in self.spec.tensors))
        if self.latency is not None:
            costs.append(
                self.latency.remainder_ms
                + sum(self._layer_ms(n, values) for n in self.latency.layers)
            )
        return costs

    def _excesses(self, costs: list[float]) -> tuple[float, ...]:
        budgets = [b for b in (self.size_bits, self.latency_ms) if b is not None]
        return tuple(float(c / b - 1.0) for c, b in zip(costs, budgets))

    # -- the exchange rule -----------------------------------------------------------------

    @functools.cached_property
    def _param_omega(self) -> dict[str, dict[Any, float]]:
        """Ω per parameter, a tie's summed over its layers
        (:func:`~optuna_ctpe.space.omega.tied_table`)."""
        return tied_table(self.spec, self.omega)

    @functools.cached_property
    def _affected(self) -> dict[str, tuple[list[ParamTensor], list[str]]]:
        """Per searched parameter: the tensors whose size and the layers whose latency it
        changes (a change is priced on these alone)."""
        out: dict[str, tuple[list[ParamTensor], list[str]]] = {}
        latency_layers = self.latency.layers if self.latency is not None else {}
        for name in searched(self.choices):
            if name.startswith((BITS_PREFIX, FORMAT_PREFIX)):
                # A tie's parameter changes every layer of the tie.
                tie = self.spec.tie_of(name.split(":", 1)[1])
                tensors = [t for t in self.spec.tensors if t.layer in tie]
                layers = [n for n in tie if n in latency_layers]
            else:
                group = name[len(width_param("")) :]
                tensors = [
                    t
                    for t in self.spec.tensors
                    if group in (t.out_group, t.in_group, t.scale_group)
                ]
                layers = [n for n, (groups, _) in latency_layers.items() if group in groups]
            out[name] = (tensors, layers)
        return out

    def _part_costs(
        self, tensors: list[ParamTensor], layers: list[str], values: Mapping[str, Any]
    ) -> list[float]:
        costs = []
        if self.size_bits is not None:
            costs.append(sum(self._tensor_bits(t, values) for t in tensors))
        if self.latency is not None:
            costs.append(sum(self._layer_ms(n, values) for n in layers))
        return costs

    @functools.cached_property
    def _additive(self) -> tuple[list[float], dict[str, dict[Any, list[float]]]] | None:
        """The costs as a constant plus one term per searched parameter and choice, when every
        tensor and latency layer depends on one searched parameter at most (no searched width
        shares a tensor with a searched bit-width or format); None otherwise.

        A sampler checks its every candidate, so a call should cost a few table lookups, not a
        walk over the model's tensors.
        """
        owner: dict[Any, str] = {}
        for name, (tensors, layers) in self._affected.items():
            for part in [("tensor", id(t)) for t in tensors] + [("layer", n) for n in layers]:
                if owner.setdefault(part, name) != name:
                    return None
        values = {name: options[0] for name, options in self.choices.items()}
        terms = {
            name: {
                option: self._part_costs(tensors, layers, {**values, name: option})
                for option in self.choices[name]
            }
            for name, (tensors, layers) in self._affected.items()
        }
        latency_layers = self.latency.layers if self.latency is not None else {}
        base = self._part_costs(
            [t for t in self.spec.tensors if ("tensor", id(t)) not in owner],
            [n for n in latency_layers if ("layer", n) not in owner],
            values,
        )
        if self.latency is not None:
            base[-1] += self.latency.remainder_ms
        return base, terms

    @functools.cached_property
    def _related(self) -> dict[str, set[str]]:
        """Per searched parameter, the parameters whose part costs a change of it alters (those
        sharing a tensor or a latency layer with it, itself included)."""
        affected = {
            name: ({id(t) for t in tensors}, set(layers))
            for name, (tensors, layers) in self._affected.items()
        }
        return {
            name: {
                other
                for other, (other_tensors, other_layers) in affected.items()
                if tensors & other_tensors or layers & other_layers
            }
            for name, (tensors, layers) in affected.items()
        }

    def _descend(self, values: dict[str, Any], free: list[str]) -> dict[str, Any]:
        """The greedy exchange from ``values``, changing only ``free`` parameters."""
        values = dict(values)
        affected = self._affected
        costs = self._costs(values)
        excess = _total(self._excesses(costs))
        # Part costs of every option of a parameter, kept until a change touches its tensors:
        # a step then re-prices a few parameters instead of all of them.
        parts: dict[str, dict[Any, list[float]]] = {}

        def option_costs(name: str) -> dict[Any, list[float]]:
            if name not in parts:
                tensors, layers = affected[name]
                parts[name] = {
                    option: self._part_costs(tensors, layers, {**values, name: option})
                    for option in self.choices[name]
                }
            return parts[name]

        while excess > 0:
            best: tuple[float, str, Any, list[float]] | None = None
            for name in free:
                table, omega = option_costs(name), self._param_omega[name]
                current = values[name]
                before = table[current]
                for option, after in table.items():
                    if option == current:
                        continue
                    new_costs = [c - b + a for c, b, a in zip(costs, before, after)]
                    saved = excess - _total(self._excesses(new_costs))
                    if saved <= 1e-12:
                        continue
                    rate = (omega[option] - omega[current]) / saved
                    if best is None or rate < best[0]:
                        best = (rate, name, option, new_costs)
            if best is None:
                break  # no single change lowers the excess
            _, name, option, costs = best
            values[name] = option
            for other in self._related[name]:
                parts.pop(other, None)
            excess = _total(self._excesses(costs))
        return values


def _total(excesses: tuple[float, ...]) -> float:
    return float(sum(max(0.0, e) for e in excesses))


def budget_constraint(
    spec: SpaceSpec,
    choices: Choices,
    omega: Mapping[str, Mapping[Any, float]],
    *,
    size_bits: float | None = None,
    latency: LatencyEntries | None = None,
    latency_ms: float | None = None,
) -> BudgetConstraint:
    """The known constraint of a size and/or latency budget, checked for a configuration that
    fits.

    Args:
        spec: The space's validated inputs.
        choices: The space's kept choices.
        omega: The space's Ω table (point estimates).
        size_bits: Size budget in bits (> 0), or None.
        latency: The latency entries of every quantized layer at every kept choice, or None.
        latency_ms: Latency budget in milliseconds (> 0), with ``latency``.

    Raises:
        ValueError: If neither budget is given, ``latency`` and ``latency_ms`` do not come
            together, a latency entry the kept choices need is missing, or no configuration of
            the space fits (the message gives the smallest size, or the least latency found).
    """
    if size_bits is None and latency is None:
        raise ValueError("give a size budget, a latency budget, or both.")
    if (latency is None) != (latency_ms is None):
        raise ValueError("latency and latency_ms must be given together.")
    if size_bits is not None:
        size_bits = check_real(size_bits, "size_bits", minimum=0.0, open_minimum=True)
    if latency is not None:
        latency_ms = check_real(latency_ms, "latency_ms", minimum=0.0, open_minimum=True)
        _check_entries(spec, choices, latency)
    constraint = BudgetConstraint(spec, choices, omega, size_bits, latency, latency_ms)
    smallest = {n: constraint._smallest(n) for n in choices}
    fitted = constraint.repair(smallest)
    excesses = constraint(fitted)
    if any(e > 0 for e in excesses):
        costs = constraint._costs(constraint._values(fitted))
        found = ", ".join(
            f"{name} {cost:.6g} {unit} against a budget of {budget:.6g}"
            for name, cost, unit, budget in zip(
                constraint.names,
                costs,
                [u for u, b in (("bits", size_bits), ("ms", latency_ms)) if b is not None],
                [b for b in (size_bits, latency_ms) if b is not None],
            )
        )
        fp32 = FLOAT_BITS * sum(t.numel for t in spec.tensors)
        smallest_bits = (
            constraint._costs(smallest)[0]
            if size_bits is not None
            else sum(constraint._tensor_bits(t, smallest) for t in spec.tensors)
        )
        raise ValueError(
            f"no configuration of the space fits the budget: the smallest configuration has "
            f"{smallest_bits:.0f} bits ({smallest_bits / fp32:.4f} of fp32), and the best found "
            f"has {found}."
        )
    return constraint


def _check_entries(spec: SpaceSpec, choices: Choices, latency: LatencyEntries) -> None:
    """Every quantized layer has an entry at every kept combination of its choices."""
    if set(latency.layers) != set(spec.layers):
        raise ValueError(
            f"the latency table's layers {sorted(latency.layers)} are not the space's "
            f"{sorted(spec.layers)}."
        )
    for name, (groups, entries) in latency.layers.items():
        keys = [(int(b), ()) for b in choices[tied_param(spec, name)]]
        for g in groups:
            keys = [(b, (*r, float(w))) for b, r in keys for w in choices[width_param(g)]]
        missing = [k for k in keys if k not in entries]
        if missing:
            raise ValueError(
                f"the latency table has no entry for layer {name!r} at (bits, widths) "
                f"{missing[0]}: measure it with the space's grids."
            )
