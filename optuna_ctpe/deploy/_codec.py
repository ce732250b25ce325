"""A quantized weight <-> its bit-packed integers and per-channel scales, bit for bit.

:func:`encode` finds integers ``q`` in ``[-q_max, q_max]`` and one float32 scale per channel
with ``q × scale`` (in float32, cast to the weight's dtype) equal to the weight bit for bit, and
refuses a weight for which there are none; :func:`decode` computes that product again. The
scale is :func:`optuna_ctpe.nn.quantize.weight_scales` of the quantized weight, which is the
one :func:`~optuna_ctpe.nn.quantize.quantize_weight` used, or an ulp or two from it for scales
of other quantizers.
"""

from __future__ import annotations

import math

import torch

from optuna_ctpe.deploy.packing import pack_signed
from optuna_ctpe.deploy.packing import unpack_signed
from optuna_ctpe.nn.quantize import weight_scales


__all__ = ["decode", "encode", "exact_integers"]

# The scale recomputed from quantized values is quantize_weight's own one exactly, but a scale
# of another quantizer (any float32 s, with a channel reaching q_max) misses by an ulp for about
# one channel in seven at 3 bits (max|q·s| / q_max rounds twice); these nudges, in ulps, find it.
_ULP_STEPS = (0, 1, -1, 2, -2)


def encode(
    name: str, weight: torch.Tensor, bits: int, axis: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed integers (a 1-D ``uint8`` tensor, ``weight``'s elements in C order) and the
    float32 scales (one per index of ``axis``) of the quantized ``weight`` of layer ``name``.

    Raises:
        ValueError: If some channel of ``weight`` is not integers of ``bits`` bits times one
            float32 scale.
    """
    integers, scale = exact_integers(name, weight, bits, axis)
    return torch.from_numpy(pack_signed(integers.numpy(), bits)), scale


def exact_integers(
    name: str, weight: torch.Tensor, bits: int, axis: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``int32`` integers (of ``weight``'s shape) and float32 scales (one per index of
    ``axis``) whose product, in float32 cast to ``weight``'s dtype, is ``weight`` bit for bit.

    Raises:
        ValueError: If some channel of ``weight`` is not integers of ``bits`` bits times one
            float32 scale.
    """
    weight = weight.detach().cpu()
    qmax = 2 ** (bits - 1) - 1
    rows = weight.float().transpose(0, axis).reshape(weight.shape[axis], -1)
    target = weight.transpose(0, axis).reshape(weight.shape[axis], -1)
    base = weight_scales(weight, bits, axis)
    scale = base.clone()
    q = torch.zeros(rows.shape, dtype=torch.int32)
    done = torch.zeros(len(base), dtype=torch.bool)
    for step in _ULP_STEPS:
        s = _nudged(base, step)
        candidate = torch.round(rows / s[:, None]).clamp(-qmax, qmax)
        rebuilt = (candidate * s[:, None]).to(weight.dtype)
        exact = _same_bits(rebuilt, target).all(1) & ~done
        scale[exact], q[exact] = s[exact], candidate[exact].to(torch.int32)
        done |= exact
        if bool(done.all()):
            break
    if not bool(done.all()):
        bad = torch.nonzero(~done).flatten()[:5].tolist()
        raise ValueError(
            f"the weight of layer {name!r} is not quantized to {bits} bits per channel along "
            f"axis {axis} (channels {bad} are not integers times one float32 scale): store "
            "the model that HessianSearchSpace.apply (or quantize_weight) made."
        )
    moved = [weight.shape[axis], *(n for i, n in enumerate(weight.shape) if i != axis)]
    return q.reshape(moved).transpose(0, axis).contiguous(), scale


def decode(
    packed: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    axis: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The quantized weight of shape ``shape``: the unpacked integers times their channel's
    scale in float32, cast to ``dtype`` (the product :func:`encode` checked)."""
    q = unpack_signed(packed.numpy(), bits, math.prod(shape))
    view = [1] * len(shape)
    view[axis] = -1
    return (torch.from_numpy(q).reshape(shape).float() * scale.view(view)).to(dtype)


def _nudged(scale: torch.Tensor, ulps: int) -> torch.Tensor:
    """``scale`` moved ``ulps`` representable float32 values up (or down, if negative)."""
    toward = torch.full_like(scale, torch.inf if ulps > 0 else 0.0)
    for _ in range(abs(ulps)):
        scale = torch.nextafter(scale, toward)
    return scale


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise bitwise equality of two float tensors of one dtype (``-0.0 != 0.0``)."""
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.contiguous().view(view) == b.contiguous().view(view)
