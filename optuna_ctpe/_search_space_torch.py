"""The torch half of :class:`~optuna_ctpe.HessianSearchSpace`'s face: measuring a model,
configuring it, and measuring what a configuration costs.

:class:`TorchFace` is a mixin of the class; each method imports its torch wing module
(:mod:`optuna_ctpe.nn`, :mod:`optuna_ctpe.deploy`) when called, so ``import optuna_ctpe``
still needs no torch. The records-only half lives in :mod:`optuna_ctpe.search_space`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import TYPE_CHECKING

from optuna_ctpe.space.records import check_config
from optuna_ctpe.space.records import DEFAULT_BITS
from optuna_ctpe.space.records import DEFAULT_BUDGET
from optuna_ctpe.space.records import DEFAULT_TRACE_Z
from optuna_ctpe.space.records import DEFAULT_WIDTHS
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import SpaceSpec


if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    import os

    import torch

    from optuna_ctpe.deploy.artifact import PackedFile
    from optuna_ctpe.nn.apply import WeightCache
    from optuna_ctpe.nn.traces import LayerTrace
    from optuna_ctpe.search_space import HessianSearchSpace


__all__ = ["TorchFace"]


class TorchFace:
    """The methods of :class:`~optuna_ctpe.HessianSearchSpace` that need torch."""

    _spec: SpaceSpec

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
        estimator: Literal["auto", "hutchinson", "fisher", "ggn", "split"] = "auto",
        include_embeddings: bool = False,
        seed: int = 0,
        max_probes: int = 200,
        min_probes: int = 10,
        rtol: float = 0.05,
        progress: bool = False,
        traces: Mapping[str, LayerTrace] | None = None,
        calibrate_widths: bool = False,
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

        Raises:
            ValueError: On a bad grid, an unknown layer name, an unknown ``estimator`` or a NaN
                sensitivity. A negative trace estimate (Hutchinson noise on an indefinite
                Hessian) is clipped to 0 with a warning.
            RuntimeError: If ``loss_fn`` is not twice differentiable (Hutchinson), naming the
                op without a second derivative and what to use instead.
        """
        from optuna_ctpe.nn.measure import measure

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
        )
        return cls(**records, budget=budget, trace_z=trace_z)

    def apply(
        self, model: torch.nn.Module, config: QuantConfig, example_inputs: Any = None
    ) -> torch.nn.Module:
        """A width-pruned, weight-quantized copy of ``model`` under ``config`` (needs torch).

        ``model`` is not modified; see :func:`optuna_ctpe.nn.apply.configured_copy`. Each
        layer's weight is quantized per output channel along its type's axis
        (:data:`optuna_ctpe.nn.layers.LAYER_TYPES`); a tied tensor once, at its one bit-width.
        The copy is the caller's to keep or modify; to score many configurations of one model,
        :meth:`applied` avoids the copy per configuration.

        Raises:
            ValueError: If ``config`` does not fit the space, or a width below 1 is requested
                without ``example_inputs``.
        """
        return self._configured_copy(model, config, example_inputs, quantize=True)

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
        from optuna_ctpe.nn.apply import configured_in_place

        config = check_config(self._spec, config)
        return configured_in_place(model, self._spec.layers, config, example_inputs, cache=cache)

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
        return self._configured_copy(model, config, example_inputs, quantize=False)

    def _configured_copy(
        self, model: torch.nn.Module, config: QuantConfig, example_inputs: Any, *, quantize: bool
    ) -> torch.nn.Module:
        from optuna_ctpe.nn.apply import configured_copy

        config = check_config(self._spec, config)
        return configured_copy(model, self._spec.layers, config, example_inputs, quantize=quantize)

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
        :func:`~optuna_ctpe.deploy.artifact.load_packed` to load it."""
        from optuna_ctpe.deploy.artifact import save_packed

        kwargs = {"example_inputs": example_inputs, "metadata": metadata, "configured": configured}
        return save_packed(self, model, config, path, **kwargs)

    def loss_increase(
        self,
        model: torch.nn.Module,
        loss_fn: Any,
        batches: Sequence[Any],
        example_inputs: Any = None,
    ) -> Callable[[QuantConfig], float]:
        """``measure`` for :meth:`warm_starts` (needs torch): a configuration's calibration-loss
        increase over ``model``; see :func:`optuna_ctpe.nn.width_calibration.loss_increase_meter`.

        Raises:
            ValueError: If ``batches`` is empty or the loss of ``model`` is not finite.
        """
        from optuna_ctpe.nn.width_calibration import loss_increase_meter

        return loss_increase_meter(self, model, loss_fn, batches, example_inputs)
