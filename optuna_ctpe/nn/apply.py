"""A configuration -> a width-pruned (and weight-quantized) copy of a model, or the model itself
with its weights quantized in place for the time of a ``with`` block.

The other direction of :mod:`optuna_ctpe.nn.measure`: what :meth:`HessianSearchSpace.apply`,
:meth:`HessianSearchSpace.prune` and :meth:`HessianSearchSpace.applied` do with a model. Widths
are pruned first (dependency-aware, :func:`optuna_ctpe.nn.width.prune_widths`), then every
layer's weight is fake-quantized to its bit-width (:func:`optuna_ctpe.nn.quantize.quantize_model`).

A search scores one configuration per trial, and a copy per trial can cost more than the
evaluation (a deep copy of resnet18 takes about as long as scoring 64 images, quantizing all its
weights twice that; ``benchmarks/results/apply_cost.md``). :func:`configured_in_place` avoids
both: it swaps each layer's parameter storage (``param.data``) for a quantized tensor and swaps
the original back on exit, and a :class:`WeightCache` computes each (layer, bit-width) once.

Requires the ``torch`` extra.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping
import contextlib
import copy
from typing import Any

import torch
from torch import nn

from optuna_ctpe._validation import check_integer
from optuna_ctpe.nn._weight_store import WeightStore
from optuna_ctpe.nn.layers import LayerWeight
from optuna_ctpe.nn.layers import model_layers
from optuna_ctpe.nn.layers import weight_of
from optuna_ctpe.nn.quantize import quantize_model
from optuna_ctpe.nn.quantize import quantize_weight
from optuna_ctpe.nn.quantize import resolve_quantized_layers
from optuna_ctpe.nn.width import prune_widths
from optuna_ctpe.space.checks import check_config
from optuna_ctpe.space.records import HasSpec
from optuna_ctpe.space.records import LayerSensitivity
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import SpaceSpec
from optuna_ctpe.space.records import spec_of


__all__ = [
    "DEFAULT_CACHE_BYTES",
    "WeightCache",
    "apply_config",
    "applied_config",
    "check_model",
    "configured_copy",
    "configured_in_place",
    "quantized_in_place",
    "quantized_like",
]

#: The most bytes of quantized tensors a :class:`WeightCache` keeps by default (2 GiB: every
#: bit-width of 2 to 8 of a 70M-parameter float32 model).
DEFAULT_CACHE_BYTES = 2**31


def check_model(model: nn.Module, layers: Mapping[str, LayerSensitivity]) -> None:
    """Refuse a model whose measured ``layers`` are missing or differ in size.

    Names alone are not enough: another architecture can reuse them, and the space's size
    accounting and sensitivities would then silently describe a different model.
    """
    known = model_layers(model, include_embeddings=True)
    modules = dict(model.named_modules())
    missing = sorted(name for name in layers if name not in known and name not in modules)
    if missing:
        raise ValueError(f"the search space names layers the model lacks: {missing}.")
    for name, layer in layers.items():
        weight = known[name].weight if name in known else weight_of(modules[name])
        numel = weight.numel() if weight is not None else None
        if numel != layer.n_params:
            raise ValueError(
                f"layer {name!r} has {numel} weights but the search space was measured with "
                f"{layer.n_params}: the model is not the one the space was built for."
            )


def _pruned(
    model: nn.Module,
    layers: Mapping[str, LayerSensitivity],
    config: QuantConfig,
    example_inputs: Any,
) -> nn.Module:
    """``model`` pruned to ``config``'s widths; ``model`` itself when no width is below 1."""
    check_model(model, layers)
    pruned = {g: w for g, w in config.widths.items() if w < 1}
    if not pruned:
        return model
    if example_inputs is None:
        raise ValueError("example_inputs is required to prune widths below 1.")
    return prune_widths(model, example_inputs, pruned)


def apply_config(
    space: SpaceSpec | HasSpec,
    model: nn.Module,
    config: QuantConfig,
    example_inputs: Any = None,
    *,
    quantize: bool = True,
) -> nn.Module:
    """:meth:`HessianSearchSpace.apply <optuna_ctpe.HessianSearchSpace.apply>` (or, without
    ``quantize``, :meth:`~optuna_ctpe.HessianSearchSpace.prune`) as a function of the space's
    records: ``config`` checked against the space, then :func:`configured_copy`.

    Example:
        .. code-block:: python

            from optuna_ctpe import HessianSearchSpace
            from optuna_ctpe.nn.apply import apply_config
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task(seed=0)
            space = HessianSearchSpace.from_model(
                task.model, task.loss_fn, task.calibration_batches, max_probes=20
            )
            net = apply_config(space.spec, task.model, space.uniform(4))
            task.evaluate(net)  # the same as task.evaluate(space.apply(task.model, ...))

    Args:
        space: A :class:`~optuna_ctpe.HessianSearchSpace` or its
            :class:`~optuna_ctpe.space.records.SpaceSpec`.
        model: The model the space was measured on; it is not modified.
        config: A configuration of the space.
        example_inputs: Inputs for dependency tracing; required when a width is below 1.
        quantize: Quantize the weights, or only prune (a deep copy even at full widths).

    Raises:
        ValueError: If ``config`` does not fit the space, ``model`` is not the measured one, or
            a width below 1 is requested without ``example_inputs``.
    """
    spec = spec_of(space)
    config = check_config(spec, config)
    if quantize:
        _refuse_formats(config)
    return configured_copy(model, spec.layers, config, example_inputs, quantize=quantize)


def _refuse_formats(config: QuantConfig) -> None:
    """Refuse a format configuration, which the bit-width path would quantize in the legacy
    format of its bit-widths: silently the wrong model."""
    if config.formats:
        raise ValueError(
            "config names weight formats; apply it with optuna_ctpe.nn.formats.apply_formats "
            "or applied_formats (HessianSearchSpace.apply and applied do), not the bit-width path."
        )


def applied_config(
    space: SpaceSpec | HasSpec,
    model: nn.Module,
    config: QuantConfig,
    example_inputs: Any = None,
    *,
    cache: WeightCache | None = None,
) -> contextlib.AbstractContextManager[nn.Module]:
    """:meth:`HessianSearchSpace.applied <optuna_ctpe.HessianSearchSpace.applied>` as a
    function of the space's records: ``config`` checked against the space, then
    :func:`configured_in_place`.

    Args:
        space: A :class:`~optuna_ctpe.HessianSearchSpace` or its
            :class:`~optuna_ctpe.space.records.SpaceSpec`.
        model: The model the space was measured on; configured only inside the block.
        config: A configuration of the space.
        example_inputs: Inputs for dependency tracing; required when a width is below 1.
        cache: Quantized weights of ``model`` kept across calls; None quantizes afresh.

    Raises:
        ValueError: If ``config`` does not fit the space, ``model`` is not the measured one, or
            a width below 1 is requested without ``example_inputs``.
    """
    spec = spec_of(space)
    config = check_config(spec, config)
    _refuse_formats(config)
    return configured_in_place(model, spec.layers, config, example_inputs, cache=cache)


def configured_copy(
    model: nn.Module,
    layers: Mapping[str, LayerSensitivity],
    config: QuantConfig,
    example_inputs: Any = None,
    *,
    quantize: bool,
) -> nn.Module:
    """A copy of ``model`` pruned to ``config``'s widths and, with ``quantize``, fake-quantized
    to its bit-widths; ``model`` is not modified.

    Without ``quantize`` the result is a deep copy even when no width is below 1, so the caller
    may always modify it (fine-tune it, say).

    Args:
        model: The model the space was measured on.
        layers: The space's layer sensitivities (checked against ``model``).
        config: A configuration of the space.
        example_inputs: Inputs for dependency tracing; required when a width is below 1.
        quantize: Quantize the weights (``HessianSearchSpace.apply``) or only prune
            (``HessianSearchSpace.prune``).

    Raises:
        ValueError: If ``model`` does not match ``layers``, or a width below 1 is requested
            without ``example_inputs``.
    """
    net = _pruned(model, layers, config, example_inputs)
    if quantize:
        return quantize_model(net, dict(config.bits))
    return copy.deepcopy(model) if net is model else net


@contextlib.contextmanager
def configured_in_place(
    model: nn.Module,
    layers: Mapping[str, LayerSensitivity],
    config: QuantConfig,
    example_inputs: Any = None,
    *,
    cache: WeightCache | None = None,
) -> Iterator[nn.Module]:
    """``model`` configured to ``config`` inside the block, as it was after.

    With every width at 1, ``model`` itself with its weights quantized in place
    (:func:`quantized_in_place`); otherwise a pruned, quantized copy
    (:func:`configured_copy`), since pruning changes the model's structure.

    Args:
        model: The model the space was measured on.
        layers: The space's layer sensitivities (checked against ``model``).
        config: A configuration of the space.
        example_inputs: Inputs for dependency tracing; required when a width is below 1.
        cache: Quantized weights of ``model`` kept across calls; None quantizes afresh.

    Raises:
        ValueError: If ``model`` does not match ``layers``, or a width below 1 is requested
            without ``example_inputs``.
    """
    if any(w < 1 for w in config.widths.values()):
        yield configured_copy(model, layers, config, example_inputs, quantize=True)
        return
    check_model(model, layers)
    with quantized_in_place(model, config.bits, cache=cache) as net:
        yield net


@contextlib.contextmanager
def quantized_in_place(
    model: nn.Module, bits: Mapping[str, int], *, cache: WeightCache | None = None
) -> Iterator[nn.Module]:
    """``model`` with the weights of ``bits``' layers fake-quantized inside the block.

    The values are those of :func:`optuna_ctpe.nn.quantize.quantize_model`, so the model
    computes bit for bit what its quantized copy computes. Each parameter's storage is swapped
    for a quantized tensor of the same layout and the original storage swapped back on exit,
    also when the block raises: nothing is copied and the float weights are never written. A
    tied tensor is swapped once. Buffers, train/eval modes and every other parameter are the
    caller's: only the listed weights change. Not thread-safe: another thread using ``model``
    meanwhile sees quantized weights.

    Args:
        model: The network.
        bits: Layer name -> weight bit-width (see :func:`~optuna_ctpe.nn.quantize.quantize_model`).
        cache: Where quantized weights are kept across calls; None quantizes afresh.

    Raises:
        ValueError: On unknown layer names, modules without a weight, tied layers given
            different bit-widths, or bit-widths outside [2, 16].
        TypeError: If ``bits`` is not a mapping.
    """
    checked, resolved = resolve_quantized_layers(model, bits)
    # (parameter, its float storage, its version right after the swap, cache key)
    swapped: list[tuple[nn.Parameter, torch.Tensor, int, tuple[str, int]]] = []
    try:
        with torch.no_grad():
            for name, b in checked.items():
                layer, param = resolved[name], resolved[name].weight
                if any(p is param for p, *_ in swapped):
                    continue  # a tied tensor: quantized once
                q = (
                    quantized_like(param, b, layer.out_axis)
                    if cache is None
                    else cache.get(layer, b)
                )
                original = param.data
                param.data = q
                swapped.append((param, original, param._version, (layer.param_name, b)))
        yield model
    finally:
        for param, original, version, key in reversed(swapped):
            if cache is not None and param._version != version:
                cache.discard(key)  # written to inside the block: the cached tensor is spoilt
            param.data = original


def quantized_like(weight: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """:func:`~optuna_ctpe.nn.quantize.quantize_weight` of ``weight`` in a new tensor laid out
    (strides, memory format) like ``weight``, as :func:`quantize_model`'s copy holds it."""
    with torch.no_grad():
        source = weight.detach()
        return torch.empty_like(source).copy_(quantize_weight(source, bits, axis))


class WeightCache:
    """Quantized weights of one model per (layer, bit-width), reused from trial to trial.

    Pass one to :meth:`HessianSearchSpace.applied` in a search loop: each layer is then
    quantized once per bit-width instead of once per trial. An entry is used only while the
    model's weight is the float tensor it was computed from, unmodified (same storage, same
    version counter), so an optimiser step, an in-place op under ``torch.no_grad()`` or
    ``load_state_dict`` in between makes the cache recompute, never serve a stale weight. A
    write through ``.data`` (``p.data.copy_(...)``) bypasses the version counter: call
    :meth:`clear` after one. The least recently used entries are dropped beyond ``max_bytes``.
    Not thread-safe: one cache per model, used by one thread at a time.

    Args:
        max_bytes: The most bytes of quantized tensors kept, an integer >= 0 (0 caches
            nothing).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._store = WeightStore(check_integer(max_bytes, "max_bytes", minimum=0))

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

    def get(self, layer: LayerWeight, bits: int) -> torch.Tensor:
        """``layer``'s weight quantized to ``bits`` (see :func:`quantized_like`), from the cache
        when it holds an entry for the weight as it is now."""
        key = (layer.param_name, bits)
        q = self._store.lookup(key, layer.weight)
        if q is None:
            q = quantized_like(layer.weight, bits, layer.out_axis)
            self._store.store(key, layer.weight, q)
        return q

    def discard(self, key: tuple[str, int]) -> None:
        """Drop the entry of ``key`` (a ``(parameter name, bits)`` pair), if any."""
        self._store.discard(key)

    def clear(self) -> None:
        """Drop every entry."""
        self._store.clear()
