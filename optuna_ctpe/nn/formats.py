"""Weight formats on a model: each (layer, format) quantized once, and a model with one format
per layer for the time of a ``with`` block.

:class:`FormatQuantizer` is the per-search store. Round to nearest on any grid
(:func:`optuna_ctpe.nn.grids.fake_quantize`) is computed on first request; GPTQ formats
(:mod:`optuna_ctpe.nn.gptq`) need each layer's input Hessian, which the quantizer collects for
every GPTQ-capable layer in *one* pass over the calibration batches, on the first GPTQ request,
and factorises once per layer (:func:`~optuna_ctpe.nn.gptq.hessian_factor`) for all formats.
Every result is kept (least recently used dropped beyond ``max_bytes``), so a search that draws
formats per trial pays each (layer, format) once, and a trial then costs what a bit-width trial
costs with :class:`optuna_ctpe.nn.apply.WeightCache`: a swap of parameter storages
(:func:`formats_in_place`).

Fallbacks are never silent: a group longer than a layer's rows (one group per row), and a GPTQ
format on a layer without input vectors (embeddings and the others of
:func:`~optuna_ctpe.nn.gptq.gptq_unsupported`: rounded to nearest on the same grid), each raise
a :class:`~optuna_ctpe.space.formats.FormatFallbackWarning` naming the layer and are listed in
:attr:`FormatQuantizer.fallbacks`.

Requires the ``torch`` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
import contextlib
import copy
from typing import Any
import warnings

import torch
from torch import nn

from optuna_ctpe._validation import check_integer
from optuna_ctpe.nn._weight_store import WeightStore
from optuna_ctpe.nn.apply import check_model
from optuna_ctpe.nn.apply import configured_copy
from optuna_ctpe.nn.apply import DEFAULT_CACHE_BYTES
from optuna_ctpe.nn.gptq import collect_hessians
from optuna_ctpe.nn.gptq import gptq_rows
from optuna_ctpe.nn.gptq import gptq_unsupported
from optuna_ctpe.nn.gptq import GPTQSettings
from optuna_ctpe.nn.gptq import hessian_factor
from optuna_ctpe.nn.gptq import HessianFactor
from optuna_ctpe.nn.gptq import InputHessian
from optuna_ctpe.nn.grids import as_rows
from optuna_ctpe.nn.grids import dequantize
from optuna_ctpe.nn.grids import fake_quantize
from optuna_ctpe.nn.grids import fit_grid
from optuna_ctpe.nn.grids import from_rows
from optuna_ctpe.nn.grids import GridFit
from optuna_ctpe.nn.grids import round_to_grid
from optuna_ctpe.nn.layers import LayerWeight
from optuna_ctpe.nn.layers import model_layers
from optuna_ctpe.nn.layers import resolve_layers
from optuna_ctpe.space.checks import check_config
from optuna_ctpe.space.formats import as_format
from optuna_ctpe.space.formats import FormatFallbackWarning
from optuna_ctpe.space.formats import group_fallback
from optuna_ctpe.space.formats import WeightFormat
from optuna_ctpe.space.records import HasSpec
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import SpaceSpec
from optuna_ctpe.space.records import spec_of


__all__ = [
    "FormatQuantizer",
    "apply_formats",
    "applied_formats",
    "FORMAT_ERRORS",
    "format_errors",
    "formats_in_place",
]


class FormatQuantizer:
    """Quantized weights of one model per (layer, format), each computed once.

    Example:
        .. code-block:: python

            import torch
            from optuna_ctpe.nn.formats import FormatQuantizer, formats_in_place

            model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                        torch.nn.Linear(32, 4))
            batches = [torch.randn(16, 64) for _ in range(4)]
            quantizer = FormatQuantizer(model, calibration_batches=batches)
            config = {"0": "int3-g32-asym-gptq", "2": "int4-pc-sym-rtn"}
            with formats_in_place(model, config, quantizer) as net:
                net(batches[0])

    Args:
        model: The full-precision network (its weights are read, never written).
        calibration_batches: Batches for GPTQ's Hessians; None refuses GPTQ formats.
        forward: ``forward(model, batch)`` runs the model on a batch (a task's ``loss_fn``
            will do); None calls ``model(batch[0])`` for a tuple or list, else
            ``model(batch)``.
        layers: Names of the layers whose Hessians are collected (memory: ``n²`` float32 per
            layer of rows of ``n`` inputs); None collects every GPTQ-capable layer of
            :func:`~optuna_ctpe.nn.layers.model_layers`.
        settings: GPTQ's damping, block size and column order; None for the defaults of
            :class:`~optuna_ctpe.nn.gptq.GPTQSettings`.
        max_bytes: The most bytes of quantized tensors kept, an integer >= 0.

    Attributes:
        fallbacks: ``(layer, format name)`` -> what was done instead, for every fallback.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        calibration_batches: Iterable[Any] | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        layers: Iterable[str] | None = None,
        settings: GPTQSettings | None = None,
        max_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        if settings is None:
            settings = GPTQSettings()
        elif not isinstance(settings, GPTQSettings):
            raise ValueError(f"settings must be a GPTQSettings or None, got {settings!r}.")
        self.model = model
        self.settings = settings
        self.fallbacks: dict[tuple[str, str], str] = {}
        self._batches = calibration_batches
        self._forward = forward
        self._layer_names = None if layers is None else list(layers)
        self._hessians: dict[str, InputHessian] | None = None
        self._factors: dict[str, HessianFactor] = {}
        # The grid of each computed (layer, format): a few numbers per row, kept beside the
        # stored tensors (and dropped with them) so that codes() reads GPTQ's grids, which are
        # fitted during its sweep and cannot be fitted again from the float weight.
        self._fits: dict[Hashable, GridFit] = {}
        self._store = WeightStore(
            check_integer(max_bytes, "max_bytes", minimum=0),
            on_discard=lambda key: self._fits.pop(key, None),
        )

    @property
    def max_bytes(self) -> int:
        """The most bytes of quantized tensors kept."""
        return self._store.max_bytes

    @property
    def nbytes(self) -> int:
        """The bytes of quantized tensors held."""
        return self._store.nbytes

    def __len__(self) -> int:
        return len(self._store)

    def hessians(self) -> dict[str, InputHessian]:
        """The layers' input Hessians, collected in one calibration pass on first use.

        Raises:
            ValueError: If no ``calibration_batches`` were given, or they are empty.
        """
        if self._hessians is None:
            if self._batches is None:
                raise ValueError("GPTQ formats need calibration_batches; none were given.")
            if self._layer_names is None:
                layers = model_layers(self.model, include_embeddings=True)
            else:
                layers = resolve_layers(self.model, self._layer_names, "layers")
            self._hessians = collect_hessians(self.model, layers, self._batches, self._forward)
        return self._hessians

    def get(self, layer: LayerWeight | str, fmt: WeightFormat | str | int) -> torch.Tensor:
        """``layer``'s weight in ``fmt``: a tensor of the weight's shape, dtype and layout
        holding the dequantized values, from the store when it holds them for the weight as it
        is now.

        Args:
            layer: A layer of the model, or its name
                (:func:`~optuna_ctpe.nn.layers.resolve_layers`).
            fmt: A format, its name, or a bit-width (the legacy format).

        Raises:
            ValueError: On an unknown layer or a bad format.
        """
        if isinstance(layer, str):
            layer = resolve_layers(self.model, [layer], "layer")[layer]
        fmt = as_format(fmt, f"the format of layer {layer.name!r}")
        key = (layer.param_name, fmt.name)
        weight = layer.weight
        q = self._store.lookup(key, weight)
        if q is not None:
            return q
        with torch.no_grad():
            values, fit = self._quantize(layer, fmt)
            q = torch.empty_like(weight.detach()).copy_(values)
        if fit is not None:
            self._fits[key] = fit
        self._store.store(key, weight, q)
        return q

    def codes(
        self, layer: LayerWeight | str, fmt: WeightFormat | str | int
    ) -> tuple[torch.Tensor, GridFit]:
        """The integer codes and grid of ``layer``'s weight in ``fmt``: what a packed file or
        an ONNX graph stores, read from the quantized tensor of :meth:`get` (computed once).

        The codes are ``(rows, inputs)`` int32 (:func:`~optuna_ctpe.nn.grids.as_rows` order);
        ``dequantize(codes, *fit.columns(inputs))``, cast to the weight's dtype, is
        :meth:`get`'s tensor bit for bit, which is checked. Call it outside
        :func:`formats_in_place` (inside, a layer's weight is its quantized tensor, which
        :meth:`get` would take for a changed weight and quantize again).

        Args:
            layer: A layer of the model, or its name.
            fmt: A quantized format, its name, or a bit-width.

        Raises:
            ValueError: On an unknown layer, a bad or float format, or if the quantized tensor
                is not its codes times its grid (a weight stored in a dtype too narrow for
                its codes, such as bfloat16 at 8 bits).
        """
        if isinstance(layer, str):
            layer = resolve_layers(self.model, [layer], "layer")[layer]
        fmt = as_format(fmt, f"the format of layer {layer.name!r}")
        if not fmt.quantized:
            raise ValueError(f"format {fmt.name!r} of layer {layer.name!r} has no codes.")
        q = self.get(layer, fmt)
        fit = self._fits[(layer.param_name, fmt.name)]
        rows = as_rows(q, layer.out_axis)
        scale, zero = fit.columns(rows.shape[1])
        with torch.no_grad():
            # (q - z) s divided by s is q - z to far under half a step (|q - z| < 2^16), so the
            # rounding recovers the code exactly; the check below makes sure.
            lo, hi = fmt.code_range
            codes = (torch.round(rows / scale) + zero).clamp(lo, hi)
            rebuilt = from_rows(dequantize(codes, scale, zero), q, layer.out_axis)
        if not torch.equal(rebuilt, q):
            raise ValueError(
                f"the weight of layer {layer.name!r} in format {fmt.name!r} is not its codes "
                f"times its scales in {q.dtype} (a dtype too narrow for {fmt.bits}-bit codes)."
            )
        return codes.to(torch.int32), fit

    def _quantize(
        self, layer: LayerWeight, fmt: WeightFormat
    ) -> tuple[torch.Tensor, GridFit | None]:
        weight = layer.weight.detach()
        rows = as_rows(weight, layer.out_axis)
        if fmt.quantized and group_fallback(fmt, rows.shape[1]):
            self._fallback(
                layer,
                fmt,
                f"rows of {rows.shape[1]} inputs are shorter than groups of {fmt.group_size}: "
                "one group per row",
            )
        if not fmt.quantized:
            return fake_quantize(weight, fmt, layer.out_axis), None
        if fmt.rounding != "gptq":
            return self._nearest(rows, weight, layer, fmt)
        reason = gptq_unsupported(layer)
        hessians = self.hessians() if reason is None else {}
        if reason is None and layer.name not in hessians:
            reason = (
                "it has no Hessian (not among the quantizer's layers, or no calibration "
                "batch reached it)"
            )
        if reason is not None:
            self._fallback(layer, fmt, f"{reason}: rounded to nearest on the same grid")
            return self._nearest(rows, weight, layer, fmt)
        factor = self._factors.get(layer.name)
        if factor is None:
            factor = hessian_factor(hessians[layer.name].matrix(), self.settings)
            self._factors[layer.name] = factor
        q, fit = gptq_rows(rows, factor, fmt, self.settings)
        return from_rows(q, weight, layer.out_axis), fit

    @staticmethod
    def _nearest(
        rows: torch.Tensor, weight: torch.Tensor, layer: LayerWeight, fmt: WeightFormat
    ) -> tuple[torch.Tensor, GridFit]:
        """Round to nearest: :func:`~optuna_ctpe.nn.grids.fake_quantize`'s computation, with
        its grid."""
        fit = fit_grid(rows, fmt)
        q = round_to_grid(rows, *fit.columns(rows.shape[1]), fmt)
        return from_rows(q, weight, layer.out_axis), fit

    def _fallback(self, layer: LayerWeight, fmt: WeightFormat, what: str) -> None:
        self.fallbacks[(layer.name, fmt.name)] = what
        warnings.warn(
            f"layer {layer.name!r}, format {fmt.name!r}: {what}.",
            FormatFallbackWarning,
            stacklevel=4,
        )

    def discard(self, key: tuple[str, str]) -> None:
        """Drop the entry of ``key`` (a ``(parameter name, format name)`` pair), if any."""
        self._store.discard(key)

    def like(self, model: nn.Module) -> FormatQuantizer:
        """A new, empty quantizer of ``model`` (a width-pruned copy, say) with this one's
        calibration batches, forward, GPTQ settings and memory limit."""
        return FormatQuantizer(
            model,
            calibration_batches=self._batches,
            forward=self._forward,
            settings=self.settings,
            max_bytes=self.max_bytes,
        )

    def clear(self) -> None:
        """Drop every quantized tensor and the Hessians (collected again when next needed)."""
        self._store.clear()
        self._fits.clear()
        self._hessians = None
        self._factors.clear()


@contextlib.contextmanager
def formats_in_place(
    model: nn.Module,
    formats: Mapping[str, WeightFormat | str | int],
    quantizer: FormatQuantizer,
) -> Iterator[nn.Module]:
    """``model`` with each named layer's weight in its format inside the block.

    Each parameter's storage is swapped for its quantized tensor from ``quantizer`` and the
    original swapped back on exit, also when the block raises, as
    :func:`optuna_ctpe.nn.apply.quantized_in_place` does for bit-widths. A tied tensor is
    swapped once.

    Args:
        model: The network ``quantizer`` was built on.
        formats: Layer name -> format (a :class:`~optuna_ctpe.space.formats.WeightFormat`, a
            format name, or a bit-width meaning the legacy format). Layers not named stay
            float.
        quantizer: The store of quantized weights.

    Raises:
        ValueError: If ``quantizer`` belongs to another model, on unknown layer names or bad
            formats, or if tied layers are given different formats.
        TypeError: If ``formats`` is not a mapping.
    """
    if quantizer.model is not model:
        raise ValueError("quantizer was built on another model.")
    if not isinstance(formats, Mapping):
        raise TypeError(f"formats must be a mapping of layer names to formats, got {formats!r}.")
    checked = {n: as_format(f, f"formats[{n!r}]") for n, f in formats.items()}
    layers = resolve_layers(model, list(checked), "formats")
    by_tensor: dict[int, dict[str, str]] = {}
    for name, layer in layers.items():
        by_tensor.setdefault(id(layer.weight), {})[name] = checked[name].name
    for named in by_tensor.values():
        if len(set(named.values())) > 1:
            raise ValueError(
                f"formats gives the layers {sorted(named)} different formats {named}, but they "
                "share one (tied) weight tensor, which is stored and quantized once."
            )
    swapped: list[tuple[nn.Parameter, torch.Tensor, int, tuple[str, str]]] = []
    try:
        with torch.no_grad():
            for name, fmt in checked.items():
                layer, param = layers[name], layers[name].weight
                if any(p is param for p, *_ in swapped):
                    continue
                q = quantizer.get(layer, fmt)
                original = param.data
                param.data = q
                swapped.append((param, original, param._version, (layer.param_name, fmt.name)))
        yield model
    finally:
        for param, original, version, key in reversed(swapped):
            if param._version != version:
                quantizer.discard(key)  # written to inside the block: the stored tensor is spoilt
            param.data = original


#: How :func:`format_errors` measures a format's weight change.
FORMAT_ERRORS = ("output", "weight")


def format_errors(
    quantizer: FormatQuantizer,
    layers: Iterable[LayerWeight],
    formats: Iterable[str],
    metric: str = "output",
) -> dict[str, dict[str, float]]:
    """Layer name -> {format name: the squared size of the weight change ``Δ = Q_f(W) − W``},
    with ``Q_f(W)`` the weight ``quantizer`` actually produces in each format (GPTQ's output
    for a GPTQ format): the ``‖ΔW‖²`` of a format's Ω (:mod:`optuna_ctpe.space.omega`).

    ``"weight"`` is ``‖Δ‖²``, HAWQ-V2's reading (an input Hessian proportional to the identity).
    It cannot rank GPTQ: GPTQ *raises* the weight error to lower the layer's output error
    ``tr(Δ H Δᵀ)`` (``H = 2 X Xᵀ / N``, its calibration inputs), so on the weight error every
    GPTQ format looks worse than round to nearest on its grid, is dominated at the same size,
    and would be pruned from every layer. ``"output"`` (the default) is that output error
    rescaled to the units of ``‖Δ‖²``: ``tr(Δ H Δᵀ) · n / tr(H)`` for rows of ``n`` inputs,
    which equals ``‖Δ‖²`` when ``H`` is a multiple of the identity, so Ω keeps its meaning
    (trace × squared change) and layers stay comparable. A layer without input vectors (an
    embedding, a grouped or transposed convolution: :func:`~optuna_ctpe.nn.gptq.gptq_unsupported`)
    or whose inputs are all zero is measured by ``"weight"``.

    Args:
        quantizer: The store of quantized weights of the model the layers belong to; with
            ``"output"`` it needs calibration batches (its Hessians, one pass, shared with
            GPTQ).
        layers: The layers.
        formats: The format names.
        metric: ``"output"`` or ``"weight"``.

    Raises:
        ValueError: On another ``metric``, or ``"output"`` without calibration batches.
    """
    if metric not in FORMAT_ERRORS:
        raise ValueError(f"metric must be one of {list(FORMAT_ERRORS)}, got {metric!r}.")
    names = list(formats)
    layers = list(layers)
    hessians = {}
    if metric == "output" and any(gptq_unsupported(layer) is None for layer in layers):
        hessians = quantizer.hessians()
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for layer in layers:
            weight = layer.weight.detach().double()
            h = hessians.get(layer.name) if gptq_unsupported(layer) is None else None
            matrix = None if h is None or h.count == 0 else h.matrix()
            scale = 0.0 if matrix is None else float(matrix.diagonal().sum())
            errors = {}
            for f in names:
                delta = quantizer.get(layer, f).double() - weight
                if scale > 0:
                    rows = as_rows(delta, layer.out_axis).to(matrix.device, torch.float64)
                    output = float(((rows @ matrix) * rows).sum())
                    errors[f] = max(0.0, output) * matrix.shape[0] / scale
                else:
                    errors[f] = float(delta.pow(2).sum())
            out[layer.name] = errors
    return out


@contextlib.contextmanager
def applied_formats(
    space: SpaceSpec | HasSpec,
    model: nn.Module,
    config: QuantConfig,
    quantizer: FormatQuantizer,
    example_inputs: Any = None,
) -> Iterator[nn.Module]:
    """``model`` configured to a format configuration inside the block, as it was after.

    With every width at 1, ``model`` itself with each layer's weight in its format
    (:func:`formats_in_place`, each (layer, format) from ``quantizer``'s store); otherwise a
    width-pruned copy quantized by a quantizer of its own (:meth:`FormatQuantizer.like`: GPTQ
    then collects the pruned model's Hessians, one calibration pass per call).

    Args:
        space: A :class:`~optuna_ctpe.HessianSearchSpace` or its
            :class:`~optuna_ctpe.space.records.SpaceSpec` (a format space).
        model: The model the space was measured on.
        config: A configuration of the space.
        quantizer: ``model``'s store of quantized weights.
        example_inputs: Inputs for dependency tracing; required when a width is below 1.

    Raises:
        ValueError: If ``config`` does not fit the space, ``model`` is not the measured one or
            not ``quantizer``'s, or a width below 1 is requested without ``example_inputs``.
    """
    spec = spec_of(space)
    config = check_config(spec, config)
    if any(w < 1 for w in config.widths.values()):
        pruned = configured_copy(model, spec.layers, config, example_inputs, quantize=False)
        with formats_in_place(pruned, config.formats, quantizer.like(pruned)) as net:
            yield net
        return
    check_model(model, spec.layers)
    with formats_in_place(model, config.formats, quantizer) as net:
        yield net


def apply_formats(
    space: SpaceSpec | HasSpec,
    model: nn.Module,
    config: QuantConfig,
    quantizer: FormatQuantizer,
    example_inputs: Any = None,
) -> nn.Module:
    """A width-pruned copy of ``model`` with each layer's weight in its format of ``config``;
    ``model`` is not modified. The arguments and errors are :func:`applied_formats`'."""
    with applied_formats(space, model, config, quantizer, example_inputs) as net:
        return copy.deepcopy(net)
