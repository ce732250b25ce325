"""Hessian-aware search space of per-layer bit-widths and per-group layer widths.

:class:`HessianSearchSpace` turns per-layer Hessian sensitivities into Optuna distributions,
removing the choices that the sensitivities mark as unpromising, and gives the sampler what it
needs as plain data: prior weights over the remaining choices and warm-start configurations.

The class is a face over pure functions on plain records in :mod:`optuna_ctpe.space`: the
records and their validation (``records``), the pruning rule and prior weights (``pruning``,
where the rule is explained), size accounting (``size``), warm starts (``warm_start``) and
versioned serialisation (``io``). The torch wing, :mod:`optuna_ctpe.nn`, measures a model into
those records and applies a configuration to a model.

The module imports no torch: a space can be rebuilt from JSON or from a study's user attributes
on a machine without torch (a distributed worker, optuna-dashboard). Only the methods that take
a model (:meth:`HessianSearchSpace.from_model`, :meth:`~HessianSearchSpace.apply`,
:meth:`~HessianSearchSpace.prune` and :meth:`~HessianSearchSpace.save_packed`) import torch,
through :mod:`optuna_ctpe.nn` (and :mod:`optuna_ctpe.deploy`).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
import math
import types
from typing import Any
from typing import TYPE_CHECKING

from optuna.distributions import CategoricalDistribution

from optuna_ctpe._search_space_torch import TorchFace
from optuna_ctpe._validation import check_integer
from optuna_ctpe._validation import check_ratio
from optuna_ctpe.space import io
from optuna_ctpe.space import params as _params
from optuna_ctpe.space import pruning
from optuna_ctpe.space import size as _size
from optuna_ctpe.space.budget import budget_constraint
from optuna_ctpe.space.budget import BudgetConstraint
from optuna_ctpe.space.budget import LatencyEntries
from optuna_ctpe.space.omega import omega_table
from optuna_ctpe.space.records import check_bit
from optuna_ctpe.space.records import check_budget
from optuna_ctpe.space.records import check_config
from optuna_ctpe.space.records import DEFAULT_BITS
from optuna_ctpe.space.records import DEFAULT_BUDGET
from optuna_ctpe.space.records import DEFAULT_TRACE_Z
from optuna_ctpe.space.records import DEFAULT_WIDTHS
from optuna_ctpe.space.records import LayerSensitivity
from optuna_ctpe.space.records import make_spec
from optuna_ctpe.space.records import ParamTensor
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import SpaceSpec
from optuna_ctpe.space.records import WidthGroupSensitivity
from optuna_ctpe.space.warm_start import measured_warm_start_configs
from optuna_ctpe.space.warm_start import warm_start_configs


if TYPE_CHECKING:
    from collections.abc import Sequence

    import optuna

    from optuna_ctpe.deploy.latency_table import LatencyTable


__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_BUDGET",
    "DEFAULT_WIDTHS",
    "HessianSearchSpace",
    "LayerSensitivity",
    "ParamTensor",
    "QuantConfig",
    "WidthGroupSensitivity",
]


_N_KEEP = 3


class HessianSearchSpace(TorchFace):
    """Per-layer bit-widths and per-group widths, pruned by Hessian sensitivity.

    Build it from a model with :meth:`from_model` (torch), or from saved sensitivities with
    :meth:`from_sensitivities` (no torch). The parameters are named ``bits:<layer>`` and
    ``width:<group>``; a parameter left with a single choice after pruning is not searched
    (it is absent from :attr:`distributions`) but still appears in every :class:`QuantConfig`.
    See :mod:`optuna_ctpe.space.pruning` for the pruning rule, which is our interpretation of
    arXiv:2308.06422.

    Example:
        .. code-block:: python

            import optuna
            from optuna_ctpe import ClusterTPESampler, HessianSearchSpace
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task(seed=0)
            space = HessianSearchSpace.from_model(
                task.model, task.loss_fn, task.calibration_batches,
                example_inputs=task.example_inputs,
            )
            fp32 = task.evaluate(task.model)

            def objective(trial):
                config = space.suggest(trial)
                net = space.apply(task.model, config, task.example_inputs)
                return (fp32 - task.evaluate(net)) + space.size(config) / space.fp32_bits

            study = optuna.create_study(
                sampler=ClusterTPESampler(seed=0, prior_weights=space.prior_weights())
            )
            space.save_to_study(study)
            for params in space.warm_starts(size_ratio=0.15, n=2):
                study.enqueue_trial(params)
            study.optimize(objective, n_trials=30)

    Args:
        layers: Sensitivity data of the quantized layers (:class:`LayerSensitivity` or mappings
            of its fields), in model order.
        groups: Sensitivity data of the width groups; empty for a bits-only search.
        tensors: Every parameter tensor of the model, for :meth:`size`; by default one weight
            tensor per layer of ``layers``. Required when ``groups`` is not empty, since the
            size effect of a width depends on which tensors the group prunes.
        bits: The grid of weight bit-widths, integers in [2, 16].
        widths: The grid of width ratios, in (0, 1].
        budget: The pruning threshold as a multiple of ``Ω_ref`` (see
            :mod:`optuna_ctpe.space.pruning`); ``math.inf`` keeps every choice, a smaller value
            prunes more.
        fixed_bits: Layer name -> bit-width of layers that are quantized but not searched
            (by convention, the first and last layers).
        trace_z: Standard errors added to each layer's mean trace where the pruning rule and the
            priors read it (an upper confidence bound, >= 0; see
            :mod:`optuna_ctpe.space.pruning`), so a layer whose trace is lost in its noise keeps
            its safer choices. 0 uses the point estimates.
    """

    def __init__(
        self,
        layers: Sequence[LayerSensitivity | Mapping[str, Any]],
        groups: Sequence[WidthGroupSensitivity | Mapping[str, Any]] = (),
        *,
        tensors: Sequence[ParamTensor | Mapping[str, Any]] | None = None,
        bits: Sequence[int] = DEFAULT_BITS,
        widths: Sequence[float] = DEFAULT_WIDTHS,
        budget: float = DEFAULT_BUDGET,
        fixed_bits: Mapping[str, int] | None = None,
        trace_z: float = DEFAULT_TRACE_Z,
    ) -> None:
        self._set_spec(
            make_spec(layers, groups, tensors, bits, widths, budget, fixed_bits, trace_z)
        )

    def _set_spec(self, spec: SpaceSpec) -> None:
        # The face keeps the validated records, their Ω table and the kept choices; every
        # method delegates to a function of optuna_ctpe.space over them.
        self._spec = spec
        self._omega = omega_table(spec)
        # The rule and the priors read Ω at the upper traces; sizes and warm starts the points.
        self._risk = omega_table(spec, upper=True)
        self._choices = pruning.prune(spec, self._risk)

    @classmethod
    def _from_spec(cls, spec: SpaceSpec) -> HessianSearchSpace:
        """A space over an already validated ``spec`` (no second validation)."""
        space = cls.__new__(cls)
        space._set_spec(spec)
        return space

    @classmethod
    def from_sensitivities(cls, *args: Any, **kwargs: Any) -> HessianSearchSpace:
        """Build a space from saved sensitivities, without torch: the class's own constructor.

        Named for symmetry with :meth:`from_model`; takes the class's arguments.
        """
        return cls(*args, **kwargs)

    # -- read-only views -------------------------------------------------------------------

    @property
    def bits(self) -> tuple[int, ...]:
        """The bit-width grid, ascending."""
        return self._spec.bits

    @property
    def widths(self) -> tuple[float, ...]:
        """The width-ratio grid, ascending."""
        return self._spec.widths

    @property
    def budget(self) -> float:
        """The pruning threshold as a multiple of ``Ω_ref``."""
        return self._spec.budget

    @property
    def trace_z(self) -> float:
        """Standard errors added to the mean traces where the rule and the priors read them."""
        return self._spec.trace_z

    @property
    def uncertain_layers(self) -> list[str]:
        """Layers whose trace cannot be told from zero (:func:`~optuna_ctpe.space.pruning.
        uncertain_layers`); the rule keeps only their safer choices."""
        return pruning.uncertain_layers(self._spec)

    @property
    def fixed_bits(self) -> Mapping[str, int]:
        """Layers quantized at a fixed bit-width, not searched."""
        return types.MappingProxyType(self._spec.fixed_bits)

    @property
    def sensitivities(self) -> Mapping[str, LayerSensitivity]:
        """Layer name -> its :class:`LayerSensitivity` (mean trace, its error, parameters)."""
        return types.MappingProxyType(self._spec.layers)

    @property
    def groups(self) -> Mapping[str, WidthGroupSensitivity]:
        """Width-group name -> its :class:`WidthGroupSensitivity`."""
        return types.MappingProxyType(self._spec.groups)

    @property
    def tensors(self) -> tuple[ParamTensor, ...]:
        """The parameter tensors :meth:`size` accounts for."""
        return self._spec.tensors

    @property
    def choices(self) -> Mapping[str, tuple[Any, ...]]:
        """Parameter name -> the choices kept by pruning, for every parameter (even fixed)."""
        return types.MappingProxyType(self._choices)

    @property
    def omega(self) -> Mapping[str, Mapping[Any, float]]:
        """Parameter name -> {choice: Ω} over the full grid (before pruning)."""
        return types.MappingProxyType({name: dict(table) for name, table in self._omega.items()})

    @property
    def distributions(self) -> dict[str, CategoricalDistribution]:
        """Searched parameter name -> its :class:`~optuna.distributions.CategoricalDistribution`.

        Parameters with a single choice left (fixed layers, fully pruned ones) are omitted.
        """
        return {
            name: CategoricalDistribution(list(self._choices[name]))
            for name in _params.searched(self._choices)
        }

    @property
    def log10_size_before(self) -> float:
        """log10 of the number of configurations before pruning (fixed layers excluded)."""
        return _size.log10_size_before(self._spec)

    @property
    def log10_size_after(self) -> float:
        """log10 of the number of configurations after pruning."""
        return _size.log10_size_after(self._choices)

    @property
    def fp32_bits(self) -> int:
        """Storage of the unpruned float32 model, in bits (the denominator of size ratios)."""
        return _size.fp32_bits(self._spec)

    # -- other budgets -----------------------------------------------------------------------

    def with_budget(self, budget: float) -> HessianSearchSpace:
        """The same sensitivities pruned with another ``budget`` (``math.inf``: no pruning)."""
        return self._from_spec(dataclasses.replace(self._spec, budget=check_budget(budget)))

    def relaxed_for_size(
        self,
        size_ratio: float | None = None,
        *,
        size_bits: int | None = None,
        keep_allocation: bool = False,
    ) -> HessianSearchSpace:
        """This space, re-pruned with the smallest budget >= :attr:`budget` that fits a size.

        Hessian pruning knows nothing of the size target: under a tight target it can remove
        every configuration that fits. This returns ``self`` if the smallest configuration of
        the pruned space fits, otherwise the space pruned at the smallest threshold (one of the
        choices' own Ω values) at which it does, so no choice is readmitted needlessly.

        Under a tight target that one fitting configuration may be nearly all the pruned space
        has within the target. With ``keep_allocation=True`` the threshold is also raised until
        the space keeps every choice of the unpruned grid's best allocation at the target (its
        first warm start, :meth:`warm_starts` of the unpruned space): the choices the
        sensitivities themselves pick at this size are not pruned away.

        Args:
            size_ratio: Size target as a fraction of :attr:`fp32_bits`, in (0, 1].
            size_bits: Size target in bits, instead of ``size_ratio``.
            keep_allocation: Also keep the unpruned grid's best allocation at the target.

        Raises:
            ValueError: If not exactly one target is given, or even the unpruned grid's smallest
                configuration exceeds it.
        """
        target = _size.size_target(self._spec, size_ratio, size_bits)
        budget = pruning.relaxed_budget(self._spec, self._risk, target)
        if keep_allocation:
            unpruned = self.with_budget(math.inf)
            for best in unpruned.warm_starts(size_bits=math.floor(target), n=_N_KEEP):
                budget = max(budget, pruning.budget_keeping(self._spec, self._risk, best))
        return self if budget == self.budget else self.with_budget(budget)

    # -- configurations --------------------------------------------------------------------

    def suggest(self, trial: optuna.trial.BaseTrial) -> QuantConfig:
        """Suggest every searched parameter in ``trial`` and return the full configuration."""
        params = {
            name: trial.suggest_categorical(name, dist.choices)
            for name, dist in self.distributions.items()
        }
        return self.config_from_params(params)

    def config_from_params(self, params: Mapping[str, Any]) -> QuantConfig:
        """The configuration of a parameter dict, e.g. ``study.best_params``.

        Unsearched parameters take their single choice; parameters of other names are ignored,
        so ``params`` may hold a user's own parameters too.

        Raises:
            ValueError: If a searched parameter is missing or has a value outside its choices.
        """
        return _params.config_from_params(self._choices, params)

    def to_params(self, config: QuantConfig) -> dict[str, Any]:
        """The searched parameters of ``config``, e.g. for :meth:`optuna.Study.enqueue_trial`."""
        return _params.to_params(self._choices, check_config(self._spec, config))

    def uniform(self, bits: int, width: float = 1.0) -> QuantConfig:
        """The configuration with every searched layer at ``bits`` and every group at ``width``.

        Fixed layers keep their fixed bit-width. The result need not lie in the pruned space
        (use it as a reference point, e.g. uniform 8-bit).
        """
        bits = check_bit(bits, "bits")
        width = check_ratio(width, "width")
        return QuantConfig(
            {n: self._spec.fixed_bits.get(n, bits) for n in self._spec.layers},
            dict.fromkeys(self._spec.groups, width),
        )

    def size(self, config: QuantConfig) -> int:
        """Exact storage of the model under ``config``, in bits.

        Each weight of a quantized layer takes its bit-width, every other parameter (biases,
        normalisation) 32 bits; a width ratio shrinks each tensor the group prunes by the
        channels it removes, along the pruned dimension. Each quantized tensor's per-channel
        float32 scales count too, for spaces measured by :meth:`from_model`
        (:mod:`optuna_ctpe.space.size`).
        """
        return _size.size_bits(self._spec, config)

    def perturbation(self, config: QuantConfig) -> float:
        """The summed Ω of ``config`` (HAWQ-V2's estimate of twice the loss increase)."""
        return _size.perturbation(self._spec, self._omega, config)

    # -- priors and warm starts ------------------------------------------------------------

    def prior_weights(
        self, temperature: float = 0.5, floor: float = 0.1
    ) -> dict[str, list[float]]:
        """Per-parameter weights over the choices, for ``ClusterTPESampler(prior_weights=)``.

        Cheap-and-safe choices get the most weight; see
        :func:`optuna_ctpe.space.pruning.prior_weights` for the formula.

        Args:
            temperature: Softness of the preference, > 0; a large value tends to uniform.
            floor: Fraction of the mass spread uniformly over the choices, in [0, 1].
        """
        return pruning.prior_weights(self._spec, self._choices, self._risk, temperature, floor)

    def warm_starts(
        self,
        size_ratio: float | None = None,
        *,
        size_bits: int | None = None,
        n: int = 3,
        measure: Callable[[QuantConfig], float] | None = None,
    ) -> list[dict[str, Any]]:
        """Configurations to enqueue before the search, best first, all within the size budget.

        Two HAWQ-V3-style ILP allocations (least summed Ω whose size fits the budget, see
        :func:`optuna_ctpe.space.warm_start.ilp_allocation`) come first, the one of less Ω
        leading: the exact bits-only allocation at full widths, and a joint allocation of
        bit-widths and width ratios (the size is bilinear in the two, so it is linearised around
        the current point and re-solved until the exact size fits). Then joint allocations at
        budgets shrunk by 10% steps, for diversity. Duplicates are dropped, so fewer than ``n``
        may come back.

        Ω is a second-order estimate of each choice alone, and removing channels of several
        groups at once can cost far more than the sum. With ``measure`` (e.g.
        :meth:`loss_increase`), every answer is measured; a joint answer that loses more than
        twice its prediction has its choices measured alone and repriced (or, when they all
        were, scaled to the measurement) and is solved again; and the configurations come back
        ranked by their measured increase (:func:`optuna_ctpe.space.warm_start.
        measured_warm_start_configs`)::

            measure = space.loss_increase(model, loss_fn, batches, example_inputs)
            for params in space.warm_starts(size_ratio=1 / 16, measure=measure):
                study.enqueue_trial(params)

        Args:
            size_ratio: Size budget as a fraction of :attr:`fp32_bits`, in (0, 1]; e.g. 0.25 is
                about uniform 8-bit.
            size_bits: Size budget in bits, instead of ``size_ratio``.
            n: Maximum number of configurations, >= 1.
            measure: ``measure(config) -> float``, a configuration's loss increase in the units
                of Ω/2; None ranks by Ω alone and measures nothing.

        Returns:
            Parameter dicts for :meth:`optuna.Study.enqueue_trial` (searched parameters only).

        Raises:
            ValueError: If not exactly one of ``size_ratio`` and ``size_bits`` is given, if no
                configuration of the pruned space fits the budget, or if ``measure`` returns a
                value that is not finite.
        """
        target = _size.size_target(self._spec, size_ratio, size_bits)
        n = check_integer(n, "n", minimum=1)
        if measure is None:
            found = warm_start_configs(self._spec, self._choices, self._omega, target, n)
        else:
            ranked = measured_warm_start_configs(
                self._spec, self._choices, self._omega, target, n, measure
            )
            found = [config for config, _ in ranked]
        if not found:
            smallest = _size.smallest_size(self._spec, self._choices)
            raise ValueError(
                f"no configuration of the pruned space fits {target:.0f} bits; the smallest "
                f"has {smallest} bits ({smallest / self.fp32_bits:.4f} of fp32). Raise the "
                "size target, or prune less (relaxed_for_size)."
            )
        return [self.to_params(c) for c in found]

    # -- known constraints (checked before a trial runs) -----------------------------------

    def size_constraint(
        self, size_ratio: float | None = None, *, size_bits: int | None = None
    ) -> BudgetConstraint:
        """The size budget as a known constraint, for ``ClusterTPESampler(known_constraints=)``.

        The sampler then proposes only configurations that fit, repairing one by the exchange
        rule over Ω when none of its candidates does (:mod:`optuna_ctpe.space.budget`)::

            sampler = ClusterTPESampler(
                prior_weights=space.prior_weights(),
                known_constraints=space.size_constraint(1 / 16),
            )

        Args:
            size_ratio: Size budget as a fraction of :attr:`fp32_bits`, in (0, 1].
            size_bits: Size budget in bits, instead of ``size_ratio``.

        Raises:
            ValueError: If not exactly one budget is given, or no configuration of the pruned
                space fits it (the message gives the smallest size; see
                :meth:`relaxed_for_size`).
        """
        target = _size.size_target(self._spec, size_ratio, size_bits)
        return budget_constraint(self._spec, self._choices, self._omega, size_bits=target)

    def latency_constraint(
        self,
        table: LatencyTable,
        budget_ms: float,
        *,
        size_ratio: float | None = None,
        size_bits: int | None = None,
    ) -> BudgetConstraint:
        """A latency budget, predicted by a lookup table, as a known constraint (and a size
        budget with it when one is given): its values are ``("latency",)`` or
        ``("size", "latency")``.

        Args:
            table: The :class:`~optuna_ctpe.deploy.latency_table.LatencyTable` of this space's
                model, measured at its grids.
            budget_ms: Latency budget in milliseconds, > 0.
            size_ratio: Optional size budget as a fraction of :attr:`fp32_bits`.
            size_bits: Optional size budget in bits, instead of ``size_ratio``.

        Raises:
            ValueError: If the table lacks an entry the kept choices need, a budget is out of
                range, or no configuration of the pruned space fits (the message says how
                close the best found comes).
        """
        target = None
        if size_ratio is not None or size_bits is not None:
            target = _size.size_target(self._spec, size_ratio, size_bits)
        entries = LatencyEntries(
            {name: (layer.groups, dict(layer.ms)) for name, layer in table.layers.items()},
            table.remainder_ms,
        )
        return budget_constraint(
            self._spec,
            self._choices,
            self._omega,
            size_bits=target,
            latency=entries,
            latency_ms=budget_ms,
        )

    # -- serialisation ---------------------------------------------------------------------

    def to_json(self) -> str:
        """Serialise the space (inputs and resulting choices) as a JSON string."""
        return io.to_json(self._spec, self._choices)

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]) -> HessianSearchSpace:
        """Rebuild a space from :meth:`to_json`'s output (a string or the parsed object).

        Raises:
            ValueError: If the text is not JSON, not a search space of a supported schema
                version, or malformed (the message says which field).
        """
        return cls._from_spec(io.from_json(text))

    def save_to_study(self, study: optuna.Study) -> None:
        """Store the space in ``study``'s user attributes, for workers and optuna-dashboard.

        The JSON is stored in chunks that fit any Optuna storage (see :mod:`optuna_ctpe.space.io`).
        """
        io.save_to_study(study, self.to_json())

    @classmethod
    def load_from_study(cls, study: optuna.Study) -> HessianSearchSpace:
        """Rebuild the space :meth:`save_to_study` stored in ``study``.

        Raises:
            ValueError: If the study holds no space, or its chunks are missing or corrupt.
        """
        return cls.from_json(io.load_from_study(study))

    def __repr__(self) -> str:
        return (
            f"HessianSearchSpace({len(self._spec.layers)} layers, {len(self._spec.groups)} width "
            f"groups, 10^{self.log10_size_before:.1f} -> 10^{self.log10_size_after:.1f} "
            "configurations)"
        )
