"""The objectives of ``optuna-ctpe search --objective``: one table that every room reads.

Each :class:`ObjectiveKind` says what a trial returns (the metric names and their directions),
which budgets it takes and whether it measures latency. The parser (:mod:`.search`) offers the
names and their help, the settings (:mod:`.settings`) check the budget options against it and
store the name, the objective (:mod:`.objective`) returns its metrics and sets its
constraints, and the report (:mod:`.report`) names its budget. A new objective is a new row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import types
from typing import Literal

from optuna_ctpe import _attrs


__all__ = ["LATENCY_OBJECTIVES", "OBJECTIVES", "ObjectiveKind", "objective_help", "objective_kind"]


@dataclass(frozen=True)
class ObjectiveKind:
    """One ``--objective``.

    Attributes:
        name: The option value, stored in the study's settings.
        metrics: The metric names (:mod:`optuna_ctpe._attrs`) of the values a trial returns, in
            order; one for a single-objective study.
        directions: Optuna's direction of each metric.
        size_budget: How ``--size-budget`` applies: ``"default"`` (the objective is bounded by
            it, :data:`~optuna_ctpe.cli.options.DEFAULT_SIZE_BUDGET` when not given),
            ``"optional"`` (a constraint when given) or ``"none"`` (refused).
        latency: Whether trials measure latency (the latency options apply, and the runtime's
            packages are needed).
        latency_budget: Whether ``--latency-budget`` bounds the objective (required with it).
        help: Its words in ``--help``.
    """

    name: str
    metrics: tuple[str, ...]
    directions: tuple[str, ...]
    size_budget: Literal["default", "optional", "none"]
    latency: bool
    latency_budget: bool
    help: str

    @property
    def budget(self) -> str:
        """What a single-objective study's budget bounds, as the report words it."""
        return "latency" if self.latency_budget else "size"


_MAX, _MIN = "maximize", "minimize"

#: Every objective by name, in the order ``--help`` lists them.
OBJECTIVES: Mapping[str, ObjectiveKind] = types.MappingProxyType(
    {
        kind.name: kind
        for kind in (
            ObjectiveKind(
                "pareto",
                (_attrs.ACCURACY, _attrs.SIZE_KB),
                (_MAX, _MIN),
                size_budget="none",
                latency=False,
                latency_budget=False,
                help="a two-objective study, maximise accuracy and minimise size, reporting "
                "the Pareto front",
            ),
            ObjectiveKind(
                "budget",
                (_attrs.ACCURACY,),
                (_MAX,),
                size_budget="default",
                latency=False,
                latency_budget=False,
                help="maximise accuracy subject to size <= --size-budget (a constraint set "
                "with trial.set_constraint)",
            ),
            ObjectiveKind(
                "latency-budget",
                (_attrs.ACCURACY,),
                (_MAX,),
                size_budget="optional",
                latency=True,
                latency_budget=True,
                help="maximise accuracy subject to latency <= --latency-budget (and to "
                "--size-budget if given)",
            ),
            ObjectiveKind(
                "pareto-latency",
                (_attrs.ACCURACY, _attrs.LATENCY_MS, _attrs.SIZE_KB),
                (_MAX, _MIN, _MIN),
                size_budget="none",
                latency=True,
                latency_budget=False,
                help="a three-objective study, maximise accuracy, minimise latency and size",
            ),
        )
    }
)

#: The objectives that measure latency.
LATENCY_OBJECTIVES = tuple(name for name, kind in OBJECTIVES.items() if kind.latency)


def objective_kind(name: str) -> ObjectiveKind:
    """The objective called ``name``.

    Raises:
        ValueError: If there is none (a study whose settings name an objective this version
            does not know).
    """
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {name!r}.") from None


def objective_help() -> str:
    """``--objective``'s help: each objective and its words."""
    return "; ".join(f"{kind.name}: {kind.help}" for kind in OBJECTIVES.values())
