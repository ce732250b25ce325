"""The integer grids of :mod:`optuna_ctpe.space.formats` on tensors: fitting scales and zero
points, integer codes, and round-to-nearest fake quantization.

A weight is seen as a matrix of *rows* (one per index of its output-channel axis) by *inputs*
(everything else, flattened in memory order: a Conv's ``in / groups × kernel``, which is also
the order of :func:`torch.nn.functional.unfold`'s patches). A format fits one scale (and, for
``"asym"``, one zero point) per row, or per group of ``group_size`` consecutive inputs of a row.

Codes and values follow the formula of ``torch.fake_quantize_per_channel_affine``, so today's
format is reproduced bit for bit: ``q = clamp(round(w × (1 / s)) + z, q_min, q_max)`` with
round-half-to-even, and the value ``(q − z) × s`` in float32. A scale is the stored one:
float32 clamped to at least ``1e-8`` per channel (an all-zero row would otherwise divide by 0),
float16 per group (rounded to float16 before use, and clamped to its finite positive range), so a
packed file that stores codes, scales and zero points decodes to exactly these values.

Requires the ``torch`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optuna_ctpe.space.formats import group_count
from optuna_ctpe.space.formats import WeightFormat


__all__ = [
    "GridFit",
    "as_rows",
    "dequantize",
    "fake_quantize",
    "fit_grid",
    "fit_rows",
    "from_rows",
    "quantize_codes",
    "round_to_grid",
    "weight_codes",
]

_MIN_SCALE = 1e-8
# float16's smallest positive subnormal and largest finite value: a group scale outside them
# would be stored as 0 or inf.
_HALF_MIN = 2.0**-24
_HALF_MAX = 65504.0


@dataclass(frozen=True)
class GridFit:
    """Scales and zero points of a weight matrix, one per row and group.

    Attributes:
        scale: ``(rows, groups)`` float32, the stored scales (float16 values for grouped
            formats).
        zero: ``(rows, groups)`` float32 holding integer zero points (0 for symmetric grids).
        group_size: Inputs per group (the row length for per-channel formats).
    """

    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    def columns(self, n_inputs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero point of every element: two ``(rows, n_inputs)`` tensors."""
        scale = self.scale.repeat_interleave(self.group_size, dim=1)[:, :n_inputs]
        zero = self.zero.repeat_interleave(self.group_size, dim=1)[:, :n_inputs]
        return scale, zero


def as_rows(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """``weight`` as a float32 ``(rows, inputs)`` matrix, rows along ``axis`` (a copy when the
    dtype or layout changes; 0-d and 1-d weights are one input per row, as today)."""
    w = weight.detach().float()
    if w.dim() <= 1:
        return w.reshape(-1, 1)
    return w.transpose(0, axis).flatten(1)


def from_rows(rows: torch.Tensor, weight: torch.Tensor, axis: int) -> torch.Tensor:
    """The inverse of :func:`as_rows`: a tensor of ``weight``'s shape and dtype."""
    if weight.dim() <= 1:
        return rows.reshape(weight.shape).to(weight.dtype)
    shape = list(weight.shape)
    shape[0], shape[axis] = shape[axis], shape[0]
    return rows.reshape(shape).transpose(0, axis).to(weight.dtype)


def fit_rows(w: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero point of each row of ``w`` (one group each) on ``fmt``'s grid.

    Args:
        w: A float32 ``(rows, n)`` matrix: whole rows, or one group of columns.
        fmt: A quantized format.

    Returns:
        Two ``(rows,)`` float32 tensors: the stored scales and the integer zero points.
    """
    b = fmt.bits
    with torch.no_grad():
        if fmt.grid == "asym":
            # Equations of the module docstring of optuna_ctpe.space.formats.
            lo = w.amin(1).clamp_max(0.0)
            hi = w.amax(1).clamp_min(0.0)
            scale = _stored_scale((hi - lo) / (2**b - 1), fmt)
            zero = torch.round(-lo * (1.0 / scale)).clamp(0, 2**b - 1)
            return scale, zero
        amax = w.abs().amax(1)
        levels = 2 ** (b - 1) - 1 if fmt.grid == "sym" else (2**b - 1) / 2
        return _stored_scale(amax / levels, fmt), torch.zeros_like(amax)


def _stored_scale(scale: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    if fmt.group_size is None:
        return scale.clamp_min(_MIN_SCALE)
    return scale.clamp(_HALF_MIN, _HALF_MAX).half().float()


def fit_grid(w: torch.Tensor, fmt: WeightFormat) -> GridFit:
    """Scales and zero points of every row and group of the ``(rows, inputs)`` matrix ``w``.

    Groups longer than a row become one group per row
    (:func:`~optuna_ctpe.space.formats.group_fallback`).

    Raises:
        ValueError: If ``fmt`` is a float format.
    """
    if not fmt.quantized:
        raise ValueError(f"format {fmt.name!r} has no integer grid to fit.")
    n = w.shape[1]
    size = n if fmt.group_size is None else min(fmt.group_size, n)
    fits = [fit_rows(w[:, g * size : (g + 1) * size], fmt) for g in range(group_count(fmt, n))]
    scale = torch.stack([s for s, _ in fits], 1)
    zero = torch.stack([z for _, z in fits], 1)
    return GridFit(scale=scale, zero=zero, group_size=size)


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: WeightFormat
) -> torch.Tensor:
    """Integer codes (as float32) of ``w`` with element-wise (broadcast) ``scale`` and
    ``zero``: ``clamp(round(w × (1 / s)) + z, q_min, q_max)``, the formula of
    ``torch.fake_quantize_per_channel_affine``."""
    q_min, q_max = fmt.code_range
    return (torch.round(w * (1.0 / scale)) + zero).clamp(q_min, q_max)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The values of ``codes``: ``(q − z) × s`` in float32."""
    return (codes - zero) * scale


def round_to_grid(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: WeightFormat
) -> torch.Tensor:
    """``w`` rounded to the nearest level of the grid given by ``scale`` and ``zero``."""
    return dequantize(quantize_codes(w, scale, zero, fmt), scale, zero)


def fake_quantize(weight: torch.Tensor, fmt: WeightFormat, axis: int = 0) -> torch.Tensor:
    """``weight`` rounded to nearest on ``fmt``'s grid (whatever ``fmt.rounding`` says: GPTQ
    needs calibration inputs, :mod:`optuna_ctpe.nn.gptq`).

    For ``legacy_format(b)`` this equals :func:`optuna_ctpe.nn.quantize.quantize_weight`
    ``(weight, b, axis)`` bit for bit.

    Args:
        weight: A floating-point tensor.
        fmt: The format (a float format rounds to float16, or keeps float32 values).
        axis: The output-channel axis of ``weight``.

    Returns:
        A tensor of ``weight``'s shape and dtype.
    """
    with torch.no_grad():
        if not fmt.quantized:
            w = weight.detach().float()
            return (w.half().float() if fmt.bits == 16 else w).to(weight.dtype)
        w = as_rows(weight, axis)
        fit = fit_grid(w, fmt)
        scale, zero = fit.columns(w.shape[1])
        return from_rows(round_to_grid(w, scale, zero, fmt), weight, axis)


def weight_codes(
    weight: torch.Tensor, fmt: WeightFormat, axis: int = 0
) -> tuple[torch.Tensor, GridFit]:
    """The round-to-nearest integer codes of ``weight`` (``(rows, inputs)``, int32) and the
    grid they are on: what a packed file stores.

    Raises:
        ValueError: If ``fmt`` is a float format.
    """
    with torch.no_grad():
        w = as_rows(weight, axis)
        fit = fit_grid(w, fmt)
        scale, zero = fit.columns(w.shape[1])
        return quantize_codes(w, scale, zero, fmt).to(torch.int32), fit
