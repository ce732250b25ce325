"""The pruning rule of a Hessian search space, and the prior weights over what it keeps.

arXiv:2308.06422 prunes its search space with "Hessian-based pruning" but does not publish the
rule. This module implements OUR interpretation, built from HAWQ-V2 and NNCF's HAWQ:

1. Every choice gets the HAWQ-V2 perturbation ``Ω = mean_trace × ‖ΔW‖²``
   (:func:`optuna_ctpe.space.omega.choice_sensitivity`): ``mean_trace`` is the layer's Hessian
   trace divided by its parameter count, ``‖ΔW‖²`` is ``‖Q_b(W) − W‖²`` for a bit-width ``b``
   or the squared norm of the removed weights for a width ratio. By a second-order Taylor
   expansion at a minimum, with the layer's Hessian taken as ``mean_trace × I``, ``Ω / 2``
   estimates the loss increase.
2. The reference ``Ω_ref`` is the largest ``Ω`` over the searched layers at the median bit
   choice (4 bits for the default grid ``(2, 3, 4, 6, 8)``): the damage of quantizing the most
   fragile layer to a middling precision. A choice is kept if ``Ω <= budget × Ω_ref``, so
   ``budget`` is dimensionless and means the same on every model. Since ``Ω`` of uniform
   rounding falls about 4× per bit, the default ``budget=16`` admits choices up to about as
   harmful as the most fragile layer two bits below the median; ``budget=1`` (tried first)
   pruned the best configurations of the digits CNN away. Widths use the same threshold, so a
   width ratio survives only if it perturbs the loss no more than that either.
3. The safest choice (the highest bit-width, the widest ratio) is always kept.
4. Monotonicity (as NNCF's HAWQ enumerates only such sequences): a layer with a larger mean
   trace never has a smaller minimum bit-width than a less sensitive layer.
5. The first and last weight layers are fixed to ``keep_first_last_bits`` (8 by default, as in
   HAQ and HAWQ) or searched like the others when it is None.
6. Uncertainty: steps 1 and 4 (and the priors) read a layer's trace as its upper confidence
   bound ``mean_trace + z × trace_stderr`` (``z = spec.trace_z``, 1 by default;
   :func:`optuna_ctpe.space.omega.upper_trace`), so a layer whose trace is lost in its noise
   keeps only its safer choices instead of passing for insensitive; ``Ω_ref`` stays the point
   estimate. :func:`uncertain_layers` names the layers whose trace cannot be told from zero
   (including negative estimates clipped to 0), for reports.

7. Formats (a format space, :attr:`~optuna_ctpe.space.records.SpaceSpec.formats`): a layer's
   choices are weight formats, and before step 1 each layer drops the formats *dominated* in
   both its stored size and its weight error (another format of at most its size and at most
   its error; of two equal in both, the later of the grid): the survivors, smallest first,
   lose error with every step up in size, as bit-widths do. Step 3 keeps the survivor of least
   error (the largest); step 4 reads "minimum bit-width" as the rank, in the grid's order by
   the model's size in each format, of the layer's smallest kept format (a layer whose kept
   formats all rank below the floor keeps its safest one). Dominance compares weight errors,
   not Ω: the layer's trace multiplies every format's Ω alike, so the order is the same and a
   trace of zero does not make every format tie.
8. The choices of ``spec.always_kept`` are kept in every searched layer (after the other
   steps), so the uniform configurations they make stay in the space; uniform baselines are
   cheap to measure and the search must never be worse than the best of them
   (:meth:`optuna_ctpe.HessianSearchSpace.keeping`, and
   :meth:`~optuna_ctpe.HessianSearchSpace.relaxed_for_size`, which keeps one that fits).
9. Ties (:attr:`~optuna_ctpe.space.records.SpaceSpec.ties`): steps 1-8 run on every layer as
   if untied; a tie then keeps the choices every one of its layers keeps (so a choice survives
   only if it passes the rule for each layer: the tie's worst Ω is held to the threshold),
   or, if no choice is kept by all (formats whose safest survivor differs between layers),
   those any of them keeps. The kept choices are ordered by the tie's summed stored bits.
   They are the choices of the leader's parameter; followers have none.

The rule knows nothing of a size target; :func:`relaxed_budget` raises the threshold just
enough for the pruned space to hold a configuration of a given size.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import math
from typing import Any

import numpy as np

from optuna_ctpe._validation import check_real
from optuna_ctpe.space.omega import omega_reference
from optuna_ctpe.space.omega import tied_table
from optuna_ctpe.space.omega import upper_trace
from optuna_ctpe.space.params import Choices
from optuna_ctpe.space.params import FORMAT_PREFIX
from optuna_ctpe.space.params import layer_param
from optuna_ctpe.space.params import searched
from optuna_ctpe.space.params import width_param
from optuna_ctpe.space.records import SpaceSpec
from optuna_ctpe.space.size import fp32_bits
from optuna_ctpe.space.size import layer_bits
from optuna_ctpe.space.size import smallest_size
from optuna_ctpe.space.size import tie_bits

#: Parameter name -> ``{choice: Ω}``, what the rule reads is
#: ``optuna_ctpe.space.omega.omega_table(spec, upper=True)``, Ω at each layer's upper trace.
OmegaTable = Mapping[str, Mapping[Any, float]]


def threshold(spec: SpaceSpec) -> float:
    """``budget × Ω_ref``: the largest Ω a kept choice may have (``inf``: keep everything)."""
    ref = omega_reference(spec)
    # With no measurable sensitivity there is nothing to prune on: keep everything.
    return math.inf if ref == 0 or math.isinf(spec.budget) else spec.budget * ref


def prune(spec: SpaceSpec, omega: OmegaTable) -> dict[str, tuple[Any, ...]]:
    """Parameter name -> the choices the rule keeps, for every layer and group of ``spec``.

    Args:
        spec: The space's validated inputs.
        omega: Its :func:`~optuna_ctpe.space.omega.omega_table` with ``upper=True``.
    """
    limit = threshold(spec)
    layers = spec.searched_layers()
    if spec.formats:
        kept = _kept_formats(spec, omega, limit)
    else:
        kept = {
            name: [
                b
                for b in spec.bits
                if b == spec.bits[-1] or omega[layer_param(spec, name)][b] <= limit
            ]
            for name in layers
        }
        # Monotonicity: walking from the least to the most sensitive layer, the minimum
        # bit-width never decreases. Ties in the trace are ordered by name so the rule is
        # deterministic. An uncertain layer is ordered by its upper trace too, so it does not
        # pass for insensitive.
        floor = spec.bits[0]
        for name in sorted(layers, key=lambda n: (upper_trace(spec.layers[n], spec.trace_z), n)):
            floor = max(floor, kept[name][0])
            kept[name] = [b for b in kept[name] if b >= floor]
    if spec.always_kept:
        for name in layers:
            extra = [c for c in spec.always_kept if c not in kept[name]]
            kept[name] = _by_layer_size(spec, name, [*kept[name], *extra])
    for tie in spec.ties:
        common = [c for c in kept[tie[0]] if all(c in kept[n] for n in tie[1:])]
        merged = common or list(dict.fromkeys(c for n in tie for c in kept[n]))
        kept[tie[0]] = _by_layer_size(spec, tie[0], merged)
    choices: dict[str, tuple[Any, ...]] = {
        layer_param(spec, name): tuple(kept[name]) if name in kept else (spec.fixed_choice(name),)
        for name in spec.leaders()
    }
    for name in spec.groups:
        choices[width_param(name)] = tuple(
            w for w in spec.widths if w == spec.widths[-1] or omega[width_param(name)][w] <= limit
        )
    return choices


def _by_layer_size(spec: SpaceSpec, layer: str, options: list[Any]) -> list[Any]:
    """``options`` smallest first: by the stored bits of the layer's parameter in each (its
    tie's, when tied: :func:`~optuna_ctpe.space.size.tie_bits`), equal sizes in grid order."""
    if not spec.formats:
        return sorted(options)
    full = dict.fromkeys(spec.groups, 1.0)
    rank = {c: i for i, c in enumerate(spec.grid)}
    return sorted(options, key=lambda c: (tie_bits(spec, layer, c, full), rank[c]))


def _kept_formats(spec: SpaceSpec, omega: OmegaTable, limit: float) -> dict[str, list[Any]]:
    """Steps 7, 1, 3 and 4 of the rule over formats: the searched layers' kept formats,
    smallest first."""
    full = dict.fromkeys(spec.groups, 1.0)
    rank = {c: i for i, c in enumerate(spec.grid)}
    kept: dict[str, list[Any]] = {}
    for name in spec.searched_layers():
        errors = spec.layers[name].errors
        size = {c: layer_bits(spec, name, c, full) for c in spec.grid}
        front: list[Any] = []
        # Smallest first, ties in grid order: a format survives only if it has less error than
        # every format of at most its size before it.
        for c in sorted(spec.grid, key=lambda c: (size[c], errors[c], rank[c])):
            if not front or errors[c] < errors[front[-1]]:
                front.append(c)
        table = omega[layer_param(spec, name)]
        kept[name] = [c for c in front if c == front[-1] or table[c] <= limit]
    floor = 0
    for name in sorted(kept, key=lambda n: (upper_trace(spec.layers[n], spec.trace_z), n)):
        floor = max(floor, min(rank[c] for c in kept[name]))
        kept[name] = [c for c in kept[name] if rank[c] >= floor] or [kept[name][-1]]
    return kept


def uncertain_layers(spec: SpaceSpec) -> list[str]:
    """The layers whose trace cannot be told from zero, in model order.

    A layer is uncertain when ``mean_trace <= spec.trace_z × trace_stderr``: its lower
    confidence bound does not exceed zero. A negative estimate clipped to 0 is always among
    them. The rule reads such a layer at its upper bound (it keeps only its safer choices), so
    this list is for reports: a longer Hessian measurement would sharpen these layers' choices.

    Args:
        spec: The space's validated inputs.

    Example:
        .. code-block:: python

            from optuna_ctpe.space.checks import make_spec
            from optuna_ctpe.space.pruning import uncertain_layers
            from optuna_ctpe.space.records import LayerSensitivity

            layers = [
                LayerSensitivity("a", 2.0, 10, {4: 1e-3, 8: 1e-5}, trace_stderr=0.1),
                LayerSensitivity("b", 0.0, 10, {4: 1e-3, 8: 1e-5}, trace_stderr=0.5),
            ]
            spec = make_spec(layers, [], None, (4, 8), (1.0,), 16.0, None)
            uncertain_layers(spec)  # ["b"]
    """
    return [
        name
        for name, layer in spec.layers.items()
        if layer.mean_trace <= spec.trace_z * layer.trace_stderr
    ]


def _candidate_budgets(spec: SpaceSpec, omega: OmegaTable) -> list[float]:
    """``spec.budget`` and, above it, the choices' own ``Ω / Ω_ref`` ratios, ascending.

    A choice is readmitted exactly when the budget reaches its own ratio, so these are the only
    budgets worth trying when relaxing the pruning.
    """
    reference = omega_reference(spec)
    candidates = [spec.budget]
    if reference > 0 and math.isfinite(spec.budget):
        ratios = {v / reference for table in omega.values() for v in table.values()} - {0.0}
        candidates += [b for b in sorted(ratios) if b > spec.budget]
    return candidates


def relaxed_budget(spec: SpaceSpec, omega: OmegaTable, target: float) -> float:
    """The smallest budget >= ``spec.budget`` whose pruned space has a configuration of at most
    ``target`` bits.

    A choice is readmitted exactly when the budget reaches its own ``Ω / Ω_ref``, so those
    ratios (and ``inf``) are the only budgets worth trying.

    Raises:
        ValueError: If even the unpruned grid's smallest configuration exceeds ``target``.
    """
    for budget in [*_candidate_budgets(spec, omega), math.inf]:
        relaxed = dataclasses.replace(spec, budget=budget)
        if smallest_size(relaxed, prune(relaxed, omega)) <= target:
            return budget
    smallest = smallest_size(relaxed, prune(relaxed, omega))
    fp32 = fp32_bits(spec)
    raise ValueError(
        f"no configuration of the full grid fits {target:.0f} bits; the smallest has "
        f"{smallest} bits ({smallest / fp32:.4f} of fp32, a compression of "
        f"{fp32 / smallest:.1f}x)."
    )


def budget_keeping(spec: SpaceSpec, omega: OmegaTable, params: Mapping[str, Any]) -> float:
    """The smallest budget >= ``spec.budget`` whose pruned space keeps every choice of
    ``params`` (a parameter dict of the unpruned grid).

    Candidates as in :func:`relaxed_budget`: the choices' own ``Ω / Ω_ref`` ratios, then
    ``inf`` (which keeps everything).
    """
    for budget in _candidate_budgets(spec, omega):
        kept = prune(dataclasses.replace(spec, budget=budget), omega)
        if all(value in kept[name] for name, value in params.items()):
            return budget
    return math.inf


def prior_weights(
    spec: SpaceSpec,
    choices: Choices,
    omega: OmegaTable,
    temperature: float = 0.5,
    floor: float = 0.1,
) -> dict[str, list[float]]:
    """Per-parameter weights over the kept choices of the searched parameters.

    A choice's weight is ``exp((saving − risk) / temperature)``, normalised, then mixed with the
    uniform distribution (``floor`` of the mass), so that no choice is ruled out:

    * ``saving = 1 − choice / safest choice``, the fraction of the layer's bits (or the group's
      channels) the choice removes; for a format, ``1 − stored bits / those of the layer's
      largest kept format``;
    * ``risk = log(1 + Ω / threshold)``, with ``threshold = budget × Ω_ref`` (``Ω_ref`` when
      nothing is pruned): at most ``log 2`` for kept choices, and growing only logarithmically
      beyond, because Ω is a second-order estimate that overstates how bad large perturbations
      rank against each other.

    Cheap-and-safe choices thus get the most weight.

    Args:
        spec: The space's validated inputs.
        choices: The kept choices (:func:`prune`).
        omega: The space's Ω table at the upper traces, as :func:`prune` reads it.
        temperature: Softness of the preference, > 0; a large value tends to uniform.
        floor: Fraction of the mass spread uniformly over the choices, in [0, 1].
    """
    temperature = check_real(temperature, "temperature", minimum=0.0, open_minimum=True)
    floor = check_real(floor, "floor", minimum=0.0, maximum=1.0)
    limit = threshold(spec)
    scale = limit if math.isfinite(limit) else (omega_reference(spec) or 1.0)
    # A tie's parameter is weighed by the summed Ω (and, for formats, bits) of its layers.
    omega = tied_table(spec, omega)
    out: dict[str, list[float]] = {}
    full = dict.fromkeys(spec.groups, 1.0)
    for name in searched(choices):
        options = list(choices[name])
        # A format's saving is that of the layer's (the tie's) stored bits, priced exactly.
        amount = (
            [tie_bits(spec, name[len(FORMAT_PREFIX) :], c, full) for c in options]
            if name.startswith(FORMAT_PREFIX)
            else options
        )
        top = max(amount)
        saving = np.array([1.0 - a / top for a in amount])
        risk = np.log1p([omega[name][c] / scale for c in options])
        logits = (saving - risk) / temperature
        weights = np.exp(logits - logits.max())
        weights = (1 - floor) * weights / weights.sum() + floor / len(options)
        out[name] = weights.tolist()
    return out
