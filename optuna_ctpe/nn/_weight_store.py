"""A bounded store of quantized weights, valid only while the float weight is unchanged.

:class:`~optuna_ctpe.nn.apply.WeightCache` (per layer and bit-width) and
:class:`~optuna_ctpe.nn.formats.FormatQuantizer` (per layer and format) both keep quantized
tensors from trial to trial; this is their one copy of the bookkeeping: which float tensor an
entry was computed from, least-recently-used eviction beyond a byte limit, and the byte count.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Hashable

import torch
from torch import nn


class _Entry:
    """A quantized tensor and the float storage and version it was computed from."""

    def __init__(self, weight: nn.Parameter, quantized: torch.Tensor) -> None:
        # Holding the float storage keeps its address from being reused by another tensor.
        self.source = weight.data
        self.version = weight._version
        self.quantized = quantized

    def matches(self, weight: nn.Parameter) -> bool:
        s = self.source
        return (
            weight.data_ptr() == s.data_ptr()
            and weight._version == self.version
            and weight.shape == s.shape
            and weight.stride() == s.stride()
            and weight.dtype == s.dtype
            and weight.device == s.device
        )


class WeightStore:
    """Quantized tensors by key, each served only for the float weight it was computed from.

    An entry is stale once its weight has another storage, shape, layout or version counter (an
    optimiser step, an in-place op, ``load_state_dict``); :meth:`lookup` then drops it. Beyond
    ``max_bytes`` the least recently used entries are dropped.

    Args:
        max_bytes: The most bytes of quantized tensors kept (0 keeps nothing).
        on_discard: Called with the key of every entry dropped (stale, evicted or discarded),
            for an owner that keeps something beside each entry.
    """

    def __init__(
        self, max_bytes: int, on_discard: Callable[[Hashable], None] | None = None
    ) -> None:
        self.max_bytes = max_bytes
        self._on_discard = on_discard
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._nbytes = 0

    @property
    def nbytes(self) -> int:
        """The bytes of quantized tensors held."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: Hashable, weight: nn.Parameter) -> torch.Tensor | None:
        """The tensor stored under ``key`` for ``weight`` as it is now, else None (a stale entry
        is dropped)."""
        entry = self._entries.get(key)
        if entry is not None and entry.matches(weight):
            self._entries.move_to_end(key)
            return entry.quantized
        self.discard(key)
        return None

    def store(self, key: Hashable, weight: nn.Parameter, quantized: torch.Tensor) -> None:
        """Keep ``quantized`` under ``key`` for ``weight`` if it fits in ``max_bytes`` at all,
        dropping the least recently used entries to make room."""
        size = quantized.numel() * quantized.element_size()
        if size > self.max_bytes:
            return
        self._pop(key)  # replaced, not dropped: the owner's companion data stays
        while self._nbytes + size > self.max_bytes:
            self.discard(next(iter(self._entries)))
        self._entries[key] = _Entry(weight, quantized)
        self._nbytes += size

    def discard(self, key: Hashable) -> None:
        """Drop the entry of ``key``, if any (the ``on_discard`` callback runs either way)."""
        self._pop(key)
        if self._on_discard is not None:
            self._on_discard(key)

    def _pop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._nbytes -= entry.quantized.numel() * entry.quantized.element_size()

    def clear(self) -> None:
        """Drop every entry."""
        for key in list(self._entries):
            self.discard(key)
