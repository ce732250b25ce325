"""Hessian-aware search space of per-layer bit-widths and per-group layer widths.

:class:`HessianSearchSpace` turns per-layer Hessian sensitivities into Optuna distributions,
removing the choices that the sensitivities mark as unpromising, and gives the sampler what it
needs as plain data: prior weights over the remaining choices and warm-start configurations.

The module imports no torch: a space can be rebuilt from JSON or from a study's user attributes
on a machine without torch (a distributed worker, optuna-dashboard). Only
:meth:`HessianSearchSpace.from_model` and :meth:`HessianSearchSpace.apply` import torch.

The pruning rule
----------------
arXiv:2308.06422 prunes its search space with "Hessian-based pruning" but does not publish the
rule. This module implements OUR interpretation, built from HAWQ-V2 and NNCF's HAWQ:

1. Every choice gets the HAWQ-V2 perturbation ``Ω = mean_trace × ‖ΔW‖²``: ``mean_trace`` is
   the layer's Hessian trace divided by its parameter count, ``‖ΔW‖²`` is ``‖Q_b(W) − W‖²``
   for a bit-width ``b`` or the squared norm of the removed weights for a width ratio. By a
   second-order Taylor expansion at a minimum, with the layer's Hessian taken as
   ``mean_trace × I``, ``Ω / 2`` estimates the loss increase.
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

The rule knows nothing of a size target; :meth:`HessianSearchSpace.relaxed_for_size` raises the
threshold just enough for the pruned space to contain a configuration of a given size.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import hashlib
import json
import math
import types
from typing import Any
from typing import Literal
from typing import TYPE_CHECKING
import warnings

import numpy as np
from optuna.distributions import CategoricalDistribution

from optuna_ctpe._space_records import as_group
from optuna_ctpe._space_records import as_layer
from optuna_ctpe._space_records import as_tensor
from optuna_ctpe._space_records import check_bits_grid
from optuna_ctpe._space_records import check_nonnegative
from optuna_ctpe._space_records import check_one_bit
from optuna_ctpe._space_records import check_widths_grid
from optuna_ctpe._space_records import is_int
from optuna_ctpe._space_records import LayerSensitivity
from optuna_ctpe._space_records import ParamTensor
from optuna_ctpe._space_records import QuantConfig
from optuna_ctpe._space_records import WidthGroupSensitivity
from optuna_ctpe.warm_start import ilp_allocation


if TYPE_CHECKING:
    import optuna
    import torch


__all__ = [
    "HessianSearchSpace",
    "LayerSensitivity",
    "ParamTensor",
    "QuantConfig",
    "WidthGroupSensitivity",
]

SCHEMA = "optuna-ctpe/hessian-search-space"
SCHEMA_VERSION = 1
DEFAULT_BITS = (2, 3, 4, 6, 8)
DEFAULT_WIDTHS = (0.5, 0.75, 1.0)
# Ω of uniform rounding falls about 4x per bit, so 16 = 4^2 admits choices up to about two bits
# below the most sensitive layer's median-bit damage. Budget 1 (no slack) pruned the best
# configurations away on the digits CNN (benchmarks/results/hessian_search.md).
DEFAULT_BUDGET = 16.0
BITS_PREFIX = "bits:"
WIDTH_PREFIX = "width:"
USER_ATTR_KEY = "ctpe:search_space"
# Old RDB schemas store attribute values as VARCHAR(2048); chunks whose JSON encoding stays under
# this length fit any Optuna storage.
_CHUNK_JSON_LENGTH = 2000
_FLOAT_BITS = 32


# ----------------------------------------------------------------------------------------------
# The search space
# ----------------------------------------------------------------------------------------------


class HessianSearchSpace:
    """Per-layer bit-widths and per-group widths, pruned by Hessian sensitivity.

    Build it from a model with :meth:`from_model` (torch), or from saved sensitivities with
    :meth:`from_sensitivities` (no torch). The parameters are named ``bits:<layer>`` and
    ``width:<group>``; a parameter left with a single choice after pruning is not searched
    (it is absent from :attr:`distributions`) but still appears in every :class:`QuantConfig`.
    See the module docstring for the pruning rule, which is our interpretation of
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
        budget: The pruning threshold as a multiple of ``Ω_ref`` (see the module docstring);
            ``math.inf`` keeps every choice, a smaller value prunes more.
        fixed_bits: Layer name -> bit-width of layers that are quantized but not searched
            (by convention, the first and last layers).
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
    ) -> None:
        self._bits = check_bits_grid(bits)
        self._widths = check_widths_grid(widths)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ValueError(f"budget must be a number > 0 (math.inf keeps all), got {budget!r}.")
        self._budget = float(budget)

        self._layers = self._validate_layers(layers)
        self._groups = self._validate_groups(groups)
        names = set(self._layers)
        fixed = dict(fixed_bits or {})
        for name, b in fixed.items():
            if name not in names:
                raise ValueError(
                    f"fixed_bits names unknown layer {name!r}; known layers: {sorted(names)}."
                )
            fixed[name] = check_one_bit(b, f"fixed_bits[{name!r}]")
        self._fixed_bits = fixed
        self._tensors = self._validate_tensors(tensors)
        self._choices = self._prune()

    # -- validation ------------------------------------------------------------------------

    def _validate_layers(
        self, layers: Sequence[LayerSensitivity | Mapping[str, Any]]
    ) -> dict[str, LayerSensitivity]:
        if isinstance(layers, Mapping) or not isinstance(layers, Sequence) or not layers:
            raise ValueError(f"layers must be a non-empty sequence, got {layers!r}.")
        out: dict[str, LayerSensitivity] = {}
        for item in layers:
            layer = as_layer(item)
            if not isinstance(layer.name, str) or not layer.name:
                raise ValueError(f"a layer name must be a non-empty string, got {layer.name!r}.")
            if layer.name in out:
                raise ValueError(f"layers has the layer {layer.name!r} twice.")
            trace = check_nonnegative(layer.mean_trace, f"the mean_trace of layer {layer.name!r}")
            stderr = check_nonnegative(
                layer.trace_stderr, f"the trace_stderr of layer {layer.name!r}"
            )
            if not is_int(layer.n_params) or layer.n_params < 1:
                raise ValueError(
                    f"the n_params of layer {layer.name!r} must be a positive integer, "
                    f"got {layer.n_params!r}."
                )
            missing = [b for b in self._bits if b not in layer.errors]
            if missing:
                raise ValueError(
                    f"the errors of layer {layer.name!r} lack the bit-widths {missing}."
                )
            errors = {
                b: check_nonnegative(layer.errors[b], f"errors[{b}] of layer {layer.name!r}")
                for b in self._bits
            }
            out[layer.name] = LayerSensitivity(
                layer.name, trace, int(layer.n_params), errors, stderr
            )
        return out

    def _validate_groups(
        self, groups: Sequence[WidthGroupSensitivity | Mapping[str, Any]]
    ) -> dict[str, WidthGroupSensitivity]:
        if isinstance(groups, Mapping) or not isinstance(groups, Sequence):
            raise ValueError(f"groups must be a sequence, got {groups!r}.")
        out: dict[str, WidthGroupSensitivity] = {}
        for item in groups:
            group = as_group(item)
            if not isinstance(group.name, str) or not group.name:
                raise ValueError(f"a group name must be a non-empty string, got {group.name!r}.")
            if group.name in out:
                raise ValueError(f"groups has the group {group.name!r} twice.")
            trace = check_nonnegative(group.mean_trace, f"the mean_trace of group {group.name!r}")
            if not is_int(group.n_channels) or group.n_channels < 1:
                raise ValueError(
                    f"the n_channels of group {group.name!r} must be a positive integer, "
                    f"got {group.n_channels!r}."
                )
            missing = [w for w in self._widths if w not in group.perturbations]
            if missing:
                raise ValueError(
                    f"the perturbations of group {group.name!r} lack the widths {missing}."
                )
            perturbations = {
                w: check_nonnegative(
                    group.perturbations[w], f"perturbations[{w}] of group {group.name!r}"
                )
                for w in self._widths
            }
            kept = None
            if group.kept_channels is not None:
                kept = {}
                for w in self._widths:
                    k = group.kept_channels.get(w)
                    if not is_int(k) or not 1 <= k <= group.n_channels:
                        raise ValueError(
                            f"kept_channels[{w}] of group {group.name!r} must be an integer in "
                            f"[1, {group.n_channels}], got {k!r}."
                        )
                    kept[w] = int(k)
            out[group.name] = WidthGroupSensitivity(
                group.name, int(group.n_channels), trace, perturbations, kept
            )
        return out

    def _validate_tensors(
        self, tensors: Sequence[ParamTensor | Mapping[str, Any]] | None
    ) -> tuple[ParamTensor, ...]:
        if tensors is None:
            if self._groups:
                raise ValueError(
                    "tensors is required when groups is not empty: the size effect of a width "
                    "depends on which tensors the group prunes."
                )
            return tuple(
                ParamTensor(f"{name}.weight", layer.n_params, layer=name)
                for name, layer in self._layers.items()
            )
        out = []
        seen: set[str] = set()
        for item in tensors:
            t = as_tensor(item)
            if t.name in seen:
                raise ValueError(f"tensors has the tensor {t.name!r} twice.")
            seen.add(t.name)
            if not is_int(t.numel) or t.numel < 1:
                raise ValueError(
                    f"the numel of tensor {t.name!r} must be a positive integer, got {t.numel!r}."
                )
            if t.layer is not None and t.layer not in self._layers:
                raise ValueError(f"tensor {t.name!r} names unknown layer {t.layer!r}.")
            for role in ("out_group", "in_group"):
                g = getattr(t, role)
                if g is None:
                    continue
                if g not in self._groups:
                    raise ValueError(f"tensor {t.name!r} names unknown {role} {g!r}.")
                if t.numel % self._groups[g].n_channels:
                    raise ValueError(
                        f"the numel {t.numel} of tensor {t.name!r} is not a multiple of the "
                        f"{self._groups[g].n_channels} channels of its {role} {g!r}."
                    )
            out.append(ParamTensor(t.name, int(t.numel), t.layer, t.out_group, t.in_group))
        unused = set(self._groups) - {t.out_group for t in out}
        if unused:
            raise ValueError(f"no tensor has the width groups {sorted(unused)} as out_group.")
        return tuple(out)

    # -- pruning ---------------------------------------------------------------------------

    def _omega_reference(self) -> float:
        searched = [n for n in self._layers if n not in self._fixed_bits]
        median_bits = self._bits[(len(self._bits) - 1) // 2]
        return max(
            (self._layers[n].mean_trace * self._layers[n].errors[median_bits] for n in searched),
            default=0.0,
        )

    def _threshold(self) -> float:
        ref = self._omega_reference()
        # With no measurable sensitivity there is nothing to prune on: keep everything.
        return math.inf if ref == 0 or math.isinf(self._budget) else self._budget * ref

    def _prune(self) -> dict[str, tuple[Any, ...]]:
        threshold = self._threshold()
        choices: dict[str, tuple[Any, ...]] = {}
        searched = [n for n in self._layers if n not in self._fixed_bits]
        kept_bits: dict[str, list[int]] = {}
        for name in searched:
            layer = self._layers[name]
            kept_bits[name] = [
                b
                for b in self._bits
                if b == self._bits[-1] or layer.mean_trace * layer.errors[b] <= threshold
            ]
        # Monotonicity: walking from the least to the most sensitive layer, the minimum bit-width
        # never decreases. Ties in the trace are ordered by name so the rule is deterministic.
        floor = self._bits[0]
        for name in sorted(searched, key=lambda n: (self._layers[n].mean_trace, n)):
            floor = max(floor, kept_bits[name][0])
            kept_bits[name] = [b for b in kept_bits[name] if b >= floor]
        for name in self._layers:
            if name in kept_bits:
                choices[BITS_PREFIX + name] = tuple(kept_bits[name])
            else:
                choices[BITS_PREFIX + name] = (self._fixed_bits[name],)
        for name, group in self._groups.items():
            choices[WIDTH_PREFIX + name] = tuple(
                w
                for w in self._widths
                if w == self._widths[-1] or group.mean_trace * group.perturbations[w] <= threshold
            )
        return choices

    # -- read-only views -------------------------------------------------------------------

    @property
    def bits(self) -> tuple[int, ...]:
        """The bit-width grid, ascending."""
        return self._bits

    @property
    def widths(self) -> tuple[float, ...]:
        """The width-ratio grid, ascending."""
        return self._widths

    @property
    def budget(self) -> float:
        """The pruning threshold as a multiple of ``Ω_ref``."""
        return self._budget

    @property
    def fixed_bits(self) -> Mapping[str, int]:
        """Layers quantized at a fixed bit-width, not searched."""
        return types.MappingProxyType(self._fixed_bits)

    @property
    def sensitivities(self) -> Mapping[str, LayerSensitivity]:
        """Layer name -> its :class:`LayerSensitivity` (mean trace, its error, parameters)."""
        return types.MappingProxyType(self._layers)

    @property
    def groups(self) -> Mapping[str, WidthGroupSensitivity]:
        """Width-group name -> its :class:`WidthGroupSensitivity`."""
        return types.MappingProxyType(self._groups)

    @property
    def tensors(self) -> tuple[ParamTensor, ...]:
        """The parameter tensors :meth:`size` accounts for."""
        return self._tensors

    @property
    def choices(self) -> Mapping[str, tuple[Any, ...]]:
        """Parameter name -> the choices kept by pruning, for every parameter (even fixed)."""
        return types.MappingProxyType(self._choices)

    @property
    def omega(self) -> Mapping[str, Mapping[Any, float]]:
        """Parameter name -> {choice: Ω} over the full grid (before pruning)."""
        out: dict[str, Mapping[Any, float]] = {}
        for name, layer in self._layers.items():
            out[BITS_PREFIX + name] = {b: layer.mean_trace * layer.errors[b] for b in self._bits}
        for name, group in self._groups.items():
            out[WIDTH_PREFIX + name] = {
                w: group.mean_trace * group.perturbations[w] for w in self._widths
            }
        return types.MappingProxyType(out)

    @property
    def distributions(self) -> dict[str, CategoricalDistribution]:
        """Searched parameter name -> its :class:`~optuna.distributions.CategoricalDistribution`.

        Parameters with a single choice left (fixed layers, fully pruned ones) are omitted.
        """
        return {
            name: CategoricalDistribution(list(c))
            for name, c in self._choices.items()
            if len(c) > 1
        }

    def _log10_size(self, counts: Sequence[int]) -> float:
        return float(sum(math.log10(c) for c in counts))

    @property
    def log10_size_before(self) -> float:
        """log10 of the number of configurations before pruning (fixed layers excluded)."""
        n_searched = sum(1 for n in self._layers if n not in self._fixed_bits)
        return self._log10_size(
            [len(self._bits)] * n_searched + [len(self._widths)] * len(self._groups)
        )

    @property
    def log10_size_after(self) -> float:
        """log10 of the number of configurations after pruning."""
        return self._log10_size([len(c) for c in self._choices.values()])

    def with_budget(self, budget: float) -> HessianSearchSpace:
        """The same sensitivities pruned with another ``budget`` (``math.inf``: no pruning)."""
        return type(self)(
            list(self._layers.values()),
            list(self._groups.values()),
            tensors=self._tensors,
            bits=self._bits,
            widths=self._widths,
            budget=budget,
            fixed_bits=self._fixed_bits,
        )

    def relaxed_for_size(
        self, size_ratio: float | None = None, *, size_bits: int | None = None
    ) -> HessianSearchSpace:
        """This space, re-pruned with the smallest budget >= :attr:`budget` that fits a size.

        Hessian pruning knows nothing of the size target: under a tight target it can remove
        every configuration that fits. This returns ``self`` if the smallest configuration of
        the pruned space fits, otherwise the space pruned at the smallest threshold (one of the
        choices' own Ω values) at which it does, so no choice is readmitted needlessly.

        Args:
            size_ratio: Size target as a fraction of :attr:`fp32_bits`, in (0, 1].
            size_bits: Size target in bits, instead of ``size_ratio``.

        Raises:
            ValueError: If not exactly one target is given, or even the unpruned grid's smallest
                configuration exceeds it.
        """
        target = self._size_target(size_ratio, size_bits)
        reference = self._omega_reference()
        candidates = [self._budget]
        if reference > 0 and math.isfinite(self._budget):
            candidates += sorted(
                {v / reference for o in self.omega.values() for v in o.values()} - {0.0}
            )
        candidates.append(math.inf)
        for budget in candidates:
            if budget < self._budget:
                continue
            space = self if budget == self._budget else self.with_budget(budget)
            if space.size(space._cheapest()) <= target:
                return space
        raise ValueError(
            f"no configuration of the full grid fits {target:.0f} bits; the smallest has "
            f"{self.with_budget(math.inf).size(self.with_budget(math.inf)._cheapest())} bits."
        )

    def _cheapest(self) -> QuantConfig:
        # Size grows with every bit-width and ratio, so the smallest configuration takes the
        # smallest kept choice of every parameter.
        return self.config_from_params({name: min(c) for name, c in self._choices.items()})

    def _size_target(self, size_ratio: float | None, size_bits: int | None) -> float:
        if (size_ratio is None) == (size_bits is None):
            raise ValueError("give exactly one of size_ratio and size_bits.")
        if size_ratio is not None:
            if (
                isinstance(size_ratio, bool)
                or not isinstance(size_ratio, (int, float))
                or not 0 < size_ratio <= 1
            ):
                raise ValueError(f"size_ratio must be in (0, 1], got {size_ratio!r}.")
            return size_ratio * self.fp32_bits
        if not is_int(size_bits) or size_bits <= 0:
            raise ValueError(f"size_bits must be a positive integer, got {size_bits!r}.")
        return float(size_bits)

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
        bits: dict[str, int] = {}
        widths: dict[str, float] = {}
        for name, choices in self._choices.items():
            if len(choices) == 1 and name not in params:
                value = choices[0]
            elif name not in params:
                raise ValueError(f"params lacks the searched parameter {name!r}.")
            else:
                value = params[name]
                if value not in choices:
                    raise ValueError(
                        f"params[{name!r}]={value!r} is not one of its choices {list(choices)}."
                    )
            if name.startswith(BITS_PREFIX):
                bits[name[len(BITS_PREFIX) :]] = int(value)
            else:
                widths[name[len(WIDTH_PREFIX) :]] = float(value)
        return QuantConfig(bits, widths)

    def to_params(self, config: QuantConfig) -> dict[str, Any]:
        """The searched parameters of ``config``, e.g. for :meth:`optuna.Study.enqueue_trial`."""
        self._check_config(config)
        out: dict[str, Any] = {}
        for name in self.distributions:
            if name.startswith(BITS_PREFIX):
                out[name] = config.bits[name[len(BITS_PREFIX) :]]
            else:
                out[name] = config.widths[name[len(WIDTH_PREFIX) :]]
        return out

    def uniform(self, bits: int, width: float = 1.0) -> QuantConfig:
        """The configuration with every searched layer at ``bits`` and every group at ``width``.

        Fixed layers keep their fixed bit-width. The result need not lie in the pruned space
        (use it as a reference point, e.g. uniform 8-bit).
        """
        bits = check_one_bit(bits, "bits")
        if not 0 < width <= 1:
            raise ValueError(f"width must be a ratio in (0, 1], got {width!r}.")
        return QuantConfig(
            {n: self._fixed_bits.get(n, bits) for n in self._layers},
            {g: float(width) for g in self._groups},
        )

    def _check_config(self, config: QuantConfig) -> None:
        if not isinstance(config, QuantConfig):
            raise ValueError(f"config must be a QuantConfig, got {config!r}.")
        if set(config.bits) != set(self._layers):
            raise ValueError(
                f"config.bits must name exactly the layers {sorted(self._layers)}, got "
                f"{sorted(config.bits)}."
            )
        if set(config.widths) != set(self._groups):
            raise ValueError(
                f"config.widths must name exactly the groups {sorted(self._groups)}, got "
                f"{sorted(config.widths)}."
            )
        for name, b in config.bits.items():
            check_one_bit(b, f"config.bits[{name!r}]")
        for name, w in config.widths.items():
            if not 0 < w <= 1:
                raise ValueError(f"config.widths[{name!r}] must be in (0, 1], got {w!r}.")

    def size(self, config: QuantConfig) -> int:
        """Exact storage of the model under ``config``, in bits.

        Each weight of a quantized layer takes its bit-width, every other parameter (biases,
        normalisation) 32 bits; a width ratio shrinks each tensor the group prunes by the
        channels it removes, along the pruned dimension. Quantization scales are not counted.
        """
        self._check_config(config)
        return sum(
            self._numel(t, config.widths)
            * (config.bits[t.layer] if t.layer is not None else _FLOAT_BITS)
            for t in self._tensors
        )

    def _numel(self, tensor: ParamTensor, widths: Mapping[str, float]) -> int:
        """Elements of ``tensor`` left after pruning to ``widths`` (exact: numel is a multiple of
        the channels of each pruned dimension)."""
        numel = tensor.numel
        for g in (tensor.out_group, tensor.in_group):
            if g is not None:
                numel = numel // self._groups[g].n_channels * self._groups[g].kept(widths[g])
        return numel

    @property
    def fp32_bits(self) -> int:
        """Storage of the unpruned float32 model, in bits (the denominator of size ratios)."""
        return _FLOAT_BITS * sum(t.numel for t in self._tensors)

    def perturbation(self, config: QuantConfig) -> float:
        """The summed Ω of ``config`` (HAWQ-V2's estimate of twice the loss increase)."""
        self._check_config(config)
        omega = self.omega
        items = [(BITS_PREFIX + n, b) for n, b in config.bits.items() if n not in self._fixed_bits]
        items += [(WIDTH_PREFIX + g, w) for g, w in config.widths.items()]
        total = 0.0
        for name, value in items:  # fixed layers are skipped: the same in every configuration
            if value not in omega[name]:
                raise ValueError(
                    f"config sets {name!r} to {value!r}, outside the grid {list(omega[name])}."
                )
            total += omega[name][value]
        return float(total)

    # -- priors and warm starts ------------------------------------------------------------

    def prior_weights(
        self, temperature: float = 0.5, floor: float = 0.1
    ) -> dict[str, list[float]]:
        """Per-parameter weights over the choices, for ``ClusterTPESampler(prior_weights=)``.

        A choice's weight is ``exp((saving − risk) / temperature)``, normalised, then mixed with
        the uniform distribution (``floor`` of the mass), so that no choice is ruled out:

        * ``saving = 1 − choice / safest choice``, the fraction of the layer's bits (or the
          group's channels) the choice removes;
        * ``risk = log(1 + Ω / threshold)``, with ``threshold = budget × Ω_ref`` (``Ω_ref`` when
          nothing is pruned): at most ``log 2`` for kept choices, and growing only
          logarithmically beyond, because Ω is a second-order estimate that overstates how bad
          large perturbations rank against each other.

        Cheap-and-safe choices thus get the most weight.

        Args:
            temperature: Softness of the preference, > 0; a large value tends to uniform.
            floor: Fraction of the mass spread uniformly over the choices, in [0, 1].
        """
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not temperature > 0
        ):
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}.")
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
            raise ValueError(f"floor must be a number in [0, 1], got {floor!r}.")
        threshold = self._threshold()
        scale = threshold if math.isfinite(threshold) else (self._omega_reference() or 1.0)
        omega = self.omega
        out: dict[str, list[float]] = {}
        for name, dist in self.distributions.items():
            choices = list(dist.choices)
            top = max(choices)
            saving = np.array([1.0 - c / top for c in choices])
            risk = np.log1p([omega[name][c] / scale for c in choices])
            logits = (saving - risk) / temperature
            weights = np.exp(logits - logits.max())
            weights = (1 - floor) * weights / weights.sum() + floor / len(choices)
            out[name] = weights.tolist()
        return out

    def _linearised_ilp(
        self, target: float, start: QuantConfig, vary_widths: bool
    ) -> QuantConfig | None:
        """Best-Ω configuration within ``target`` bits by ILP, linearising the size around a point.

        The size is bilinear in bit-widths and width ratios; around ``start`` it is written as
        ``Σ_layer numel(start widths) × bits + Σ_group Δsize(group ratio)``, solved,
        re-linearised around the solution and re-solved, keeping the best configuration whose
        exact size fits.
        With ``vary_widths=False`` the problem is HAWQ-V3's bits-only ILP and exact in one pass.
        """
        omega = self.omega
        bit_params = list(self._layers)
        group_params = list(self._groups) if vary_widths else []
        best: QuantConfig | None = None
        best_omega = math.inf
        point = start
        seen: set[Any] = set()
        for _ in range(8):
            # Per-layer weight elements at the current widths: size of 1 bit for that layer.
            per_bit = {n: 0 for n in bit_params}
            constant = 0
            for t in self._tensors:
                numel = self._numel(t, point.widths)
                if t.layer is None:
                    constant += numel * _FLOAT_BITS
                else:
                    per_bit[t.layer] += numel
            omegas, costs = [], []
            for n in bit_params:
                c = self._choices[BITS_PREFIX + n]
                # A fixed layer has one choice, possibly off the grid: its Ω is a constant.
                omegas.append(
                    np.zeros(1)
                    if n in self._fixed_bits
                    else np.array([omega[BITS_PREFIX + n][b] for b in c])
                )
                costs.append(np.array([per_bit[n] * b for b in c], dtype=float))
            shift = 0.0
            base = self.size(point)
            for g in group_params:
                c = self._choices[WIDTH_PREFIX + g]
                deltas = []
                for w in c:
                    moved = QuantConfig(point.bits, {**point.widths, g: w})
                    deltas.append(self.size(moved) - base)
                deltas_arr = np.array(deltas, dtype=float)
                shift += deltas_arr.min()
                omegas.append(np.array([omega[WIDTH_PREFIX + g][w] for w in c]))
                costs.append(deltas_arr - deltas_arr.min())
            try:
                picks = ilp_allocation(omegas, costs, target - constant - shift)
            except ValueError:
                break
            bits = {n: self._choices[BITS_PREFIX + n][i] for n, i in zip(bit_params, picks)}
            widths = dict(point.widths)
            for g, i in zip(group_params, picks[len(bit_params) :]):
                widths[g] = self._choices[WIDTH_PREFIX + g][i]
            point = QuantConfig(bits, widths)
            if point in seen:
                break
            seen.add(point)
            if self.size(point) <= target and self.perturbation(point) < best_omega:
                best, best_omega = point, self.perturbation(point)
        return best

    def warm_starts(
        self, size_ratio: float | None = None, *, size_bits: int | None = None, n: int = 3
    ) -> list[dict[str, Any]]:
        """Configurations to enqueue before the search, best first, all within the size budget.

        Two HAWQ-V3-style ILP allocations (least summed Ω whose size fits the budget, see
        :func:`optuna_ctpe.warm_start.ilp_allocation`) come first, the one of less Ω leading:
        the exact bits-only allocation at full widths, and a joint allocation of bit-widths and
        width ratios (the size is bilinear in the two, so it is linearised around the current
        point and re-solved until the exact size fits). Then joint allocations at budgets shrunk
        by 10% steps, for diversity. Duplicates are dropped, so fewer than ``n`` may come back.

        Args:
            size_ratio: Size budget as a fraction of :attr:`fp32_bits`, in (0, 1]; e.g. 0.25 is
                about uniform 8-bit.
            size_bits: Size budget in bits, instead of ``size_ratio``.
            n: Maximum number of configurations, >= 1.

        Returns:
            Parameter dicts for :meth:`optuna.Study.enqueue_trial` (searched parameters only).

        Raises:
            ValueError: If not exactly one of ``size_ratio`` and ``size_bits`` is given, or if no
                configuration of the pruned space fits the budget.
        """
        target = self._size_target(size_ratio, size_bits)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}.")
        safest = self.config_from_params({name: max(c) for name, c in self._choices.items()})
        at_budget = [
            c
            for c in (
                self._linearised_ilp(target, safest, True),
                self._linearised_ilp(target, safest, False),
            )
            if c is not None
        ]
        # The joint problem is solved approximately (bilinear size), the bits-only one exactly:
        # lead with whichever has less Ω, so the first warm start is never worse than HAWQ-V3's.
        found: list[QuantConfig] = []
        for config in sorted(at_budget, key=self.perturbation):
            if config not in found:
                found.append(config)
        for k in range(1, n):
            if len(found) >= n:
                break
            config = self._linearised_ilp((1 - 0.1 * k) * target, safest, True)
            if config is not None and config not in found:
                found.append(config)
        found = found[:n]
        if not found:
            cheapest = self.size(self._cheapest())
            raise ValueError(
                f"no configuration of the pruned space fits {target:.0f} bits; the smallest "
                f"has {cheapest} bits ({cheapest / self.fp32_bits:.4f} of fp32). Raise the "
                "size target, or prune less (relaxed_for_size)."
            )
        return [self.to_params(c) for c in found]

    # -- serialisation ---------------------------------------------------------------------

    def to_json(self) -> str:
        """Serialise the space (inputs and resulting choices) as a JSON string."""
        data = {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "bits": list(self._bits),
            "widths": list(self._widths),
            "budget": self._budget if math.isfinite(self._budget) else "inf",
            "fixed_bits": self._fixed_bits,
            "layers": [
                {
                    "name": layer.name,
                    "mean_trace": layer.mean_trace,
                    "trace_stderr": layer.trace_stderr,
                    "n_params": layer.n_params,
                    "errors": {str(b): e for b, e in layer.errors.items()},
                }
                for layer in self._layers.values()
            ],
            "groups": [
                {
                    "name": g.name,
                    "n_channels": g.n_channels,
                    "mean_trace": g.mean_trace,
                    "perturbations": {repr(w): p for w, p in g.perturbations.items()},
                    "kept_channels": None
                    if g.kept_channels is None
                    else {repr(w): k for w, k in g.kept_channels.items()},
                }
                for g in self._groups.values()
            ],
            "tensors": [
                {k: v for k, v in vars(t).items() if v is not None} for t in self._tensors
            ],
            # Informative for readers (dashboard); checked against the recomputation on load.
            "choices": {name: list(c) for name, c in self._choices.items()},
        }
        return json.dumps(data, sort_keys=False)

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]) -> HessianSearchSpace:
        """Rebuild a space from :meth:`to_json`'s output (a string or the parsed object).

        Raises:
            ValueError: If the text is not JSON, not a search space of a supported schema
                version, or malformed (the message says which field).
        """
        if isinstance(text, Mapping):
            data: Any = text
        else:
            try:
                data = json.loads(text)
            except (TypeError, json.JSONDecodeError) as e:
                raise ValueError(f"search-space JSON is not valid JSON: {e}") from None
        if not isinstance(data, Mapping) or data.get("schema") != SCHEMA:
            raise ValueError(
                f"search-space JSON must be an object with schema {SCHEMA!r}, got "
                f"{(data.get('schema') if isinstance(data, Mapping) else type(data).__name__)!r}."
            )
        # ``type(...) is int``: ``True == 1`` in Python, and a boolean is no schema version.
        if type(data.get("version")) is not int or data.get("version") != SCHEMA_VERSION:
            raise ValueError(
                f"search-space JSON has schema version {data.get('version')!r}; this optuna-ctpe "
                f"reads version {SCHEMA_VERSION}."
            )
        try:
            budget = data["budget"]
            space = cls(
                data["layers"],
                data["groups"],
                tensors=data["tensors"],
                bits=data["bits"],
                widths=data["widths"],
                budget=math.inf if budget == "inf" else budget,
                fixed_bits=data["fixed_bits"],
            )
            stored = {name: tuple(c) for name, c in data["choices"].items()}
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"malformed search-space JSON: missing or mistyped field {e}."
            ) from None
        if stored != dict(space._choices):
            raise ValueError(
                "search-space JSON is inconsistent: its stored choices differ from those its "
                "sensitivities give (edited by hand, or written by another pruning rule)."
            )
        return space

    def save_to_study(self, study: optuna.Study) -> None:
        """Store the space in ``study``'s user attributes, for workers and optuna-dashboard.

        The JSON is split into chunks under ``ctpe:search_space:<i>`` (each fits the 2048-character
        attribute columns of old RDB schemas), plus ``ctpe:search_space`` holding the chunk count
        and a SHA-256 of the whole text.
        """
        text = self.to_json()
        chunks: list[str] = []
        current: list[str] = []
        length = 2  # the quotes of the JSON string
        for ch in text:
            encoded = len(json.dumps(ch)) - 2
            if length + encoded > _CHUNK_JSON_LENGTH:
                chunks.append("".join(current))
                current, length = [], 2
            current.append(ch)
            length += encoded
        chunks.append("".join(current))
        for i, chunk in enumerate(chunks):
            study.set_user_attr(f"{USER_ATTR_KEY}:{i}", chunk)
        study.set_user_attr(
            USER_ATTR_KEY,
            {"n_chunks": len(chunks), "sha256": hashlib.sha256(text.encode()).hexdigest()},
        )

    @classmethod
    def load_from_study(cls, study: optuna.Study) -> HessianSearchSpace:
        """Rebuild the space :meth:`save_to_study` stored in ``study``.

        Raises:
            ValueError: If the study holds no space, or its chunks are missing or corrupt.
        """
        attrs = study.user_attrs
        header = attrs.get(USER_ATTR_KEY)
        if not isinstance(header, Mapping) or not isinstance(header.get("n_chunks"), int):
            raise ValueError(
                f"study {study.study_name!r} holds no search space (user attribute "
                f"{USER_ATTR_KEY!r} missing or malformed); call save_to_study first."
            )
        try:
            text = "".join(attrs[f"{USER_ATTR_KEY}:{i}"] for i in range(header["n_chunks"]))
        except (KeyError, TypeError):
            raise ValueError(
                f"study {study.study_name!r} lacks chunks of its search space."
            ) from None
        if hashlib.sha256(text.encode()).hexdigest() != header.get("sha256"):
            raise ValueError(
                f"the search space stored in study {study.study_name!r} fails its checksum."
            )
        return cls.from_json(text)

    # -- torch side ------------------------------------------------------------------------

    @classmethod
    def from_sensitivities(
        cls,
        layers: Sequence[LayerSensitivity | Mapping[str, Any]],
        groups: Sequence[WidthGroupSensitivity | Mapping[str, Any]] = (),
        *,
        tensors: Sequence[ParamTensor | Mapping[str, Any]] | None = None,
        bits: Sequence[int] = DEFAULT_BITS,
        widths: Sequence[float] = DEFAULT_WIDTHS,
        budget: float = DEFAULT_BUDGET,
        fixed_bits: Mapping[str, int] | None = None,
    ) -> HessianSearchSpace:
        """Build a space from saved sensitivities, without torch. Same arguments as the class."""
        return cls(
            layers,
            groups,
            tensors=tensors,
            bits=bits,
            widths=widths,
            budget=budget,
            fixed_bits=fixed_bits,
        )

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        loss_fn: Any,
        batches: Sequence[Any],
        *,
        bits: Sequence[int] = DEFAULT_BITS,
        widths: Sequence[float] = DEFAULT_WIDTHS,
        layers: Sequence[str] | None = None,
        example_inputs: Any = None,
        keep_first_last_bits: int | None = 8,
        budget: float = DEFAULT_BUDGET,
        estimator: Literal["hutchinson", "fisher"] = "hutchinson",
        seed: int = 0,
        max_probes: int = 200,
        min_probes: int = 10,
        rtol: float = 0.05,
        progress: bool = False,
    ) -> HessianSearchSpace:
        """Measure ``model``'s sensitivities and build the pruned space (needs torch).

        Args:
            model: The trained full-precision model; it is not modified.
            loss_fn: ``loss_fn(model, batch) -> scalar tensor``, twice differentiable.
            batches: Calibration batches passed to ``loss_fn``.
            bits: The grid of weight bit-widths, integers in [2, 16].
            widths: The grid of width ratios in (0, 1]. Width groups are searched only when
                ``example_inputs`` is given and the grid has more than one ratio.
            layers: Names of the modules to quantize; by default every ``Conv1d/2d/3d`` and
                ``Linear`` module with a weight, in module order.
            example_inputs: Inputs for tracing channel dependencies (width groups); None
                searches bit-widths only.
            keep_first_last_bits: Bit-width the first and last of ``layers`` are fixed to, or
                None to search them like the others.
            budget: Pruning threshold as a multiple of ``Ω_ref``; see the module docstring.
            estimator: ``"hutchinson"`` (Hessian trace, HAWQ-V2) or ``"fisher"`` (empirical
                Fisher trace: cheaper, positive, a Gauss-Newton stand-in for the Hessian).
            seed: Seed of the random probes.
            max_probes: Most probe vectors per estimate.
            min_probes: Fewest probe vectors before the relative-error stop may trigger.
            rtol: Stop when every layer's relative standard error is below this.
            progress: Print the estimator's progress.

        Raises:
            ValueError: On a bad grid, an unknown layer name, an unknown ``estimator`` or a NaN
                sensitivity. A negative trace estimate (Hutchinson noise on an indefinite
                Hessian) is clipped to 0 with a warning.
        """
        from torch import nn

        from optuna_ctpe import quantize as _quantize
        from optuna_ctpe import sensitivity as _sensitivity

        bits = check_bits_grid(bits)
        widths = check_widths_grid(widths)
        if keep_first_last_bits is not None:
            check_one_bit(keep_first_last_bits, "keep_first_last_bits")
        estimators = {
            "hutchinson": _sensitivity.hutchinson_traces,
            "fisher": _sensitivity.empirical_fisher_traces,
        }
        if estimator not in estimators:
            raise ValueError(f"estimator must be one of {sorted(estimators)}, got {estimator!r}.")
        modules = dict(model.named_modules())
        weighted = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
        quantizable = [
            n for n, m in modules.items() if isinstance(m, weighted) and m.weight is not None
        ]
        if layers is None:
            names = quantizable
        else:
            if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
                raise ValueError(f"layers must be a non-empty sequence of names, got {layers!r}.")
            unknown = [n for n in layers if n not in quantizable]
            if unknown:
                raise ValueError(
                    f"layers names {unknown}, which are not Conv/Linear modules of the model; "
                    f"known: {quantizable}."
                )
            names = [n for n in quantizable if n in set(layers)]
        if not names:
            raise ValueError("the model has no Conv or Linear layer to quantize.")

        width_groups: list[Any] = []
        if example_inputs is not None and len(widths) > 1:
            from optuna_ctpe import width as _width

            width_groups = list(_width.width_groups(model, example_inputs))
        group_layers = {n for g in width_groups for n in g.layers if n in quantizable}
        traced = [n for n in quantizable if n in set(names) | group_layers]
        traces = estimators[estimator](
            model,
            loss_fn,
            batches,
            layers=traced,
            max_probes=max_probes,
            min_probes=min_probes,
            rtol=rtol,
            seed=seed,
            progress=progress,
        )
        mean_trace: dict[str, float] = {}
        for name in traced:
            t = traces[name]
            value = float(t.mean_trace)
            if math.isnan(value):
                raise ValueError(f"the {estimator} trace of layer {name!r} is NaN.")
            if value < 0:
                warnings.warn(
                    f"the {estimator} trace of layer {name!r} is negative ({value:.3g}, standard "
                    f"error {t.stderr / t.n_params:.3g}); clipped to 0. Use more probes or "
                    "estimator='fisher' if this layer matters.",
                    stacklevel=2,
                )
                value = 0.0
            mean_trace[name] = value

        sens = []
        for name in names:
            weight = modules[name].weight.detach()
            sens.append(
                LayerSensitivity(
                    name=name,
                    mean_trace=mean_trace[name],
                    n_params=int(weight.numel()),
                    errors={b: float(_quantize.quantization_error(weight, b)) for b in bits},
                    trace_stderr=float(traces[name].stderr) / int(weight.numel()),
                )
            )
        groups, tensors = _measure_groups(
            model, example_inputs, width_groups, widths, mean_trace, names
        )
        fixed = None
        if keep_first_last_bits is not None:
            fixed = {names[0]: keep_first_last_bits, names[-1]: keep_first_last_bits}
        return cls(
            sens,
            groups,
            tensors=tensors,
            bits=bits,
            widths=widths,
            budget=budget,
            fixed_bits=fixed,
        )

    def apply(
        self, model: torch.nn.Module, config: QuantConfig, example_inputs: Any = None
    ) -> torch.nn.Module:
        """A width-pruned, weight-quantized copy of ``model`` under ``config`` (needs torch).

        ``model`` is not modified. Widths are pruned first (dependency-aware, through
        :func:`optuna_ctpe.width.prune_widths`), then every layer's weight is fake-quantized
        to its bit-width with :func:`optuna_ctpe.quantize.quantize_model`.

        Raises:
            ValueError: If ``config`` does not fit the space, or a width below 1 is requested
                without ``example_inputs``.
        """
        from optuna_ctpe.quantize import quantize_model

        return quantize_model(self._pruned(model, config, example_inputs), dict(config.bits))

    def prune(
        self, model: torch.nn.Module, config: QuantConfig, example_inputs: Any = None
    ) -> torch.nn.Module:
        """The width-pruned float half of :meth:`apply`: a copy of ``model``, not quantized.

        A deep copy even when ``config`` keeps every width at 1, so the caller may always
        modify the result (fine-tune it, say) without touching ``model``.

        Raises:
            ValueError: If ``config`` does not fit the space, or a width below 1 is requested
                without ``example_inputs``.
        """
        import copy

        net = self._pruned(model, config, example_inputs)
        return copy.deepcopy(model) if net is model else net

    def _pruned(
        self, model: torch.nn.Module, config: QuantConfig, example_inputs: Any
    ) -> torch.nn.Module:
        """``model`` pruned to ``config``'s widths; ``model`` itself when no width is below 1."""
        self._check_config(config)
        self._check_model(model)
        pruned = {g: w for g, w in config.widths.items() if w < 1}
        if not pruned:
            return model
        if example_inputs is None:
            raise ValueError("example_inputs is required to prune widths below 1.")
        from optuna_ctpe.width import prune_widths

        return prune_widths(model, example_inputs, pruned)

    def _check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model whose searched layers differ in size from the ones measured.

        Names alone are not enough: another architecture can reuse them, and the space's size
        accounting and sensitivities would then silently describe a different model.
        """
        modules = dict(model.named_modules())
        missing = sorted(name for name in self._layers if name not in modules)
        if missing:
            raise ValueError(f"the search space names layers the model lacks: {missing}.")
        for name, layer in self._layers.items():
            weight = getattr(modules[name], "weight", None)
            numel = weight.numel() if weight is not None else None
            if numel != layer.n_params:
                raise ValueError(
                    f"layer {name!r} has {numel} weights but the search space was measured with "
                    f"{layer.n_params}: the model is not the one the space was built for."
                )

    def __repr__(self) -> str:
        return (
            f"HessianSearchSpace({len(self._layers)} layers, {len(self._groups)} width groups, "
            f"10^{self.log10_size_before:.1f} -> 10^{self.log10_size_after:.1f} configurations)"
        )


def _measure_groups(
    model: torch.nn.Module,
    example_inputs: Any,
    width_groups: Sequence[Any],
    widths: Sequence[float],
    mean_trace: Mapping[str, float],
    quantized: Sequence[str],
) -> tuple[list[WidthGroupSensitivity], list[ParamTensor]]:
    """Width-group sensitivities and the tensor-to-group map, measured by actually pruning.

    Pruning each group alone at each ratio and diffing parameter shapes gives, exactly as the
    pruner behaves, which tensors each group shrinks (and along which dimension) and how many
    channels each ratio keeps, so :meth:`HessianSearchSpace.size` needs no model.
    """
    from optuna_ctpe import width as _width

    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out_group: dict[str, str] = {}
    in_group: dict[str, str] = {}
    groups = []
    for g in width_groups:
        kept: dict[float, int] = {1.0: int(g.n_channels)} if 1.0 in widths else {}
        for w in widths:
            if w >= 1:
                continue
            pruned = _width.prune_widths(model, example_inputs, {g.name: w})
            for n, p in pruned.named_parameters():
                new, old = tuple(p.shape), shapes[n]
                if new[:1] != old[:1]:
                    out_group[n] = g.name
                    kept.setdefault(w, round(g.n_channels * new[0] / old[0]))
                if len(old) > 1 and new[1:2] != old[1:2]:
                    in_group[n] = g.name
        # Parameter-weighted mean trace of the group's layers: the average Hessian eigenvalue
        # over exactly the weights a width change removes.
        layer_names = [n for n in g.layers if n in mean_trace]
        n_params = [shapes[f"{n}.weight"] for n in layer_names]
        sizes = [int(np.prod(s)) for s in n_params]
        trace = (
            sum(mean_trace[n] * k for n, k in zip(layer_names, sizes)) / sum(sizes)
            if sizes
            else 0.0
        )
        groups.append(
            WidthGroupSensitivity(
                name=g.name,
                n_channels=int(g.n_channels),
                mean_trace=float(trace),
                perturbations={
                    w: float(_width.width_perturbation(model, g, w)) if w < 1 else 0.0
                    for w in widths
                },
                kept_channels=kept if len(kept) == len(widths) else None,
            )
        )
    layer_of = {f"{n}.weight": n for n in quantized}
    tensors = [
        ParamTensor(n, int(np.prod(s)), layer_of.get(n), out_group.get(n), in_group.get(n))
        for n, s in shapes.items()
    ]
    return groups, tensors
