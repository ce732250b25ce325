"""Tests of optuna_ctpe.nn.grids: scales, zero points, codes and round to nearest on every grid."""

from __future__ import annotations

import pytest


torch = pytest.importorskip("torch")

from optuna_ctpe.nn.grids import as_rows  # noqa: E402
from optuna_ctpe.nn.grids import dequantize  # noqa: E402
from optuna_ctpe.nn.grids import fake_quantize  # noqa: E402
from optuna_ctpe.nn.grids import fit_grid  # noqa: E402
from optuna_ctpe.nn.grids import from_rows  # noqa: E402
from optuna_ctpe.nn.grids import weight_codes  # noqa: E402
from optuna_ctpe.nn.quantize import quantize_weight  # noqa: E402
from optuna_ctpe.space.formats import legacy_format  # noqa: E402
from optuna_ctpe.space.formats import parse_format  # noqa: E402


pytestmark = pytest.mark.torch

SHAPES = [((64, 33), 0), ((16, 8, 3, 3), 0), ((8, 16, 3, 3), 1), ((7, 300), 1), ((50,), 0)]


@pytest.mark.parametrize(("shape", "axis"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_legacy_format_is_todays_quantizer_bit_for_bit(
    shape: tuple[int, ...], axis: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(len(shape) + axis)
    for bits in range(2, 17):
        for magnitude in (1e-4, 1.0, 300.0):
            w = (torch.randn(shape, generator=gen) * magnitude).to(dtype)
            if w.dim() > 1:
                w.select(axis, 0).zero_()  # an all-zero channel: the clamped scale
            expected = quantize_weight(w, bits, axis)
            got = fake_quantize(w, legacy_format(bits), axis)
            assert got.dtype == w.dtype and torch.equal(got, expected), (bits, magnitude)


@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_rows_round_trip(shape: tuple[int, ...], axis: int) -> None:
    w = torch.randn(shape)
    rows = as_rows(w, axis)
    assert rows.shape[0] == (w.shape[axis] if w.dim() > 1 else w.numel())
    assert torch.equal(from_rows(rows, w, axis), w)


@pytest.mark.parametrize(
    "name",
    [
        "int2-pc-asym-rtn",
        "int3-g32-asym-rtn",
        "int4-g128-asym-rtn",
        "int3-g16-sym-rtn",
        "int4-pc-fullsym-rtn",
        "int3-g32-fullsym-rtn",
        "int8-g64-asym-rtn",
    ],
)
def test_codes_lie_on_the_grid_and_decode_to_the_fake_quantized_weight(name: str) -> None:
    fmt = parse_format(name)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 200, generator=gen) + 0.3  # not centred: asymmetric ranges matter
    codes, fit = weight_codes(w, fmt)
    lo, hi = fmt.code_range
    assert codes.dtype == torch.int32 and int(codes.min()) >= lo and int(codes.max()) <= hi
    # Every level of the grid is used somewhere (2^b levels for asym/fullsym at 200 samples).
    if fmt.bits <= 3:
        assert set(codes.unique().tolist()) == set(range(lo, hi + 1))
    scale, zero = fit.columns(w.shape[1])
    assert torch.equal(dequantize(codes.float(), scale, zero), fake_quantize(w, fmt))
    n_groups = 1 if fmt.group_size is None else -(-200 // fmt.group_size)
    assert fit.scale.shape == (24, n_groups) and fit.zero.shape == (24, n_groups)
    if fmt.group_size is not None:  # stored as float16
        assert torch.equal(fit.scale.half().float(), fit.scale)
    if fmt.grid == "asym":
        assert torch.equal(fit.zero, fit.zero.round())
        assert int(fit.zero.min()) >= 0 and int(fit.zero.max()) <= 2**fmt.bits - 1
    else:
        assert not fit.zero.any()


def test_asym_represents_zero_and_the_row_extremes() -> None:
    w = torch.tensor([[0.5, 1.0, 2.0, 3.0], [-3.0, -2.0, -1.0, 0.0]])
    q = fake_quantize(w, parse_format("int2-pc-asym-rtn"))
    # Ranges [0, 3] and [-3, 0]: scale 1, levels exact.
    assert torch.equal(q, torch.tensor([[0.0, 1.0, 2.0, 3.0], [-3.0, -2.0, -1.0, 0.0]]))


def test_groups_are_fitted_separately() -> None:
    # Two groups of very different magnitude: per group they keep their resolution.
    w = torch.cat([torch.linspace(-1, 1, 32), torch.linspace(-100, 100, 32)])[None]
    grouped = fake_quantize(w, parse_format("int4-g32-sym-rtn"))
    channel = fake_quantize(w, legacy_format(4))
    assert (grouped - w)[:, :32].abs().max() < (channel - w)[:, :32].abs().max() / 10


def test_a_group_longer_than_the_row_is_one_group_per_row() -> None:
    w = torch.randn(5, 27)
    grouped = parse_format("int4-g128-sym-rtn")
    codes, fit = weight_codes(w, grouped)
    assert fit.scale.shape == (5, 1)
    # The same as per channel, but with the scale stored as float16.
    scale = (w.abs().amax(1, keepdim=True) / 7).half().float()
    assert torch.equal(fit.scale, scale)
    assert torch.equal(codes.float(), (w * (1.0 / scale)).round().clamp(-7, 7))


def test_float_formats() -> None:
    w = torch.randn(4, 9, dtype=torch.float32)
    assert torch.equal(fake_quantize(w, parse_format("fp32")), w)
    assert torch.equal(fake_quantize(w, parse_format("fp16")), w.half().float())
    with pytest.raises(ValueError, match="has no integer grid"):
        fit_grid(w, parse_format("fp16"))


@pytest.mark.parametrize(
    "name", ["int4-pc-sym-rtn", "int3-pc-asym-rtn", "int4-g128-asym-rtn", "int3-g32-fullsym-rtn"]
)
def test_what_a_file_stores_is_the_accounted_size(name: str) -> None:
    # Codes and zero points bit-packed at `bits`, scales at their stored precision: the bytes
    # are format_bits / 8, plus under one byte of padding per packed stream.
    np = pytest.importorskip("numpy")
    from optuna_ctpe.deploy.packing import pack_signed
    from optuna_ctpe.space.formats import format_bits

    fmt = parse_format(name)
    w = torch.randn(48, 300, generator=torch.Generator().manual_seed(4))
    codes, fit = weight_codes(w, fmt)
    offset = 2 ** (fmt.bits - 1) if fmt.grid == "asym" else 0  # unsigned codes as signed
    streams = [pack_signed(codes.numpy() - offset, fmt.bits)]
    if fmt.grid == "asym":
        streams.append(pack_signed(fit.zero.to(torch.int32).numpy() - offset, fmt.bits))
    dtype = np.float32 if fmt.group_size is None else np.float16
    scales = fit.scale.numpy().astype(dtype)
    assert np.array_equal(scales.astype(np.float32), fit.scale.numpy())  # stored exactly
    stored = sum(s.nbytes for s in streams) + scales.nbytes
    accounted = format_bits(fmt, 48, 300) / 8
    assert accounted <= stored < accounted + len(streams)
