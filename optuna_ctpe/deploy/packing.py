"""Bit packing: signed integers of any width from 2 to 16 bits <-> a stream of bytes.

Value ``i`` of ``n`` occupies bits ``[i·b, (i+1)·b)`` of the stream, least significant bit
first, in two's complement (so ``b`` bits hold ``[-2^(b-1), 2^(b-1) - 1]``); the stream is
``ceil(n·b / 8)`` bytes, its last byte padded with zero bits. The layout needs no alignment and
no per-value header, so ``n`` values take exactly the ``n·b`` bits the size accounting counts
(:mod:`optuna_ctpe.space.size`), plus under one byte.

Pure numpy, vectorised in chunks of whole bytes, so packing a layer never holds more than a few
megabytes of temporaries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from optuna_ctpe._validation import check_bits
from optuna_ctpe._validation import check_integer


__all__ = ["pack_signed", "packed_nbytes", "unpack_signed"]

# Values per chunk: a multiple of 8, so every chunk starts on a byte boundary whatever the
# width; 2^18 values keep the (values x bits) bit matrix at 4 MiB or less.
_CHUNK = 2**18


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take: ``ceil(count * bits / 8)``.

    Example:
        .. code-block:: python

            from optuna_ctpe.deploy.packing import packed_nbytes

            packed_nbytes(10, 3)  # 4: 30 bits

    Args:
        count: Number of values, an integer >= 0.
        bits: Bits per value, an integer in [2, 16].

    Raises:
        ValueError: If ``count`` or ``bits`` is out of range.
    """
    count = check_integer(count, "count", minimum=0)
    return -(-count * check_bits(bits, "bits") // 8)


def pack_signed(values: Any, bits: int) -> np.ndarray:
    """Pack signed integers into ``bits`` bits each (see the module docstring).

    Example:
        .. code-block:: python

            import numpy as np
            from optuna_ctpe.deploy.packing import pack_signed, unpack_signed

            data = pack_signed(np.array([-3, 0, 3, 1]), 3)  # 2 bytes for 12 bits
            unpack_signed(data, 3, 4)  # array([-3,  0,  3,  1], dtype=int32)

    Args:
        values: Integers (an integer numpy array, or anything ``np.asarray`` makes one of), in
            ``[-2^(bits-1), 2^(bits-1) - 1]``; flattened in C order.
        bits: Bits per value, an integer in [2, 16].

    Returns:
        A 1-D ``uint8`` array of :func:`packed_nbytes` bytes.

    Raises:
        ValueError: If ``bits`` is out of range, ``values`` is not integer, or a value does not
            fit ``bits`` bits (the message gives the smallest and largest value).
    """
    bits = check_bits(bits, "bits")
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise ValueError(f"values must be integers, got an array of dtype {array.dtype}.")
    flat = array.reshape(-1).astype(np.int64)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if flat.size and (flat.min() < low or flat.max() > high):
        raise ValueError(
            f"values must lie in [{low}, {high}] to fit {bits} bits, got values from "
            f"{int(flat.min())} to {int(flat.max())}."
        )
    shifts = np.arange(bits, dtype=np.int64)
    # Two's complement in ``bits`` bits: the low bits of the int64 value.
    chunks = [
        np.packbits(
            ((part[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1), bitorder="little"
        )
        for part in np.split(flat, range(_CHUNK, flat.size, _CHUNK))
    ]
    return np.concatenate(chunks)


def unpack_signed(data: Any, bits: int, count: int) -> np.ndarray:
    """The ``count`` signed integers :func:`pack_signed` packed into ``data``.

    Args:
        data: A 1-D ``uint8`` array (or bytes) of exactly :func:`packed_nbytes` bytes.
        bits: Bits per value, an integer in [2, 16].
        count: Number of values, an integer >= 0.

    Returns:
        A 1-D ``int32`` array of ``count`` values.

    Raises:
        ValueError: If ``bits`` or ``count`` is out of range, or ``data`` is not a 1-D
            ``uint8`` array of the expected length.
    """
    expected = packed_nbytes(count, bits)
    stream = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else data
    stream = np.asarray(stream)
    if stream.dtype != np.uint8 or stream.ndim != 1 or stream.size != expected:
        raise ValueError(
            f"data must be a 1-D uint8 array of {expected} bytes ({count} values of {bits} "
            f"bits), got dtype {stream.dtype}, shape {stream.shape}."
        )
    weights = np.left_shift(1, np.arange(bits, dtype=np.int32))
    chunk_bytes = _CHUNK * bits // 8
    out = np.empty(count, np.int32)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * bits // 8
        bit_matrix = np.unpackbits(
            stream[first : first + chunk_bytes], count=n * bits, bitorder="little"
        ).reshape(n, bits)
        out[start : start + n] = bit_matrix.astype(np.int32) @ weights
    # Sign extension: a set top bit means the value is negative.
    return np.where(out >= 2 ** (bits - 1), out - 2**bits, out).astype(np.int32)
