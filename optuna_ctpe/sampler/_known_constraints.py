"""Known constraints: functions of the parameters alone, checked before a trial runs.

A black-box constraint (:meth:`optuna.trial.Trial.set_constraint`) is learned from finished
trials, so every infeasible proposal costs an evaluation. A *known* constraint, such as a size
budget, is computable from the parameters in microseconds; the sampler evaluates it on its
candidates and proposes only configurations that satisfy it. This module holds the pure part:
the protocol and its normalised record, the check of a batch of candidates, the generic repair
rule and the recording of the values on a finished trial. :class:`~optuna_ctpe.sampler.
ClusterTPESampler` and :class:`~optuna_ctpe.sampler.KnownConstraintSampler` (any other sampler)
call it.

**The protocol.** A known constraint is a callable ``constraint(params) -> sequence of floats``,
feasible when every value is <= 0, reading only parameters of ``params`` (a dict of external
values). It may carry three attributes:

* ``distributions``: a mapping from each parameter it reads (its *scope*) to the distribution
  the objective suggests it with. The sampler then models these parameters jointly from the
  first trial on, start-up trials included, so that every proposal can be checked. Without it,
  the scope is the relative search space (the parameters every finished trial has), checked
  once there is one (from the second trial on, after the start-up trials too);
* ``repair(params, fixed) -> params``: a rule that moves an infeasible configuration into the
  feasible region without changing the parameters named in ``fixed``. Without it, or when it
  fails, :func:`generic_repair` is used;
* ``names``: a name for each value, used in the trial's constraint keys (``ctpe:known:<name>``;
  by default the position).

:class:`KnownConstraint` bundles a plain function with these.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import TYPE_CHECKING

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.distributions import CategoricalDistribution
from optuna.distributions import FloatDistribution
from optuna.distributions import IntDistribution

from optuna_ctpe import _attrs
from optuna_ctpe import _optuna_compat as compat


if TYPE_CHECKING:
    from optuna.study import Study
    from optuna.trial import FrozenTrial


__all__ = ["KnownConstraint"]

# Passes over the parameters of the generic repair before it settles for the least violation.
_MAX_REPAIR_PASSES = 3
# An integer or float parameter with more values than this is tried at this many grid points.
_GRID_POINTS = 17


@dataclass(frozen=True)
class KnownConstraint:
    """A function of the parameters alone, with what the sampler should know about it.

    Example:
        .. code-block:: python

            import optuna
            from optuna.distributions import IntDistribution
            from optuna_ctpe.sampler import ClusterTPESampler, KnownConstraint

            scope = {f"x{i}": IntDistribution(0, 10) for i in range(3)}
            # Feasible when x0 + x1 + x2 <= 12.
            budget = KnownConstraint(lambda p: [sum(p[n] for n in scope) - 12], scope)

            def objective(trial):
                return -sum(trial.suggest_int(n, 0, 10) ** 2 for n in scope)

            study = optuna.create_study(sampler=ClusterTPESampler(known_constraints=budget))
            study.optimize(objective, n_trials=20)
            assert all(sum(t.params.values()) <= 12 for t in study.trials)

    Args:
        func: ``func(params) -> sequence of floats``, feasible when all are <= 0.
        distributions: The parameters ``func`` reads and the distributions the objective
            suggests them with (see the module docstring); None: the relative search space.
        repair: Optional ``repair(params, fixed) -> params``, moving an infeasible configuration
            into the feasible region without changing the parameters in ``fixed``.
        names: Optional name of each value ``func`` returns.
    """

    func: Callable[[Mapping[str, Any]], Sequence[float]]
    distributions: Mapping[str, BaseDistribution] | None = field(default=None, hash=False)
    repair: Callable[[Mapping[str, Any], Collection[str]], Mapping[str, Any]] | None = None
    names: Sequence[str] | None = None

    def __call__(self, params: Mapping[str, Any]) -> Sequence[float]:
        return self.func(params)


@dataclass(frozen=True)
class Known:
    """A known constraint as the samplers use it (see :func:`as_known`).

    Attributes:
        func: The constraint.
        scope: Its declared parameters of more than one value and their distributions, or None
            (the relative search space).
        repair: Its own repair rule, or None.
        names: Its value names, or None.
        constants: Its declared parameters of one value (which no sampler draws), with it.
    """

    func: Callable[[Mapping[str, Any]], Sequence[float]]
    scope: dict[str, BaseDistribution] | None
    repair: Callable[[Mapping[str, Any], Collection[str]], Mapping[str, Any]] | None
    names: tuple[str, ...] | None
    constants: dict[str, Any] = field(default_factory=dict)


def as_known(obj: Any) -> Known:
    """The :class:`Known` record of a ``known_constraints`` argument.

    Raises:
        ValueError: If ``obj`` is not callable, or an attribute of the protocol is malformed
            (the message names it).
    """
    if not callable(obj):
        raise ValueError(
            f"known_constraints must be a callable params -> sequence of floats, got {obj!r}."
        )
    scope = getattr(obj, "distributions", None)
    constants: dict[str, Any] = {}
    if scope is not None:
        if not isinstance(scope, Mapping) or not all(
            isinstance(d, BaseDistribution) for d in scope.values()
        ):
            raise ValueError(
                "known_constraints.distributions must map parameter names to Optuna "
                f"distributions, got {scope!r}."
            )
        constants = {name: _single_value(d) for name, d in scope.items() if d.single()}
        scope = {name: d for name, d in scope.items() if not d.single()}
    repair = getattr(obj, "repair", None)
    if repair is not None and not callable(repair):
        raise ValueError(f"known_constraints.repair must be callable, got {repair!r}.")
    names = getattr(obj, "names", None)
    if names is not None:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"known_constraints.names must be a sequence of strings, got {names!r}."
            )
        names = tuple(names)
    return Known(obj, scope, repair, names, constants)


def _single_value(dist: BaseDistribution) -> Any:
    """The one value of a distribution of one value."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    return dist.to_external_repr(dist.to_internal_repr(dist.low))  # type: ignore[attr-defined]


def values(known: Known, params: Mapping[str, Any]) -> np.ndarray:
    """The constraint's values at ``params``, checked.

    Raises:
        ValueError: If the constraint returns no values, a value that is not a number or NaN,
            or not one value per name.
    """
    raw = known.func({**known.constants, **params})
    try:
        out = np.asarray([float(v) for v in raw], dtype=float)
    except (TypeError, ValueError):
        raise ValueError(
            f"a known constraint must return a sequence of floats, got {raw!r}."
        ) from None
    if out.size == 0 or np.isnan(out).any():
        raise ValueError(f"a known constraint returned {raw!r}: it needs numbers, not NaN.")
    if known.names is not None and len(known.names) != out.size:
        raise ValueError(
            f"a known constraint returned {out.size} values for the names {list(known.names)}."
        )
    return out


def violation(known: Known, params: Mapping[str, Any]) -> float:
    """Summed positive values at ``params`` (0 when feasible)."""
    return float(np.clip(values(known, params), 0.0, None).sum())


def scope_names(known: Known, relative_space: Mapping[str, BaseDistribution]) -> set[str]:
    """The parameters the constraint reads: its declared scope, else the relative space."""
    return set(known.scope if known.scope is not None else relative_space)


def with_scope(space: dict[str, BaseDistribution], known: Known) -> dict[str, BaseDistribution]:
    """``space`` plus the constraint's declared parameters it lacks, so that the sampler draws
    the scope jointly."""
    if known.scope is None:
        return space
    extra = {name: dist for name, dist in sorted(known.scope.items()) if name not in space}
    return {**space, **extra}


def feasible_mask(
    known: Known,
    candidates: Mapping[str, np.ndarray],
    distributions: Mapping[str, BaseDistribution],
    given: Mapping[str, Any],
) -> np.ndarray:
    """Which candidates (internal representations, one array per parameter) are feasible
    together with the parameters in ``given``."""
    external = {
        name: [distributions[name].to_external_repr(v) for v in column.tolist()]
        for name, column in candidates.items()
    }
    n = len(next(iter(external.values())))
    mask = np.empty(n, dtype=bool)
    for i in range(n):
        params = {name: column[i] for name, column in external.items()}
        mask[i] = violation(known, {**given, **params}) == 0.0
    return mask


def generic_repair(
    known: Known,
    params: Mapping[str, Any],
    distributions: Mapping[str, BaseDistribution],
    fixed: Collection[str],
    rng: np.random.RandomState,
) -> dict[str, Any]:
    """Lower the summed violation one parameter at a time until it is 0.

    The rule, for constraints without a repair of their own: visit the parameters of
    ``distributions`` that are not ``fixed`` in an order drawn from ``rng`` (the sampler's
    seeded generator); at each, try every value (categorical parameters, integers of at most
    :data:`_GRID_POINTS` values) or :data:`_GRID_POINTS` evenly spaced values (on a log scale
    for log distributions) and keep the one of least summed violation, the current value on a
    tie; stop as soon as the configuration is feasible. Up to :data:`_MAX_REPAIR_PASSES`
    passes; a pass that lowers nothing ends the repair with the least violation found.

    Args:
        known: The constraint.
        params: The infeasible configuration (every parameter the constraint reads).
        distributions: The parameters the repair may change, with their distributions.
        fixed: Parameters it must not change.
        rng: The sampler's random generator.

    Returns:
        The repaired configuration (feasible, unless no such sequence of changes exists).
    """
    current = dict(params)
    best = violation(known, current)
    names = sorted(n for n in distributions if n not in fixed)
    order = [names[i] for i in rng.permutation(len(names))]
    for _ in range(_MAX_REPAIR_PASSES):
        start = best
        for name in order:
            if best == 0.0:
                return current
            for value in _trial_values(distributions[name]):
                if value == current[name]:
                    continue
                v = violation(known, {**current, name: value})
                if v < best:
                    best, current = v, {**current, name: value}
        if best == 0.0 or best >= start:
            break
    return current


def _trial_values(dist: BaseDistribution) -> list[Any]:
    """The values :func:`generic_repair` tries for one parameter."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        n_values = (dist.high - dist.low) // dist.step + 1
        if n_values <= _GRID_POINTS:
            return list(range(dist.low, dist.high + 1, dist.step))
        grid = _grid(dist.low, dist.high, dist.log)
        return sorted({dist.low + round((g - dist.low) / dist.step) * dist.step for g in grid})
    assert isinstance(dist, FloatDistribution)
    grid = _grid(dist.low, dist.high, dist.log)
    if dist.step is not None:
        step = dist.step
        grid = [min(dist.high, dist.low + round((g - dist.low) / step) * step) for g in grid]
    return sorted(set(grid))


def _grid(low: float, high: float, log: bool) -> list[float]:
    if log:
        return np.geomspace(low, high, _GRID_POINTS).tolist()
    return np.linspace(low, high, _GRID_POINTS).tolist()


def repair(
    known: Known,
    params: Mapping[str, Any],
    distributions: Mapping[str, BaseDistribution],
    fixed: Collection[str],
    rng: np.random.RandomState,
) -> dict[str, Any]:
    """An infeasible configuration repaired: by the constraint's own rule if it has one and
    that rule succeeds, else by :func:`generic_repair` (from the better of the two).

    Args:
        known: The constraint.
        params: The configuration (every parameter the constraint reads).
        distributions: The parameters the repair may change.
        fixed: Parameters it must not change.
        rng: The sampler's random generator.
    """
    current = dict(params)
    if known.repair is not None:
        own = {**current, **dict(known.repair(current, frozenset(fixed)))}
        # Only parameters the repair may change are taken from the constraint's own rule.
        own = {
            n: own[n] if n in distributions and n not in fixed else v for n, v in current.items()
        }
        if violation(known, own) == 0.0:
            return own
        if violation(known, own) < violation(known, current):
            current = own
    return generic_repair(known, current, distributions, fixed, rng)


def constraint_key(known: Known, index: int) -> str:
    """The trial constraint key of the ``index``-th value (``ctpe:known:<name>``)."""
    name = known.names[index] if known.names is not None else str(index)
    return _attrs.known_constraint_key(name)


def record(study: Study, trial: FrozenTrial, known: Known) -> None:
    """Record the constraint's values on a finishing trial as its constraints.

    Optuna's feasibility rules, the samplers and optuna-dashboard then see them as they see
    :meth:`~optuna.trial.Trial.set_constraint`'s values, under keys of their own, so a user's
    own constraints are untouched. Nothing is recorded when the trial lacks a parameter the
    constraint reads (a failed trial, a dynamic space).
    """
    if known.scope is not None and not known.scope.keys() <= trial.params.keys():
        return
    try:
        out = values(known, trial.params)
    except KeyError:
        return  # a constraint without a declared scope read a parameter this trial lacks
    for i, value in enumerate(out):
        compat.record_constraint(study, trial, constraint_key(known, i), float(value))
