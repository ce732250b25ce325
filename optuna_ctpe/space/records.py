"""Plain-data records of a Hessian search space.

:class:`QuantConfig` is one point of the space; :class:`LayerSensitivity`,
:class:`WidthGroupSensitivity` and :class:`ParamTensor` are what a space is built from (and what
its JSON holds); :class:`SpaceSpec` is the validated whole that every function of
:mod:`optuna_ctpe.space` works on. No torch here: the records travel through JSON and study
attributes to machines without it. Their validation, and :func:`make_spec`, which builds a
checked :class:`SpaceSpec`, are in :mod:`optuna_ctpe.space.checks`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
import types
from typing import Any
from typing import Protocol

from optuna_ctpe.space.formats import as_format
from optuna_ctpe.space.formats import parse_format


#: The default grid of weight bit-widths (the CLI's ``--bits`` default too).
DEFAULT_BITS = (2, 3, 4, 6, 8)
#: The default grid of width ratios (the CLI's ``--widths`` default too).
DEFAULT_WIDTHS = (0.5, 0.75, 1.0)
# Ω of uniform rounding falls about 4x per bit, so 16 = 4^2 admits choices up to about two bits
# below the most sensitive layer's median-bit damage. Budget 1 (no slack) pruned the best
# configurations away on the digits CNN (benchmarks/results/hessian_search.md).
DEFAULT_BUDGET = 16.0
# Pruning and priors read a layer's trace as ``mean_trace + z * trace_stderr``: z = 1 is a
# one-sided 84% upper bound, enough that a trace lost in its noise (20 Hutchinson probes on
# resnet18 gave standard errors as large as the values) is not read as "insensitive", without
# pruning a well-measured space much harder than its point estimates would.
DEFAULT_TRACE_Z = 1.0


def kept_channels(n_channels: int, ratio: float) -> int:
    """Channels left when a group of ``n_channels`` is pruned to ``ratio``: at least one."""
    return max(1, round(n_channels * ratio))


# ----------------------------------------------------------------------------------------------
# Plain-data records
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantConfig:
    """One point of the search space: a bit-width (or weight format) per quantized layer, a
    ratio per width group.

    A configuration of a bit-width space names bit-widths only (``formats`` empty), and is
    built, compared, hashed and printed exactly as before formats existed. A configuration of a
    format space (:attr:`SpaceSpec.formats`) names a format per layer; its ``bits`` are then
    the formats' bit-widths, derived, so code that reads only ``bits`` still sees the integer
    width of each layer's codes.

    Example:
        .. code-block:: python

            from optuna_ctpe.space.records import QuantConfig

            config = QuantConfig({}, formats={"fc": "int3-g128-asym-gptq"})
            config.bits["fc"]  # 3

    Attributes:
        bits: Layer name -> weight bit-width, for every quantized layer (searched or fixed).
        widths: Width-group name -> fraction of channels kept, in (0, 1], for every group.
        formats: Layer name -> weight format name (:mod:`optuna_ctpe.space.formats`), for every
            quantized layer of a format space; empty for a bit-width space. A
            :class:`~optuna_ctpe.space.formats.WeightFormat` or a bare bit-width (its legacy
            format) given here is stored by its name. With formats, ``bits`` may be left empty
            (it is derived); if given it must agree.
    """

    bits: Mapping[str, int]
    widths: Mapping[str, float] = field(default_factory=dict)
    formats: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        formats = {
            name: as_format(f, f"formats[{name!r}]").name for name, f in dict(self.formats).items()
        }
        bits = dict(self.bits)
        if formats:
            derived = {name: parse_format(f).bits for name, f in formats.items()}
            if bits and bits != derived:
                raise ValueError(
                    f"bits {bits} disagree with the bit-widths of formats {formats}; leave bits "
                    "empty to derive them."
                )
            bits = derived
        # Read-only views keep the frozen dataclass really immutable (and safely hashable).
        object.__setattr__(self, "bits", types.MappingProxyType(bits))
        object.__setattr__(self, "widths", types.MappingProxyType(dict(self.widths)))
        object.__setattr__(self, "formats", types.MappingProxyType(formats))

    def key(self) -> tuple[tuple[tuple[str, Any], ...], ...]:
        """A hashable canonical key, e.g. to cache evaluations of repeated configurations.

        A bit-width configuration's key is the pair it has always been; a format
        configuration's adds its formats.
        """
        base = tuple(sorted(self.bits.items())), tuple(sorted(self.widths.items()))
        return base if not self.formats else (*base, tuple(sorted(self.formats.items())))

    def __hash__(self) -> int:
        return hash(self.key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantConfig) and self.key() == other.key()

    def __repr__(self) -> str:
        if self.formats:
            return f"QuantConfig(formats={dict(self.formats)!r}, widths={dict(self.widths)!r})"
        return f"QuantConfig(bits={dict(self.bits)!r}, widths={dict(self.widths)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Mapping proxies do not pickle; rebuild from plain dicts (multiprocessing, caches).
        if self.formats:
            return QuantConfig, ({}, dict(self.widths), dict(self.formats))
        return QuantConfig, (dict(self.bits), dict(self.widths))

    def layer_choices(self) -> Mapping[str, Any]:
        """Layer name -> what the space chooses for it: the format name in a format
        configuration, else the bit-width."""
        return self.formats if self.formats else self.bits


@dataclass(frozen=True)
class LayerSensitivity:
    """Sensitivity data of one quantizable layer.

    Attributes:
        name: Module name, e.g. ``"features.0"``.
        mean_trace: Hessian trace of the layer's weight divided by its parameter count (HAWQ-V2's
            average eigenvalue), finite and >= 0.
        n_params: Number of weight parameters (biases excluded).
        errors: Bit-width -> ``‖Q_b(W) − W‖²`` of the layer's weight; must cover the space's
            bit-widths. In a format space, format name -> ``‖Q_f(W) − W‖²`` with ``Q_f(W)`` the
            weight the format actually produces (GPTQ's output for a GPTQ format), covering the
            space's formats.
        trace_stderr: Standard error of ``mean_trace`` (0 when it is exact or unknown). The
            pruning rule and the priors use ``mean_trace + z × trace_stderr``
            (:func:`optuna_ctpe.space.omega.upper_trace`); a negative estimate clipped to 0 keeps
            its standard error, so it is never read as an exact zero.
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
            :func:`kept_channels` (``max(1, round(n_channels * ratio))``);
            :meth:`HessianSearchSpace.from_model` records the counts the pruner actually produces.
        loss_increase: Width ratio -> measured calibration-loss increase of pruning this group
            alone to that ratio, without fine-tuning (may be negative: noise, or a real gain);
            None when not measured. When present, Ω of a ratio is ``max(2 × loss_increase, Ω)``
            (:mod:`optuna_ctpe.nn.width_calibration`).
        trace_stderr: Standard error of ``mean_trace`` (the same parameter-weighted mean of
            the layers' standard errors: an upper bound, since the layers' estimates share
            their probes); 0 when exact or unknown, as in spaces saved before it was recorded.
            The pruning rule and the priors read ``mean_trace + z × trace_stderr``, as for
            layers.
    """

    name: str
    n_channels: int
    mean_trace: float
    perturbations: Mapping[float, float]
    kept_channels: Mapping[float, int] | None = None
    loss_increase: Mapping[float, float] | None = None
    trace_stderr: float = 0.0

    def kept(self, ratio: float) -> int:
        """Channels left at ``ratio``."""
        if self.kept_channels is not None and ratio in self.kept_channels:
            return int(self.kept_channels[ratio])
        return kept_channels(self.n_channels, ratio)


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
        scales: Per-channel float32 scales stored with a quantized tensor at full width (the
            channels along its quantization axis). 0, the default, counts none: records of
            spaces saved before scales were counted keep their old size accounting.
        scale_group: Width group that prunes the quantization axis (and so the scales), or
            None.
    """

    name: str
    numel: int
    layer: str | None = None
    out_group: str | None = None
    in_group: str | None = None
    scales: int = 0
    scale_group: str | None = None


@dataclass(frozen=True)
class SpaceSpec:
    """Everything a search space is built from, validated: the input of every space function.

    Build it with :func:`make_spec`, which checks every field; the dataclass itself checks
    nothing, so that :func:`dataclasses.replace` can change the budget of a checked spec.

    Attributes:
        layers: Layer name -> its sensitivity, in model order.
        groups: Width-group name -> its sensitivity.
        tensors: Every parameter tensor of the model, for size accounting.
        bits: The bit-width grid, ascending.
        widths: The width-ratio grid, ascending.
        budget: The pruning threshold as a multiple of ``Ω_ref`` (> 0, ``math.inf`` allowed).
        fixed_bits: Layer name -> bit-width of the quantized but unsearched layers.
        trace_z: How many standard errors the pruning rule and the priors add to each layer's
            mean trace (>= 0; 0 uses the point estimates, as spaces saved before it did).
        formats: The grid of weight format names of a format space, ordered by the size of
            the model with every layer in the format (smallest first; ties by name); empty
            for a bit-width space. With formats, ``bits`` holds their distinct bit-widths, and
            a fixed layer's bit-width ``b`` means the legacy format ``int{b}-pc-sym-rtn``.
        always_kept: Choices (format names, or bit-widths in a bit-width space) that pruning
            keeps in every searched layer, so that the uniform configurations they make stay
            in the space (:meth:`~optuna_ctpe.HessianSearchSpace.keeping`); empty by default.
        ties: Disjoint groups of two or more searched layers that must share one choice (a
            runtime fuses them: q/k/v projections, a Llama MLP's gate and up projections), each
            in model order; empty by default. A tie is one parameter of the space, named after
            its first layer (its *leader*); the others (its *followers*) take the leader's
            choice and have no parameter.
    """

    layers: Mapping[str, LayerSensitivity]
    groups: Mapping[str, WidthGroupSensitivity]
    tensors: tuple[ParamTensor, ...]
    bits: tuple[int, ...]
    widths: tuple[float, ...]
    budget: float
    fixed_bits: Mapping[str, int]
    trace_z: float = 0.0
    formats: tuple[str, ...] = ()
    always_kept: tuple[Any, ...] = ()
    ties: tuple[tuple[str, ...], ...] = ()

    def searched_layers(self) -> list[str]:
        """The layers whose bit-width is searched (not fixed), in model order."""
        return [n for n in self.layers if n not in self.fixed_bits]

    def tie_of(self, layer: str) -> tuple[str, ...]:
        """The layers that share ``layer``'s choice, in model order: its tie, or ``(layer,)``."""
        for tie in self.ties:
            if layer in tie:
                return tie
        return (layer,)

    def leader(self, layer: str) -> str:
        """The layer whose parameter carries ``layer``'s choice: its tie's first layer, or
        ``layer`` itself."""
        return self.tie_of(layer)[0]

    def leaders(self) -> list[str]:
        """Every layer that has a parameter (all but the followers of ties), in model order."""
        followers = {n for tie in self.ties for n in tie[1:]}
        return [n for n in self.layers if n not in followers]

    @property
    def grid(self) -> tuple[Any, ...]:
        """The choices of a layer before pruning, which are the format names of a format space,
        else the bit-widths (ascending in size either way)."""
        return self.formats if self.formats else self.bits

    def fixed_choice(self, layer: str) -> Any:
        """The choice of a fixed ``layer``: its bit-width, or in a format space the name of
        that bit-width's legacy format."""
        b = self.fixed_bits[layer]
        return as_format(b).name if self.formats else b


class HasSpec(Protocol):
    """Anything that carries a :class:`SpaceSpec`, e.g. :class:`~optuna_ctpe.HessianSearchSpace`.

    The torch wings (:mod:`optuna_ctpe.nn`, :mod:`optuna_ctpe.deploy`) take a space as this
    protocol, or as its :class:`SpaceSpec`, so they work on the records without importing the
    face that holds them.
    """

    @property
    def spec(self) -> SpaceSpec: ...


def spec_of(space: SpaceSpec | HasSpec) -> SpaceSpec:
    """The records of ``space``: a :class:`SpaceSpec` itself, or a search space's ``spec``.

    Raises:
        TypeError: If ``space`` is neither.
    """
    if isinstance(space, SpaceSpec):
        return space
    spec = getattr(space, "spec", None)
    if not isinstance(spec, SpaceSpec):
        raise TypeError(
            f"space must be a HessianSearchSpace or a SpaceSpec, got {type(space).__name__}."
        )
    return spec


# ----------------------------------------------------------------------------------------------
# Records from mappings (JSON)
# ----------------------------------------------------------------------------------------------


def as_layer(item: LayerSensitivity | Mapping[str, Any]) -> LayerSensitivity:
    """``item`` as a :class:`LayerSensitivity` (from the mapping of its fields)."""
    if isinstance(item, LayerSensitivity):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(f"a layer must be a LayerSensitivity or a mapping, got {item!r}.")
    return LayerSensitivity(
        name=item["name"],
        mean_trace=item["mean_trace"],
        n_params=item["n_params"],
        # Bit-widths are written as digit strings, format names as themselves.
        errors={(int(k) if str(k).isdigit() else k): v for k, v in item["errors"].items()},
        trace_stderr=item.get("trace_stderr", 0.0),
    )


def as_group(item: WidthGroupSensitivity | Mapping[str, Any]) -> WidthGroupSensitivity:
    """``item`` as a :class:`WidthGroupSensitivity` (from the mapping of its fields)."""
    if isinstance(item, WidthGroupSensitivity):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(
            f"a width group must be a WidthGroupSensitivity or a mapping, got {item!r}."
        )
    kept = item.get("kept_channels")
    # Absent from spaces saved before widths were calibrated: their Ω stays second-order.
    increase = item.get("loss_increase")
    return WidthGroupSensitivity(
        name=item["name"],
        n_channels=item["n_channels"],
        mean_trace=item["mean_trace"],
        perturbations={float(k): v for k, v in item["perturbations"].items()},
        kept_channels=None if kept is None else {float(k): int(v) for k, v in kept.items()},
        loss_increase=None if increase is None else {float(k): v for k, v in increase.items()},
        trace_stderr=item.get("trace_stderr", 0.0),
    )


def as_tensor(item: ParamTensor | Mapping[str, Any]) -> ParamTensor:
    """``item`` as a :class:`ParamTensor` (from the mapping of its fields)."""
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
        # Absent from spaces saved before scales were counted: they keep counting none.
        scales=item.get("scales", 0),
        scale_group=item.get("scale_group"),
    )
