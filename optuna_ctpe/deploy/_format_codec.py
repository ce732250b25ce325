"""A weight in a :class:`~optuna_ctpe.space.formats.WeightFormat` <-> the tensors a packed
file stores for it, bit for bit.

A quantized format stores three things, each at the precision
:func:`~optuna_ctpe.space.formats.format_bits` counts:

* ``packed``: the ``(rows, inputs)`` codes (:func:`~optuna_ctpe.nn.grids.as_rows` order), each
  in ``bits`` bits (:func:`~optuna_ctpe.deploy.packing.pack_signed`); the unsigned codes of an
  ``"asym"`` grid, ``[0, 2^b - 1]``, are stored less ``2^(b-1)`` so that they fit the signed
  packing;
* ``scales``: one float32 per row (per-channel formats) or ``(rows, groups)`` float16 (grouped
  formats, whose scales are float16 values already);
* ``zeros`` (``"asym"`` only): the ``(rows, groups)`` integer zero points, packed at ``bits``
  bits as the codes are.

A float format stores the weight itself as ``float16`` or ``float32``. :func:`decode` computes
``(q - z) × s`` in float32 and casts it to the weight's dtype: what
:class:`~optuna_ctpe.nn.formats.FormatQuantizer` made.
"""

from __future__ import annotations

import math

import torch

from optuna_ctpe.deploy.packing import pack_signed
from optuna_ctpe.deploy.packing import unpack_signed
from optuna_ctpe.nn.grids import dequantize
from optuna_ctpe.nn.grids import from_rows
from optuna_ctpe.nn.grids import GridFit
from optuna_ctpe.space.formats import WeightFormat


__all__ = ["decode", "encode", "encode_float"]


def _offset(fmt: WeightFormat) -> int:
    """What is subtracted from an ``"asym"`` code or zero point to store it signed."""
    return 2 ** (fmt.bits - 1) if fmt.grid == "asym" else 0


def encode(codes: torch.Tensor, fit: GridFit, fmt: WeightFormat) -> dict[str, torch.Tensor]:
    """The stored tensors (``"packed"``, ``"scales"`` and, for ``"asym"``, ``"zeros"``) of the
    ``(rows, inputs)`` int32 ``codes`` on the grid ``fit`` of the quantized ``fmt``."""
    offset = _offset(fmt)
    stored = {
        "packed": torch.from_numpy(pack_signed((codes - offset).numpy(), fmt.bits)),
        "scales": (
            fit.scale[:, 0].float().contiguous()
            if fmt.group_size is None
            else fit.scale.half().contiguous()
        ),
    }
    if fmt.grid == "asym":
        zeros = fit.zero.to(torch.int64) - offset
        stored["zeros"] = torch.from_numpy(pack_signed(zeros.numpy(), fmt.bits))
    return stored


def encode_float(weight: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """The stored tensor of a weight in a float format (its values at ``fmt.bits`` bits)."""
    dtype = torch.float16 if fmt.bits == 16 else torch.float32
    return weight.detach().cpu().to(dtype).contiguous()


def decode(
    stored: dict[str, torch.Tensor],
    fmt: WeightFormat,
    shape: list[int],
    axis: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The weight of ``shape`` and ``dtype`` (output channels along ``axis``) that
    :func:`encode` stored."""
    template = torch.empty(shape, dtype=dtype)
    if not fmt.quantized:
        return stored["float"].to(dtype).reshape(shape)
    n_rows = 1 if len(shape) == 0 else shape[axis] if len(shape) > 1 else math.prod(shape)
    n_inputs = math.prod(shape) // n_rows
    groups = 1 if fmt.group_size is None else -(-n_inputs // fmt.group_size)
    size = n_inputs if fmt.group_size is None else min(fmt.group_size, n_inputs)
    offset = _offset(fmt)
    codes = unpack_signed(stored["packed"].numpy(), fmt.bits, n_rows * n_inputs)
    codes = torch.from_numpy(codes).reshape(n_rows, n_inputs).float() + offset
    scale = stored["scales"].float().reshape(n_rows, groups)
    if fmt.grid == "asym":
        zero = unpack_signed(stored["zeros"].numpy(), fmt.bits, n_rows * groups)
        zero = torch.from_numpy(zero).reshape(n_rows, groups).float() + offset
    else:
        zero = torch.zeros_like(scale)
    fit = GridFit(scale=scale, zero=zero, group_size=size)
    return from_rows(dequantize(codes, *fit.columns(n_inputs)), template, axis)
