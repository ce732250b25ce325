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
:meth:`~HessianSearchSpace.applied`, :meth:`~HessianSearchSpace.prune`,
:meth:`~HessianSearchSpace.save_packed` and :meth:`~HessianSearchSpace.loss_increase`) import
torch, each by calling one function of :mod:`optuna_ctpe.nn` or :mod:`optuna_ctpe.deploy` on the
space's records (:attr:`HessianSearchSpace.spec`). Imports point one way: this face calls
those wings, and they take records, never the face.
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

from optuna_ctpe._validation import check_integer
from optuna_ctpe.nn import EstimatorName
from optuna_ctpe.space import io
from optuna_ctpe.space import params as _params
from optuna_ctpe.space import pruning
from optuna_ctpe.space import size as _size
from optuna_ctpe.space.budget import budget_constraint
from optuna_ctpe.space.budget import BudgetConstraint
from optuna_ctpe.space.budget import LatencyEntries
from optuna_ctpe.space.checks import check_budget
from optuna_ctpe.space.checks import check_config
from optuna_ctpe.space.checks import check_ties
from optuna_ctpe.space.checks import make_spec
from optuna_ctpe.space.omega import omega_table
from optuna_ctpe.space.records import DEFAULT_BITS
from optuna_ctpe.space.records import DEFAULT_BUDGET
from optuna_ctpe.space.records import DEFAULT_TRACE_Z
from optuna_ctpe.space.records import DEFAULT_WIDTHS
from optuna_ctpe.space.records import LayerSensitivity
from optuna_ctpe.space.records import ParamTensor
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import SpaceSpec
from optuna_ctpe.space.records import WidthGroupSensitivity
from optuna_ctpe.space.warm_start import measured_warm_start_configs
from optuna_ctpe.space.warm_start import warm_start_configs


if TYPE_CHECKING:
    from collections.abc import Sequence
    from contextlib import AbstractContextManager
    import os

    import optuna
    import torch

    from optuna_ctpe.deploy.artifact import PackedFile
    from optuna_ctpe.nn.apply import WeightCache
    from optuna_ctpe.nn.formats import FormatQuantizer
    from optuna_ctpe.nn.traces import LayerTrace

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


class HessianSearchSpace:
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
        formats: Weight formats (:mod:`optuna_ctpe.space.formats`: records, names such as
            ``"int3-g128-asym-gptq"``, or bit-widths meaning their legacy format) of a format
            space, whose parameters ``format:<layer>`` choose among format names, and whose
            layers' ``errors`` are keyed by them; ``bits`` is then not read. None (the
            default) is a bit-width space, exactly as before formats existed.
        always_kept: Choices (format names, or bit-widths) pruning keeps in every searched
            layer, so the uniform configurations they make stay in the space (see
            :meth:`keeping`).
        ties: Groups of searched layers that must share one choice (layers a runtime fuses,
            such as q/k/v projections: :func:`optuna_ctpe.nn.heads.fused_layer_sets`), each
            searched as one parameter named after its first layer; see :meth:`tied`.
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
        formats: Sequence[Any] | None = None,
        always_kept: Sequence[Any] = (),
        ties: Sequence[Sequence[str]] = (),
    ) -> None:
        self._set_spec(
            make_spec(
                layers,
                groups,
                tensors,
                bits,
                widths,
                budget,
                fixed_bits,
                trace_z,
                formats,
                always_kept,
                ties,
            )
        )

    def _set_spec(self, spec: SpaceSpec) -> None:
        # The face keeps the validated records, their Ω table and the kept choices; every
        # method delegates to a function of optuna_ctpe.space over them.
        self._spec = spec
        self._omega = omega_table(spec)
        # The rule and the priors read Ω at the upper traces; sizes and warm starts the points.
        self._risk = omega_table(spec, upper=True)
        self._choices = pruning.prune(spec, self._risk)
        # The store of quantized weights of a format space's model, made on first need.
        self._quantizer: FormatQuantizer | None = getattr(self, "_quantizer", None)

    @classmethod
    def _from_spec(
        cls, spec: SpaceSpec, quantizer: FormatQuantizer | None = None
    ) -> HessianSearchSpace:
        """A space over an already validated ``spec`` (no second validation), sharing
        ``quantizer`` (the space it derives from keeps its quantized weights)."""
        space = cls.__new__(cls)
        space._quantizer = quantizer
        space._set_spec(spec)
        return space

    @classmethod
    def from_sensitivities(cls, *args: Any, **kwargs: Any) -> HessianSearchSpace:
        """Build a space from saved sensitivities, without torch: the class's own constructor.

        Named for symmetry with :meth:`from_model`; takes the class's arguments.
        """
        return cls(*args, **kwargs)

    # -- with a model (torch) --------------------------------------------------------------

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
        trace_z: float = DEFAULT_TRACE_Z,
        estimator: EstimatorName = "auto",
        include_embeddings: bool = False,
        seed: int = 0,
        max_probes: int = 200,
        min_probes: int = 10,
        rtol: float = 0.05,
        progress: bool = False,
        traces: Mapping[str, LayerTrace] | None = None,
        calibrate_widths: bool = False,
        formats: Sequence[Any] | None = None,
        format_error: str = "output",
        ties: Sequence[Sequence[str]] | str | None = None,
    ) -> HessianSearchSpace:
        """Measure ``model``'s sensitivities and build the pruned space (needs torch).

        The measurement is :func:`optuna_ctpe.nn.measure.measure`.

        Args:
            model: The trained full-precision model; it is not modified.
            loss_fn: ``loss_fn(model, batch) -> scalar tensor``, twice differentiable.
            batches: Calibration batches passed to ``loss_fn``.
            bits: The grid of weight bit-widths, integers in [2, 16].
            widths: The grid of width ratios in (0, 1]. Width groups are searched only when
                ``example_inputs`` is given and the grid has more than one ratio. They are
                torch-pruning's channel-dependency groups (convolutions of every kind, with the
                norms between them; a transformer's hidden and MLP sizes); an attention module
                with a known head count (BERT/ViT ``query``/``key``/``value``, ``q_proj``...)
                is pruned by whole heads, other attention projections (grouped-query, fused
                ``qkv``) keep their outputs. A group whose pruned model does not run is left
                out with a warning; GPT-2's ``Conv1D`` layers cannot be pruned (an error).
            layers: Names of the layers to quantize; by default every supported layer
                (:data:`optuna_ctpe.nn.layers.LAYER_TYPES`: Conv1d/2d/3d, ConvTranspose1d/2d/3d,
                Linear, GPT-2's ``Conv1D``, and the projection weights of
                ``nn.MultiheadAttention``, named after the parameter, e.g.
                ``"encoder.layers.0.self_attn.in_proj_weight"``), in module order. A module
                with a weight matrix of another type is named in a warning and left float.
            example_inputs: Inputs for tracing channel dependencies (width groups); None
                searches bit-widths only.
            keep_first_last_bits: Bit-width the first and last of ``layers`` are fixed to, or
                None to search them like the others.
            budget: Pruning threshold as a multiple of ``Ω_ref``; see
                :mod:`optuna_ctpe.space.pruning`.
            trace_z: Standard errors added to each mean trace where the pruning rule and the
                priors read it; see the class.
            estimator: ``"auto"`` (the GGN where ``loss_fn`` fits it, else Hutchinson's:
                :func:`optuna_ctpe.nn.sensitivity.resolve_estimator`), ``"hutchinson"``
                (Hessian trace, HAWQ-V2), ``"fisher"`` (empirical Fisher trace: cheaper,
                positive, needs first derivatives only), ``"ggn"`` (generalised Gauss-Newton
                trace: never negative, no cross-layer noise) or ``"split"`` (the Hessian trace
                as the GGN's plus Hutchinson's estimate of the rest: unbiased and far less
                noisy near a minimum); the last two need a ``loss_fn`` that calls the model
                once and is convex in its outputs (:mod:`optuna_ctpe.nn.ggn`). Hutchinson runs
                attention on PyTorch's math kernel, which has second derivatives, and restores
                the user's kernel choice.
            include_embeddings: Also search ``nn.Embedding`` tables (quantized per row) and
                layers tied to them (an LM head sharing the embedding: one layer, one
                bit-width, counted once); off by default.
            seed, max_probes, min_probes, rtol, progress: The estimator's probe seed, most and
                fewest probes, relative-error stop and progress bar (see
                :func:`optuna_ctpe.nn.hutchinson.hutchinson_traces`).
            traces: Per-layer traces measured before, name -> ``LayerTrace`` (e.g. the file
                ``optuna-ctpe sensitivity --output`` writes, read with
                :func:`optuna_ctpe.nn.trace_file.read_trace_file`): no Hessian-vector product is
                computed, and the estimator arguments are ignored. They must cover every layer
                that needs a trace, with the model's parameter counts (a ValueError otherwise).
            calibrate_widths: Price each width ratio at its measured calibration-loss increase
                where that exceeds the second-order Ω (one pruned forward pass over ``batches``
                per group and ratio; :mod:`optuna_ctpe.nn.width_calibration`).
            formats: Weight formats of a format space (names, records or bit-widths; see the
                class), instead of ``bits``. Each layer's error in each format is that of the
                weight the format actually produces, by one
                :class:`~optuna_ctpe.nn.formats.FormatQuantizer` of ``model`` calibrated on
                ``batches`` through ``loss_fn`` (GPTQ's Hessians: one pass), which the space
                keeps for :meth:`apply` and :meth:`applied`. None: a bit-width space.
            format_error: How a format's weight change is read, with ``formats``:
                ``"output"`` (the default), the layer's output error on the calibration inputs
                in units of ``‖ΔW‖²``, or ``"weight"``, ``‖ΔW‖²`` itself, which ranks every GPTQ
                format below round to nearest on its grid
                (:func:`optuna_ctpe.nn.formats.format_errors` says why).
            ties: Groups of layers that must share one choice (see :meth:`tied`, which
                applies them), or ``"fused"`` for the sets a runtime fuses in ``model``
                (:func:`optuna_ctpe.nn.heads.fused_layer_sets`: q/k/v projections, gate and up
                projections). None: no ties.

        Raises:
            ValueError: On a bad grid, an unknown layer name, an unknown ``estimator`` or a NaN
                sensitivity. A negative trace estimate (Hutchinson noise on an indefinite
                Hessian) is clipped to 0 with a warning.
            RuntimeError: If ``loss_fn`` is not twice differentiable (Hutchinson), naming the
                op without a second derivative and what to use instead.
        """
        from optuna_ctpe.nn.measure import measure

        if isinstance(ties, str) and ties != "fused":
            raise ValueError(f'ties must be a sequence of ties or "fused", got {ties!r}.')
        quantizer = None
        if formats is not None:
            from optuna_ctpe.nn.formats import FormatQuantizer

            quantizer = FormatQuantizer(
                model, calibration_batches=batches, forward=loss_fn, layers=layers
            )
        records = measure(
            model,
            loss_fn,
            batches,
            bits=bits,
            widths=widths,
            layers=layers,
            example_inputs=example_inputs,
            keep_first_last_bits=keep_first_last_bits,
            estimator=estimator,
            include_embeddings=include_embeddings,
            seed=seed,
            max_probes=max_probes,
            min_probes=min_probes,
            rtol=rtol,
            progress=progress,
            traces=traces,
            calibrate_widths=calibrate_widths,
            formats=formats,
            quantizer=quantizer,
            format_error=format_error,
        )
        space = cls(**records, budget=budget, trace_z=trace_z)
        space._quantizer = quantizer
        if ties is None:
            return space
        if isinstance(ties, str):
            from optuna_ctpe.nn.heads import fused_layer_sets

            measured = set(space._spec.layers)
            found = [tuple(n for n in tie if n in measured) for tie in fused_layer_sets(model)]
            ties = [tie for tie in found if len(tie) > 1]
        return space.tied(ties)

    def apply(
        self, model: torch.nn.Module, config: QuantConfig, example_inputs: Any = None
    ) -> torch.nn.Module:
        """A width-pruned, weight-quantized copy of ``model`` under ``config`` (needs torch).

        ``model`` is not modified; see :func:`optuna_ctpe.nn.apply.configured_copy`. Each
        layer's weight is quantized per output channel along its type's axis
        (:data:`optuna_ctpe.nn.layers.LAYER_TYPES`); a tied tensor once, at its one bit-width.
        The copy is the caller's to keep or modify; to score many configurations of one model,
        :meth:`applied` avoids the copy per configuration. In a format space each layer's
        weight is the one its format produces, from :meth:`format_quantizer`
        (:func:`optuna_ctpe.nn.formats.apply_formats`).

        Raises:
            ValueError: If ``config`` does not fit the space, or a width below 1 is requested
                without ``example_inputs``.
        """
        if self._spec.formats:
            from optuna_ctpe.nn.formats import apply_formats

            quantizer = self.format_quantizer(model)
            return apply_formats(self._spec, model, config, quantizer, example_inputs)
        from optuna_ctpe.nn.apply import apply_config

        return apply_config(self._spec, model, config, example_inputs, quantize=True)

    def format_quantizer(
        self,
        model: torch.nn.Module,
        calibration_batches: Sequence[Any] | None = None,
        forward: Callable[[torch.nn.Module, Any], Any] | None = None,
    ) -> FormatQuantizer:
        """The store of ``model``'s weights in each format that :meth:`apply` and
        :meth:`applied` use in a format space (needs torch): the one :meth:`from_model` made,
        or, for a space loaded from JSON or a study, one made here and kept.

        Args:
            model: The model the space was measured on.
            calibration_batches: Batches for GPTQ's Hessians. Given, a new quantizer of
                ``model`` is made with them and kept (call this once before the search of a
                loaded space); None returns the kept one of ``model``, or makes one without
                them, which refuses GPTQ formats.
            forward: ``forward(model, batch)``, e.g. the task's ``loss_fn``; see
                :class:`~optuna_ctpe.nn.formats.FormatQuantizer`.
        """
        stale = self._quantizer is None or self._quantizer.model is not model
        if stale or calibration_batches is not None:
            from optuna_ctpe.nn.formats import FormatQuantizer

            self._quantizer = FormatQuantizer(
                model, calibration_batches=calibration_batches, forward=forward
            )
        return self._quantizer

    def applied(
        self,
        model: torch.nn.Module,
        config: QuantConfig,
        example_inputs: Any = None,
        *,
        cache: WeightCache | None = None,
    ) -> AbstractContextManager[torch.nn.Module]:
        """``model`` configured to ``config`` for the time of a ``with`` block (needs torch).

        With every width at 1, the block gets ``model`` itself with its weights quantized in
        place, computing bit for bit what :meth:`apply`'s copy computes; on exit, also on an
        exception, every weight is its original tensor again. With a width below 1 it gets
        :meth:`apply`'s pruned copy. A :class:`~optuna_ctpe.nn.apply.WeightCache` keeps the
        quantized weights from call to call, so each (layer, bit-width) is quantized once::

            cache = WeightCache()
            for config in configs:
                with space.applied(model, config, cache=cache) as net:
                    scores.append(evaluate(net))

        In a format space each layer's weight is in its format, from :meth:`format_quantizer`'s
        store (``cache`` is not read; :func:`optuna_ctpe.nn.formats.applied_formats`).

        Inside the block ``model`` holds quantized weights: no other thread may use it
        meanwhile (give each thread its own copy of the model and its own cache), and
        ``evaluate`` must not need the float model. See
        :func:`optuna_ctpe.nn.apply.configured_in_place`.

        Args:
            model: The model the space was measured on.
            config: A configuration of the space.
            example_inputs: Inputs for dependency tracing; required when a width is below 1.
            cache: Quantized weights of ``model`` kept across calls; None quantizes afresh.

        Raises:
            ValueError: If ``config`` does not fit the space, ``model`` is not the measured
                one, or a width below 1 is requested without ``example_inputs``.
        """
        if self._spec.formats:
            from optuna_ctpe.nn.formats import applied_formats

            quantizer = self.format_quantizer(model)
            return applied_formats(self._spec, model, config, quantizer, example_inputs)
        from optuna_ctpe.nn.apply import applied_config

        return applied_config(self._spec, model, config, example_inputs, cache=cache)

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
        from optuna_ctpe.nn.apply import apply_config

        return apply_config(self._spec, model, config, example_inputs, quantize=False)

    def save_packed(
        self,
        model: torch.nn.Module,
        config: QuantConfig,
        path: str | os.PathLike[str],
        *,
        example_inputs: Any = None,
        metadata: Mapping[str, Any] | None = None,
        configured: torch.nn.Module | None = None,
    ) -> PackedFile:
        """Write :meth:`apply`'s model as a packed safetensors file whose size is
        :meth:`size`'s (needs torch and safetensors): see
        :func:`optuna_ctpe.deploy.artifact.save_packed`, and
        :func:`~optuna_ctpe.deploy.artifact.load_packed` to load it.

        A format configuration is written by
        :func:`~optuna_ctpe.deploy.artifact.save_packed_formats` with the weights of
        :meth:`format_quantizer` (GPTQ's included), unpruned only: the format file stores no
        widths, so a configuration with a width below 1 raises ValueError.
        """
        if config.formats:
            from optuna_ctpe.deploy.artifact import save_packed_formats

            pruned = sorted(name for name, ratio in config.widths.items() if ratio < 1.0)
            if pruned:
                raise ValueError(
                    "a format configuration is written unpruned; these width groups are pruned: "
                    f"{pruned}"
                )
            check_config(self._spec, config)  # a tied space refuses an untied configuration
            quantizer = self.format_quantizer(model)
            return save_packed_formats(model, config.formats, quantizer, path, metadata=metadata)
        from optuna_ctpe.deploy.artifact import save_packed

        kwargs = {"example_inputs": example_inputs, "metadata": metadata, "configured": configured}
        return save_packed(self._spec, model, config, path, **kwargs)

    def loss_increase(
        self,
        model: torch.nn.Module,
        loss_fn: Any,
        batches: Sequence[Any],
        example_inputs: Any = None,
    ) -> Callable[[QuantConfig], float]:
        """``measure`` for :meth:`warm_starts` (needs torch): a configuration's calibration-loss
        increase over ``model``; see :func:`optuna_ctpe.nn.width_calibration.loss_increase_meter`.
        In a format space each configuration is applied as :meth:`applied` does (the weights
        of :meth:`format_quantizer`).

        Raises:
            ValueError: If ``batches`` is empty or the loss of ``model`` is not finite.
        """
        from optuna_ctpe.nn.width_calibration import calibration_loss
        from optuna_ctpe.nn.width_calibration import loss_increase_meter

        if not self._spec.formats:
            return loss_increase_meter(self._spec, model, loss_fn, batches, example_inputs)
        base = calibration_loss(model, loss_fn, batches)  # validates batches and the loss

        def measure(config: QuantConfig) -> float:
            with self.applied(model, config, example_inputs) as net:
                return calibration_loss(net, loss_fn, batches) - base

        return measure

    # -- read-only views -------------------------------------------------------------------

    @property
    def spec(self) -> SpaceSpec:
        """The validated records the space is built from, which the functions of
        :mod:`optuna_ctpe.space`, :mod:`optuna_ctpe.nn` and :mod:`optuna_ctpe.deploy` take."""
        return self._spec

    @property
    def bits(self) -> tuple[int, ...]:
        """The bit-width grid, ascending."""
        return self._spec.bits

    @property
    def formats(self) -> tuple[str, ...]:
        """The format grid of a format space (names, smallest model first); empty for a
        bit-width space."""
        return self._spec.formats

    @property
    def always_kept(self) -> tuple[Any, ...]:
        """The choices pruning keeps in every searched layer (:meth:`keeping`)."""
        return self._spec.always_kept

    @property
    def ties(self) -> tuple[tuple[str, ...], ...]:
        """Groups of layers that share one choice (:meth:`tied`), each in model order."""
        return self._spec.ties

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
        """Layers whose trace cannot be told from zero
        (:func:`~optuna_ctpe.space.pruning.uncertain_layers`); the rule keeps only their safer
        choices."""
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
        """Parameter name -> ``{choice: Ω}`` over the full grid (before pruning)."""
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
        spec = dataclasses.replace(self._spec, budget=check_budget(budget))
        return self._from_spec(spec, self._quantizer)

    def keeping(self, choices: Sequence[Any]) -> HessianSearchSpace:
        """The same sensitivities with ``choices`` (format names, or bit-widths) kept in every
        searched layer by pruning, beside those already kept
        (:attr:`~optuna_ctpe.space.records.SpaceSpec.always_kept`).

        So a uniform configuration measured before the search (:meth:`uniform_formats`) can be
        enqueued: the search is then never worse than it. Stored with the space (JSON, study).

        Raises:
            ValueError: If a choice is not one of the grid's.
        """
        grid = self._spec.grid
        checked = [_grid_choice(c, grid) for c in choices]
        return self._remade(always_kept=(*self._spec.always_kept, *checked))

    def tied(self, ties: Sequence[Sequence[str]]) -> HessianSearchSpace:
        """The same sensitivities with ``ties`` as the space's ties (replacing any): each tie
        is a group of layers that must share one choice, e.g. the layers a runtime fuses
        (vLLM and TensorRT-LLM fuse q/k/v projections and a Llama MLP's gate and up
        projections, and cannot load a checkpoint where they differ).

        A tie is one parameter, named after its first layer in model order (``bits:<layer>``
        or ``format:<layer>``); the others take its value in every configuration
        (:meth:`suggest`, :meth:`config_from_params`, :meth:`warm_starts`, the repair of
        :meth:`size_constraint`), and :meth:`to_params` emits it alone. Pruning keeps the
        choices every layer of the tie keeps (:mod:`optuna_ctpe.space.pruning`, step 9); the
        ILP and the priors weigh a tie's choice by its layers' summed Ω and size. A
        configuration whose tied layers differ is refused where the space checks one
        (:meth:`size`, :meth:`apply`, :meth:`save_packed`, the ONNX export).

        A tie holding a fixed layer (the first or last layer, fixed by
        ``keep_first_last_bits``) cannot be searched: every layer of it is fixed at that
        layer's bit-width instead, and the tie is dropped; so ``space.tied(fused_layer_sets(
        model))`` works on any space :meth:`from_model` built. Stored with the space (JSON,
        study).

        Example:
            .. code-block:: python

                from optuna_ctpe import HessianSearchSpace
                from optuna_ctpe.space.records import LayerSensitivity

                layers = [
                    LayerSensitivity(n, 1.0, 100, {4: 0.5, 8: 0.01}) for n in ("q", "k", "v", "o")
                ]
                space = HessianSearchSpace(layers, bits=(4, 8)).tied([("q", "k", "v")])
                list(space.distributions)  # ['bits:q', 'bits:o']
                space.config_from_params({"bits:q": 4, "bits:o": 8}).bits["v"]  # 4

        Raises:
            ValueError: If a tie is not two or more known layers, a layer is in two ties, or
                the fixed layers of one tie have different bit-widths.
        """
        # Every rule but "searched" first (make_spec checks the ties left searched again).
        fixed = dict(self._spec.fixed_bits)
        searched_ties = []
        for tie in check_ties(ties, self._spec.layers, {}):
            pinned = {fixed[n] for n in tie if n in fixed}
            if not pinned:
                searched_ties.append(tie)
                continue
            if len(pinned) > 1:
                raise ValueError(
                    f"the tie {list(tie)} holds fixed layers of different bit-widths "
                    f"{sorted(pinned)}; they cannot share one choice."
                )
            fixed.update(dict.fromkeys(tie, pinned.pop()))
        return self._remade(fixed_bits=fixed, ties=searched_ties)

    def _remade(
        self,
        *,
        fixed_bits: Mapping[str, int] | None = None,
        always_kept: Sequence[Any] | None = None,
        ties: Sequence[Sequence[str]] | None = None,
    ) -> HessianSearchSpace:
        """This space's records validated again by ``make_spec``, with the fields given
        changed (None keeps a field), and the same format quantizer."""
        spec = self._spec
        remade = make_spec(
            list(spec.layers.values()),
            list(spec.groups.values()),
            spec.tensors,
            spec.bits,
            spec.widths,
            spec.budget,
            spec.fixed_bits if fixed_bits is None else fixed_bits,
            spec.trace_z,
            spec.formats or None,
            spec.always_kept if always_kept is None else always_kept,
            spec.ties if ties is None else ties,
        )
        return self._from_spec(remade, self._quantizer)

    def uniform_formats(
        self, size_ratio: float | None = None, *, size_bits: int | None = None
    ) -> list[Any]:
        """The grid's choices (format names, or bit-widths) whose uniform configuration
        (:meth:`uniform`, every width at 1) fits a size target, largest first.

        They are cheap to measure before a search; enqueue the best with
        :meth:`keeping`::

            fits = space.uniform_formats(size_ratio=0.1)
            best = max(fits, key=lambda c: score(space.apply(model, space.uniform(c))))
            space = space.keeping([best])
            study.enqueue_trial(space.to_params(space.uniform(best)))

        Args:
            size_ratio: Size target as a fraction of :attr:`fp32_bits`, in (0, 1].
            size_bits: Size target in bits, instead of ``size_ratio``.

        Raises:
            ValueError: If not exactly one target is given.
        """
        target = _size.size_target(self._spec, size_ratio, size_bits)
        sized = [(self.size(self.uniform(c)), c) for c in self._spec.grid]
        return [c for size, c in sorted(sized, key=lambda sc: -sc[0]) if size <= target]

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

        In a format space, pruning must not remove every uniform configuration that fits either
        (the search must never be worse than one the grid holds): if :meth:`uniform_formats`
        finds some that fit and the space holds none of them, the one of least Ω is kept
        (:meth:`keeping`). A bit-width space is relaxed as before formats existed; call
        :meth:`keeping` for it.

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
        space = self if budget == self.budget else self.with_budget(budget)
        fits = space.uniform_formats(size_bits=max(1, int(target))) if self.formats else []
        if fits and not any(space._holds(space.uniform(c)) for c in fits):
            space = space.keeping([min(fits, key=lambda c: space.perturbation(space.uniform(c)))])
        return space

    def _holds(self, config: QuantConfig) -> bool:
        """Whether every choice of ``config`` is kept by pruning."""
        return all(
            _params.config_value(config, name) in options
            for name, options in self._choices.items()
        )

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
        return _params.config_from_params(self._choices, params, self._spec.ties)

    def to_params(self, config: QuantConfig) -> dict[str, Any]:
        """The searched parameters of ``config``, e.g. for :meth:`optuna.Study.enqueue_trial`."""
        return _params.to_params(self._choices, check_config(self._spec, config))

    def uniform(self, bits: Any, width: float = 1.0) -> QuantConfig:
        """The configuration with every searched layer at ``bits`` and every group at ``width``.

        In a format space ``bits`` is a format (a name, a record, or a bit-width meaning its
        legacy format). Fixed layers keep their fixed bit-width. The result need not lie in the
        pruned space (use it as a reference point, e.g. uniform 8-bit).
        """
        return _params.uniform_config(self._spec, bits, width)

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
        ranked by their measured increase
        (:func:`~optuna_ctpe.space.warm_start.measured_warm_start_configs`)::

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


def _grid_choice(choice: Any, grid: tuple[Any, ...]) -> Any:
    """``choice`` as the grid spells it (a format record or bit-width as its name in a format
    grid), if it is one of ``grid``'s."""
    if grid and isinstance(grid[0], str):
        from optuna_ctpe.space.formats import as_format

        choice = as_format(choice, "choice").name
    if choice not in grid or isinstance(choice, bool):
        raise ValueError(f"{choice!r} is not a choice of the grid {list(grid)}.")
    return choice
