"""Weight formats: how one layer's weight is stored, as a frozen record with a short name.

A :class:`WeightFormat` fixes everything that decides a quantized weight and its size:

* ``bits``: the width of each integer code, 2 to 16 (or 16/32 for an unquantized float weight);
* ``group_size``: ``None`` for one scale per output channel (a weight *row*), or ``g`` for one
  scale per ``g`` consecutive input elements of a row (a row of ``n`` inputs has
  ``ceil(n / g)`` groups, the last one shorter when ``g`` does not divide ``n``);
* ``grid``: the integers a code may take and how the scale is fitted to a row or group of
  largest magnitude ``a`` (its smallest and largest value ``lo``, ``hi``):

  - ``"sym"``: codes in ``[-q_max, q_max]``, ``q_max = 2^(b-1) - 1``, scale ``a / q_max``:
    today's grid, symmetric around an exact 0, ``2^b - 1`` levels;
  - ``"fullsym"``: codes in ``[-2^(b-1), 2^(b-1) - 1]``, scale ``2a / (2^b - 1)``, all ``2^b``
    levels (the GPTQ reference's symmetric grid; ``+a`` rounds to the top code, slightly below
    it);
  - ``"asym"``: codes in ``[0, 2^b - 1]`` with an integer zero point ``z``: value
    ``s (q - z)``, ``s = (max(hi, 0) - min(lo, 0)) / (2^b - 1)``, ``z = round(-min(lo, 0) / s)``
    (0 is exactly representable, as zero padding and ReLU need);
  - ``"float"``: no codes, the weight stored as an IEEE float of ``bits`` 16 or 32;

* ``rounding``: ``"rtn"`` (each weight to its nearest level) or ``"gptq"`` (Frantar et al.
  2023's error-correcting rounding on calibration inputs, :mod:`optuna_ctpe.nn.gptq`).

Names read ``int{bits}-{pc|g<size>}-{grid}-{rounding}`` (``int4-pc-sym-rtn``,
``int3-g128-asym-gptq``) or ``fp16``/``fp32``; :func:`parse_format` reads them back, and the
name is what an Optuna categorical shows. Today's bit-width ``b`` is
:func:`legacy_format` ``(b)`` = ``int{b}-pc-sym-rtn``: stored spaces, studies, trace files and
packed files that speak of bit-widths keep meaning exactly that.

**What is stored, and so counted** (:func:`format_bits`): the codes at ``bits`` bits each;
per row or group one scale, float32 for per-channel formats (what packed files store beside
today's per-channel integers) and float16 for grouped ones (as onnxruntime's ``MatMulNBits``
takes them); per row or group of an ``"asym"`` format one zero point at ``bits`` bits. A scale
the quantizer uses is the stored one (rounded to float16 for grouped formats first), so the
dequantized weight is exactly what a packed file decodes. Example: ``int4-g128-asym-rtn`` on a
row of 384 inputs stores ``3 × (16 + 4)`` bits per row beside ``384 × 4``: 4.156 bits a weight.

**Groups longer than a row**: a layer whose rows have ``n <= g`` inputs gets one group per row
(it is quantized per channel, with the grouped format's float16 scale and zero point and
counted so); :func:`group_fallback` tells whether that happens, and the torch quantizer warns
with the layer's name (:class:`FormatFallbackWarning`), so it is never silent.

Pure Python: records travel through JSON and study attributes to machines without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import json
from typing import Any

from optuna_ctpe._validation import check_integer
from optuna_ctpe._validation import is_integer
from optuna_ctpe._validation import MAX_BITS
from optuna_ctpe._validation import MIN_BITS


__all__ = [
    "FORMAT_SCHEMA",
    "FORMAT_SCHEMA_VERSION",
    "FormatFallbackWarning",
    "CHANNEL_SCALE_BITS",
    "GRIDS",
    "GROUP_SCALE_BITS",
    "ROUNDINGS",
    "WeightFormat",
    "as_format",
    "effective_bits",
    "format_bits",
    "format_from_json",
    "format_to_json",
    "group_count",
    "group_fallback",
    "legacy_format",
    "parse_format",
]

#: The integer grids (see the module docstring), and ``"float"`` for an unquantized weight.
GRIDS = ("sym", "fullsym", "asym", "float")
#: The rounding rules.
ROUNDINGS = ("rtn", "gptq")
#: The ``schema`` of a format's JSON document.
FORMAT_SCHEMA = "optuna-ctpe/weight-format"
#: The version of that document this module writes and reads.
FORMAT_SCHEMA_VERSION = 1
#: The bits of each stored scale of a per-channel format (float32, as today's packed files).
CHANNEL_SCALE_BITS = 32
#: The bits of each stored scale of a grouped format (float16, as ``MatMulNBits`` takes them).
GROUP_SCALE_BITS = 16
_FLOAT_BITS = (16, 32)


class FormatFallbackWarning(UserWarning):
    """A layer cannot take its format as asked (a group longer than its rows, GPTQ on a layer
    type without calibration inputs) and is quantized in the documented fallback instead."""


@dataclass(frozen=True)
class WeightFormat:
    """How one layer's weight is stored and rounded (see the module docstring).

    Build one from its name with :func:`parse_format`; the constructor checks every field.

    Example:
        .. code-block:: python

            from optuna_ctpe.space.formats import WeightFormat, effective_bits

            fmt = WeightFormat(bits=4, group_size=128, grid="asym", rounding="gptq")
            fmt.name  # 'int4-g128-asym-gptq'
            effective_bits(fmt, in_features=384)  # 4.15625

    Attributes:
        bits: Bits per code, an integer in [2, 16]; 16 or 32 for ``grid="float"``.
        group_size: Input elements per scale, an integer >= 2, or None for one scale per
            output channel (None for ``"float"``).
        grid: One of :data:`GRIDS`.
        rounding: One of :data:`ROUNDINGS` (``"rtn"`` for ``"float"``: rounding to the
            nearest float).
    """

    bits: int
    group_size: int | None = None
    grid: str = "sym"
    rounding: str = "rtn"

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {list(GRIDS)}, got {self.grid!r}.")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {self.rounding!r}.")
        if self.grid == "float":
            if not is_integer(self.bits) or self.bits not in _FLOAT_BITS:
                raise ValueError(f"bits of a float format must be 16 or 32, got {self.bits!r}.")
            if self.group_size is not None or self.rounding != "rtn":
                raise ValueError(
                    "a float format has no groups and rounds to nearest: group_size must be "
                    f"None and rounding 'rtn', got {self.group_size!r} and {self.rounding!r}."
                )
        else:
            check_integer(self.bits, "bits", minimum=MIN_BITS, maximum=MAX_BITS)
            if self.group_size is not None:
                check_integer(self.group_size, "group_size", minimum=2, extra="or None")
        object.__setattr__(self, "bits", int(self.bits))
        if self.group_size is not None:
            object.__setattr__(self, "group_size", int(self.group_size))

    @property
    def name(self) -> str:
        """The short name (``int3-g128-asym-gptq``, ``int4-pc-sym-rtn``, ``fp16``)."""
        if self.grid == "float":
            return f"fp{self.bits}"
        granularity = "pc" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}-{granularity}-{self.grid}-{self.rounding}"

    @property
    def quantized(self) -> bool:
        """Whether the weight is stored as integer codes (every grid but ``"float"``)."""
        return self.grid != "float"

    @property
    def scale_bits(self) -> int:
        """The bits of each stored scale (32 per channel, 16 per group, 0 for a float format)."""
        if not self.quantized:
            return 0
        return CHANNEL_SCALE_BITS if self.group_size is None else GROUP_SCALE_BITS

    @property
    def zero_bits(self) -> int:
        """The bits of each stored zero point (``bits`` for ``"asym"``, else 0)."""
        return self.bits if self.grid == "asym" else 0

    @property
    def code_range(self) -> tuple[int, int]:
        """The smallest and largest integer code (``(0, 0)`` for a float format)."""
        b = self.bits
        if self.grid == "sym":
            return -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1
        if self.grid == "fullsym":
            return -(2 ** (b - 1)), 2 ** (b - 1) - 1
        if self.grid == "asym":
            return 0, 2**b - 1
        return 0, 0

    def __str__(self) -> str:
        return self.name


def legacy_format(bits: int) -> WeightFormat:
    """The format a bare bit-width has always meant: ``int{bits}-pc-sym-rtn``.

    Args:
        bits: An integer bit-width in [2, 16].
    """
    return WeightFormat(bits=check_integer(bits, "bits", minimum=MIN_BITS, maximum=MAX_BITS))


def parse_format(name: str) -> WeightFormat:
    """The :class:`WeightFormat` called ``name`` (the inverse of :attr:`WeightFormat.name`).

    Example:
        .. code-block:: python

            from optuna_ctpe.space.formats import parse_format

            parse_format("int3-g128-asym-gptq").group_size  # 128

    Raises:
        ValueError: Naming the part of ``name`` that is not understood.
    """
    if not isinstance(name, str):
        raise ValueError(f"a format name must be a string, got {name!r}.")
    if name in ("fp16", "fp32"):
        return WeightFormat(bits=int(name[2:]), grid="float")
    parts = name.split("-")
    if len(parts) != 4:
        raise ValueError(
            f"format name {name!r} must read 'int<bits>-<pc|g<size>>-<grid>-<rounding>' "
            "(e.g. 'int4-g128-asym-gptq') or be 'fp16'/'fp32'."
        )
    width, granularity, grid, rounding = parts
    if not (width.startswith("int") and width[3:].isdigit()):
        raise ValueError(f"format name {name!r}: {width!r} is not 'int<bits>'.")
    if granularity == "pc":
        group: int | None = None
    elif granularity.startswith("g") and granularity[1:].isdigit():
        group = int(granularity[1:])
    else:
        raise ValueError(
            f"format name {name!r}: {granularity!r} is neither 'pc' (per channel) nor "
            "'g<size>' (groups of <size> inputs)."
        )
    if grid not in GRIDS[:-1]:
        raise ValueError(f"format name {name!r}: grid {grid!r} is not one of {list(GRIDS[:-1])}.")
    if rounding not in ROUNDINGS:
        raise ValueError(
            f"format name {name!r}: rounding {rounding!r} is not one of {list(ROUNDINGS)}."
        )
    try:
        return WeightFormat(bits=int(width[3:]), group_size=group, grid=grid, rounding=rounding)
    except ValueError as error:
        raise ValueError(f"format name {name!r}: {error}") from None


def as_format(value: Any, what: str = "format") -> WeightFormat:
    """``value`` as a :class:`WeightFormat`: a format, its name, or a bare bit-width (the
    :func:`legacy_format`).

    Raises:
        ValueError: If ``value`` is none of those (the message names ``what``).
    """
    if isinstance(value, WeightFormat):
        return value
    if is_integer(value):
        if not MIN_BITS <= value <= MAX_BITS:
            raise ValueError(f"{what} must be a bit-width in [2, 16], got {value!r}.")
        return legacy_format(value)
    if isinstance(value, str):
        try:
            return parse_format(value)
        except ValueError as error:
            raise ValueError(f"{what}: {error}") from None
    raise ValueError(
        f"{what} must be a WeightFormat, a format name or a bit-width, got {value!r}."
    )


def format_to_json(fmt: WeightFormat) -> str:
    """The versioned JSON document of ``fmt`` (its fields and, for reading, its name)."""
    return json.dumps(
        {
            "schema": FORMAT_SCHEMA,
            "version": FORMAT_SCHEMA_VERSION,
            "name": fmt.name,
            "bits": fmt.bits,
            "group_size": fmt.group_size,
            "grid": fmt.grid,
            "rounding": fmt.rounding,
        },
        sort_keys=True,
    )


def format_from_json(text: str | Mapping[str, Any]) -> WeightFormat:
    """The format of a :func:`format_to_json` document (a string or the parsed mapping).

    Raises:
        ValueError: On another schema, a newer version, or fields that disagree with the name.
    """
    doc = json.loads(text) if isinstance(text, str) else dict(text)
    if doc.get("schema") != FORMAT_SCHEMA:
        raise ValueError(f"not a weight-format document: schema {doc.get('schema')!r}.")
    version = doc.get("version")
    if not is_integer(version) or not 1 <= version <= FORMAT_SCHEMA_VERSION:
        raise ValueError(
            f"weight-format document version {version!r} is not one this version reads "
            f"(1 to {FORMAT_SCHEMA_VERSION})."
        )
    fmt = WeightFormat(
        bits=doc["bits"], group_size=doc["group_size"], grid=doc["grid"], rounding=doc["rounding"]
    )
    if "name" in doc and doc["name"] != fmt.name:
        raise ValueError(f"weight-format document names {doc['name']!r} but holds {fmt.name!r}.")
    return fmt


def group_count(fmt: WeightFormat, in_features: int) -> int:
    """Scales per output channel: ``ceil(in_features / group_size)``, 1 per channel (0 for a
    float format).

    Args:
        fmt: The format.
        in_features: Input elements of one weight row (a Conv's ``in / groups × kernel``), an
            integer >= 1.
    """
    in_features = check_integer(in_features, "in_features", minimum=1)
    if not fmt.quantized:
        return 0
    return 1 if fmt.group_size is None else -(-in_features // fmt.group_size)


def group_fallback(fmt: WeightFormat, in_features: int) -> bool:
    """Whether rows of ``in_features`` inputs are shorter than ``fmt``'s groups, so that the
    layer gets one group (scale and zero point) per row (see the module docstring)."""
    in_features = check_integer(in_features, "in_features", minimum=1)
    return fmt.group_size is not None and in_features < fmt.group_size


def format_bits(fmt: WeightFormat, out_features: int, in_features: int) -> int:
    """Exact stored bits of an ``out_features × in_features`` weight in ``fmt``: the codes, and
    per row or group a scale and (``"asym"``) a zero point, at the precision stored.

    For :func:`legacy_format` ``(b)`` this is ``numel × b + out_features × 32``, today's count
    (:func:`optuna_ctpe.space.size.size_bits`).

    Args:
        fmt: The format.
        out_features: Output channels (rows: one per index of the quantization axis), >= 1.
        in_features: Input elements per row, >= 1.
    """
    out_features = check_integer(out_features, "out_features", minimum=1)
    per_row = group_count(fmt, in_features) * (fmt.scale_bits + fmt.zero_bits)
    return out_features * (in_features * fmt.bits + per_row)


def effective_bits(fmt: WeightFormat, in_features: int, out_features: int = 1) -> float:
    """Stored bits per weight of ``fmt`` on rows of ``in_features`` inputs, every scale and
    zero point included: ``format_bits / numel`` (independent of ``out_features``).

    ``int4-g128-asym`` on 384 inputs: ``4 + 3 × (16 + 4) / 384 = 4.156``; ``int4-pc-sym`` on 384:
    ``4 + 32 / 384 = 4.083``.
    """
    out_features = check_integer(out_features, "out_features", minimum=1)
    return format_bits(fmt, out_features, in_features) / (out_features * in_features)
