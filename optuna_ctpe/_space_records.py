"""Plain-data records of a Hessian search space, and the validation of their fields.

:class:`QuantConfig` is one point of the space; :class:`LayerSensitivity`,
:class:`WidthGroupSensitivity` and :class:`ParamTensor` are what a
:class:`~optuna_ctpe.search_space.HessianSearchSpace` is built from (and what its JSON holds).
No torch here: the records travel through JSON and study attributes to machines without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
import math
import types
from typing import Any

import numpy as np


# ----------------------------------------------------------------------------------------------
# Plain-data records
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantConfig:
    """One point of the search space: a bit-width per quantized layer, a ratio per width group.

    Attributes:
        bits: Layer name -> weight bit-width, for every quantized layer (searched or fixed).
        widths: Width-group name -> fraction of channels kept, in (0, 1], for every group.
    """

    bits: Mapping[str, int]
    widths: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Read-only views keep the frozen dataclass really immutable (and safely hashable).
        object.__setattr__(self, "bits", types.MappingProxyType(dict(self.bits)))
        object.__setattr__(self, "widths", types.MappingProxyType(dict(self.widths)))

    def key(self) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, float], ...]]:
        """A hashable canonical key, e.g. to cache evaluations of repeated configurations."""
        return tuple(sorted(self.bits.items())), tuple(sorted(self.widths.items()))

    def __hash__(self) -> int:
        return hash(self.key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantConfig) and self.key() == other.key()

    def __repr__(self) -> str:
        return f"QuantConfig(bits={dict(self.bits)!r}, widths={dict(self.widths)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Mapping proxies do not pickle; rebuild from plain dicts (multiprocessing, caches).
        return QuantConfig, (dict(self.bits), dict(self.widths))


@dataclass(frozen=True)
class LayerSensitivity:
    """Sensitivity data of one quantizable layer.

    Attributes:
        name: Module name, e.g. ``"features.0"``.
        mean_trace: Hessian trace of the layer's weight divided by its parameter count (HAWQ-V2's
            average eigenvalue), finite and >= 0.
        n_params: Number of weight parameters (biases excluded).
        errors: Bit-width -> ``‖Q_b(W) − W‖²`` of the layer's weight; must cover the space's
            bit-widths.
        trace_stderr: Standard error of ``mean_trace`` (0 when it is exact or unknown).
    """

    name: str
    mean_trace: float
    n_params: int
    errors: Mapping[int, float]
    trace_stderr: float = 0.0


@dataclass(frozen=True)
class WidthGroupSensitivity:
    """Sensitivity data of one group of channels that must be pruned together.

    Attributes:
        name: Group name (by convention the name of the layer whose outputs it prunes).
        n_channels: Channels of the group at full width.
        mean_trace: Parameter-weighted mean of the ``mean_trace`` of the group's layers.
        perturbations: Width ratio -> squared norm of the weights that ratio removes; must cover
            the space's widths (1.0 -> 0).
        kept_channels: Width ratio -> channels left after pruning. Defaults to
            ``max(1, round(n_channels * ratio))``; :meth:`HessianSearchSpace.from_model` records
            the counts the pruner actually produces.
    """

    name: str
    n_channels: int
    mean_trace: float
    perturbations: Mapping[float, float]
    kept_channels: Mapping[float, int] | None = None

    def kept(self, ratio: float) -> int:
        """Channels left at ``ratio``."""
        if self.kept_channels is not None and ratio in self.kept_channels:
            return int(self.kept_channels[ratio])
        return max(1, round(self.n_channels * ratio))


@dataclass(frozen=True)
class ParamTensor:
    """A parameter tensor of the model, for exact size accounting.

    Attributes:
        name: Parameter name, e.g. ``"conv1.weight"``.
        numel: Number of elements at full width.
        layer: Name of the quantized layer whose bit-width this tensor is stored at, or None for a
            tensor kept in float32 (biases, normalisation parameters, unsearched layers).
        out_group: Width group that prunes the tensor's first dimension, or None.
        in_group: Width group that prunes the tensor's second dimension, or None.
    """

    name: str
    numel: int
    layer: str | None = None
    out_group: str | None = None
    in_group: str | None = None


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------


def check_bits_grid(bits: Sequence[int], argument: str = "bits") -> tuple[int, ...]:
    if isinstance(bits, (str, bytes)) or not isinstance(bits, Sequence) or not bits:
        raise ValueError(f"{argument} must be a non-empty sequence of integers, got {bits!r}.")
    for b in bits:
        check_one_bit(b, argument)
    if len(set(bits)) != len(bits):
        raise ValueError(f"{argument} must not repeat a value, got {list(bits)!r}.")
    return tuple(sorted(int(b) for b in bits))


def check_one_bit(b: Any, argument: str) -> int:
    if not is_int(b) or not 2 <= b <= 16:
        raise ValueError(f"{argument} must hold integers in [2, 16], got {b!r}.")
    return int(b)


def check_widths_grid(widths: Sequence[float]) -> tuple[float, ...]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
        raise ValueError(f"widths must be a non-empty sequence of ratios, got {widths!r}.")
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
            raise ValueError(f"widths must hold ratios in (0, 1], got {w!r}.")
    if len(set(widths)) != len(widths):
        raise ValueError(f"widths must not repeat a value, got {list(widths)!r}.")
    return tuple(sorted(float(w) for w in widths))


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_nonnegative(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{what} must be a number, got {value!r}.")
    value = float(value)
    if math.isnan(value) or value < 0 or math.isinf(value):
        raise ValueError(f"{what} must be finite and >= 0, got {value!r}.")
    return value


def as_layer(item: LayerSensitivity | Mapping[str, Any]) -> LayerSensitivity:
    if isinstance(item, LayerSensitivity):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(f"a layer must be a LayerSensitivity or a mapping, got {item!r}.")
    return LayerSensitivity(
        name=item["name"],
        mean_trace=item["mean_trace"],
        n_params=item["n_params"],
        errors={int(k): v for k, v in item["errors"].items()},
        trace_stderr=item.get("trace_stderr", 0.0),
    )


def as_group(item: WidthGroupSensitivity | Mapping[str, Any]) -> WidthGroupSensitivity:
    if isinstance(item, WidthGroupSensitivity):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(
            f"a width group must be a WidthGroupSensitivity or a mapping, got {item!r}."
        )
    kept = item.get("kept_channels")
    return WidthGroupSensitivity(
        name=item["name"],
        n_channels=item["n_channels"],
        mean_trace=item["mean_trace"],
        perturbations={float(k): v for k, v in item["perturbations"].items()},
        kept_channels=None if kept is None else {float(k): int(v) for k, v in kept.items()},
    )


def as_tensor(item: ParamTensor | Mapping[str, Any]) -> ParamTensor:
    if isinstance(item, ParamTensor):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(f"a tensor must be a ParamTensor or a mapping, got {item!r}.")
    name = item["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tensor name must be a non-empty string, got {name!r}.")
    return ParamTensor(
        name=name,
        numel=item["numel"],
        layer=item.get("layer"),
        out_group=item.get("out_group"),
        in_group=item.get("in_group"),
    )
