"""Tests of optuna_ctpe.space.formats (the format record, names, JSON, exact bits) and of the
format pricing of optuna_ctpe.space.size."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from optuna_ctpe.space.checks import make_spec
from optuna_ctpe.space.formats import as_format
from optuna_ctpe.space.formats import effective_bits
from optuna_ctpe.space.formats import format_bits
from optuna_ctpe.space.formats import format_from_json
from optuna_ctpe.space.formats import format_to_json
from optuna_ctpe.space.formats import group_count
from optuna_ctpe.space.formats import group_fallback
from optuna_ctpe.space.formats import legacy_format
from optuna_ctpe.space.formats import parse_format
from optuna_ctpe.space.formats import WeightFormat
from optuna_ctpe.space.records import LayerSensitivity
from optuna_ctpe.space.records import ParamTensor
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import SpaceSpec
from optuna_ctpe.space.records import WidthGroupSensitivity
from optuna_ctpe.space.size import size_bits
from optuna_ctpe.space.size import size_bits_formats


ALL_FORMATS = [
    WeightFormat(bits=b, group_size=g, grid=grid, rounding=r)
    for b, g, grid, r in itertools.product(
        (2, 3, 4, 8, 16), (None, 32, 128, 7), ("sym", "fullsym", "asym"), ("rtn", "gptq")
    )
] + [WeightFormat(bits=16, grid="float"), WeightFormat(bits=32, grid="float")]


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_name_and_json_round_trip(fmt: WeightFormat) -> None:
    assert parse_format(fmt.name) == fmt
    assert format_from_json(format_to_json(fmt)) == fmt
    assert as_format(fmt.name) == fmt and str(fmt) == fmt.name
    doc = json.loads(format_to_json(fmt))
    assert doc["version"] == 1 and doc["name"] == fmt.name


def test_names_read_as_documented() -> None:
    assert WeightFormat(3, 128, "asym", "gptq").name == "int3-g128-asym-gptq"
    assert WeightFormat(4).name == "int4-pc-sym-rtn"
    assert WeightFormat(16, grid="float").name == "fp16"


@pytest.mark.parametrize("bits", range(2, 17))
def test_a_bit_width_is_the_legacy_format(bits: int) -> None:
    fmt = legacy_format(bits)
    assert fmt.name == f"int{bits}-pc-sym-rtn"
    assert as_format(bits) == fmt
    assert fmt.code_range == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert fmt.scale_bits == 32 and fmt.zero_bits == 0


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("int4-g128-bsym-rtn", "grid 'bsym'"),
        ("int4-g128-asym-awq", "rounding 'awq'"),
        ("int4-x128-asym-rtn", "'x128'"),
        ("uint4-pc-sym-rtn", "'uint4'"),
        ("int1-pc-sym-rtn", "bits must be an integer in \\[2, 16\\], got 1"),
        ("int4-g1-sym-rtn", "group_size must be an integer >= 2 or None, got 1"),
        ("int4-pc-sym", "must read 'int<bits>"),
        ("fp8", "must read 'int<bits>"),
    ],
)
def test_parse_errors_name_the_bad_part(name: str, part: str) -> None:
    with pytest.raises(ValueError, match=part):
        parse_format(name)


def test_field_checks() -> None:
    with pytest.raises(ValueError, match="grid must be one of"):
        WeightFormat(4, grid="nf4")
    with pytest.raises(ValueError, match="bits of a float format must be 16 or 32"):
        WeightFormat(8, grid="float")
    with pytest.raises(ValueError, match="a float format has no groups"):
        WeightFormat(16, 128, grid="float")
    with pytest.raises(ValueError, match="bits must be an integer"):
        WeightFormat(True)
    with pytest.raises(ValueError, match="must be a bit-width in \\[2, 16\\], got 17"):
        as_format(17)
    with pytest.raises(ValueError, match="layer 'fc': format name 'x'"):
        as_format("x", "layer 'fc'")


def test_json_refuses_other_schemas_versions_and_mismatched_names() -> None:
    doc = json.loads(format_to_json(parse_format("int4-g64-asym-rtn")))
    with pytest.raises(ValueError, match="version 2 is not one this version reads"):
        format_from_json({**doc, "version": 2})
    with pytest.raises(ValueError, match="not a weight-format document"):
        format_from_json({**doc, "schema": "other"})
    with pytest.raises(ValueError, match="names 'int4-g64-sym-rtn' but holds"):
        format_from_json({**doc, "name": "int4-g64-sym-rtn"})


def test_code_ranges() -> None:
    assert parse_format("int4-pc-fullsym-rtn").code_range == (-8, 7)
    assert parse_format("int3-g32-asym-rtn").code_range == (0, 7)


def test_stored_bits_count_every_scale_and_zero_point() -> None:
    # The worked example of the docs: 4-bit codes, a float16 scale and a 4-bit zero point per
    # 128 inputs, rows of 384 inputs (3 groups).
    fmt = parse_format("int4-g128-asym-rtn")
    assert format_bits(fmt, 10, 384) == 10 * (384 * 4 + 3 * (16 + 4))
    assert effective_bits(fmt, 384) == pytest.approx(4 + 3 * 20 / 384)
    assert effective_bits(fmt, 384) == pytest.approx(4.15625)
    # A partial last group still stores a whole scale and zero point.
    assert group_count(fmt, 300) == 3 and format_bits(fmt, 1, 300) == 300 * 4 + 3 * 20
    # Per channel: a float32 scale per row (today's count), plus the zero point if asymmetric.
    assert format_bits(legacy_format(3), 7, 50) == 7 * 50 * 3 + 7 * 32
    assert format_bits(parse_format("int3-pc-asym-gptq"), 7, 50) == 7 * (50 * 3 + 32 + 3)
    # Rounding does not change the size; float formats have no scales.
    assert format_bits(parse_format("int3-g32-sym-gptq"), 5, 64) == format_bits(
        parse_format("int3-g32-sym-rtn"), 5, 64
    )
    assert format_bits(parse_format("fp16"), 5, 64) == 5 * 64 * 16
    # effective bits do not depend on the row count
    assert effective_bits(fmt, 384, 7) == effective_bits(fmt, 384, 1)


def test_group_fallback_rule() -> None:
    fmt = parse_format("int4-g128-asym-rtn")
    assert group_fallback(fmt, 27) and group_count(fmt, 27) == 1
    assert not group_fallback(fmt, 128) and not group_fallback(fmt, 129)
    assert not group_fallback(legacy_format(4), 3)
    # One group per row, priced with the grouped format's float16 scale.
    assert format_bits(fmt, 2, 27) == 2 * (27 * 4 + 16 + 4)


# -- pricing a space -----------------------------------------------------------------------------


def _spec(scales: bool = True) -> SpaceSpec:
    """conv(3x3, 2->8) -> fc(8*16 -> 10), the conv's outputs one width group."""
    errors = {b: 1.0 for b in (2, 3, 4, 8)}
    layers = [
        LayerSensitivity("conv", 1.0, 8 * 2 * 9, errors),
        LayerSensitivity("fc", 1.0, 10 * 128, errors),
    ]
    groups = [WidthGroupSensitivity("conv", 8, 1.0, {0.5: 0.1, 0.75: 0.05, 1.0: 0.0})]
    tensors = [
        ParamTensor(
            "conv.weight",
            144,
            "conv",
            out_group="conv",
            scales=8 if scales else 0,
            scale_group="conv" if scales else None,
        ),
        ParamTensor("conv.bias", 8, None, out_group="conv"),
        ParamTensor("fc.weight", 1280, "fc", in_group="conv", scales=10 if scales else 0),
        ParamTensor("fc.bias", 10),
    ]
    return make_spec(layers, groups, tensors, (2, 3, 4, 8), (0.5, 0.75, 1.0), 16.0, None)


@pytest.mark.parametrize("scales", [True, False])
def test_legacy_formats_price_exactly_as_bit_widths(scales: bool) -> None:
    spec = _spec(scales)
    rng = random.Random(0)
    for _ in range(30):
        bits = {"conv": rng.choice([2, 3, 4, 8]), "fc": rng.choice([2, 3, 4, 8])}
        widths = {"conv": rng.choice([0.5, 0.75, 1.0])}
        expected = size_bits(spec, QuantConfig(bits, widths))
        assert size_bits_formats(spec, bits, widths) == expected
        named = {n: legacy_format(b).name for n, b in bits.items()}
        assert size_bits_formats(spec, named, widths) == expected


def test_formats_are_priced_on_the_pruned_shapes() -> None:
    spec = _spec()
    formats = {"conv": "int4-g8-asym-rtn", "fc": "int3-g32-sym-gptq"}
    # conv at 0.5: 4 channels of 2*9 = 18 inputs (3 groups of 8); fc: 10 rows of 64 inputs.
    conv = 4 * (18 * 4 + 3 * (16 + 4))
    fc = 10 * (64 * 3 + 2 * 16)
    floats = 32 * (4 + 10)
    assert size_bits_formats(spec, formats, {"conv": 0.5}) == conv + fc + floats
    whole = 8 * (18 * 4 + 3 * 20) + 10 * (128 * 3 + 4 * 16) + 32 * 18
    assert size_bits_formats(spec, formats) == whole


def test_pricing_refuses_unknown_shapes_and_bad_names() -> None:
    spec = _spec(scales=False)
    with pytest.raises(ValueError, match="recorded without its channel count"):
        size_bits_formats(spec, {"conv": "int4-g8-asym-rtn", "fc": 4})
    with pytest.raises(ValueError, match="formats must name exactly the layers"):
        size_bits_formats(spec, {"conv": 4})
    with pytest.raises(ValueError, match="widths must name exactly the groups"):
        size_bits_formats(spec, {"conv": 4, "fc": 4}, {})
    with pytest.raises(ValueError, match=r"formats\['fc'\]: format name 'int4'"):
        size_bits_formats(spec, {"conv": 4, "fc": "int4"})
    assert math.isfinite(size_bits_formats(spec, {"conv": 4, "fc": "int4-pc-sym-rtn"}))


def test_formats_import_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import optuna_ctpe.space.formats, optuna_ctpe.space.size; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
