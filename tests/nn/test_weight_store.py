"""The store of quantized weights shared by WeightCache and FormatQuantizer."""

from __future__ import annotations

import torch
from torch import nn

from optuna_ctpe.nn._weight_store import WeightStore


def _weight(n: int = 4) -> nn.Parameter:
    return nn.Parameter(torch.randn(n, n))


def test_an_entry_is_served_only_for_the_unchanged_weight() -> None:
    dropped = []
    store = WeightStore(10**6, on_discard=dropped.append)
    w = _weight()
    q = torch.zeros_like(w)
    store.store("a", w, q)
    assert store.lookup("a", w) is q
    with torch.no_grad():
        w.add_(1.0)  # bumps the version counter
    assert store.lookup("a", w) is None
    assert len(store) == 0 and store.nbytes == 0 and dropped == ["a"]
    other = _weight()
    store.store("b", w, q)
    assert store.lookup("b", other) is None  # another tensor under the same key


def test_least_recently_used_entries_go_first_and_oversized_ones_are_not_kept() -> None:
    dropped = []
    one = 4 * 4 * 4  # bytes of a 4x4 float32 tensor
    store = WeightStore(2 * one, on_discard=dropped.append)
    weights = {k: _weight() for k in "abc"}
    for k in "ab":
        store.store(k, weights[k], torch.zeros(4, 4))
    assert store.lookup("a", weights["a"]) is not None  # b is now the least recently used
    store.store("c", weights["c"], torch.zeros(4, 4))
    assert dropped == ["b"] and len(store) == 2 and store.nbytes == 2 * one
    store.store("big", _weight(8), torch.zeros(8, 8))
    assert store.lookup("big", _weight(8)) is None and store.nbytes == 2 * one


def test_replacing_an_entry_keeps_the_count_and_does_not_report_a_discard() -> None:
    dropped = []
    store = WeightStore(10**6, on_discard=dropped.append)
    w = _weight()
    store.store("a", w, torch.zeros(4, 4))
    store.store("a", w, torch.ones(4, 4))
    assert store.nbytes == 64 and len(store) == 1 and dropped == []
    assert torch.equal(store.lookup("a", w), torch.ones(4, 4))
    store.clear()
    assert store.nbytes == 0 and dropped == ["a"]
