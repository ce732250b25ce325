"""Walking the tensors of a batch: tensors, or tuples, lists and dicts of them (nested)."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import copy
from typing import Any

import torch


def map_any(fn: Callable[[Any], Any], batch: Any) -> Any:
    """``batch`` with ``fn`` applied to every leaf, its tuples, lists and dicts rebuilt.

    A dict of a subclass keeps its class: a shallow copy with its items replaced, so a model
    output such as ``transformers``' ``ModelOutput`` keeps its attribute access (``.loss``).
    """
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_any(fn, x) for x in batch)
    if type(batch) is dict:
        return {k: map_any(fn, v) for k, v in batch.items()}
    if isinstance(batch, dict):
        out = copy.copy(batch)
        for k, v in batch.items():
            out[k] = map_any(fn, v)
        return out
    return fn(batch)


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> Any:
    """``batch`` with ``fn`` applied to every tensor; other leaves unchanged."""
    return map_any(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, batch)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device``."""
    return map_tensors(lambda t: t.to(device), batch)


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (tuple, list)):
        for x in batch:
            yield from _tensors(x)
    elif isinstance(batch, dict):
        for x in batch.values():
            yield from _tensors(x)


def n_samples(batch: Any, index: int) -> int:
    """The number of samples of batch number ``index``: the shared first dimension of its tensors.

    Raises:
        ValueError: If the batch holds no tensor with a sample dimension, or its tensors
            disagree on the number of samples.
    """
    sizes = {t.shape[0] if t.dim() else -1 for t in _tensors(batch)}
    if not sizes or -1 in sizes:
        raise ValueError(
            f"batch {index} must hold tensors with a sample dimension, got {type(batch).__name__}."
        )
    if len(sizes) > 1:
        raise ValueError(
            f"the tensors of batch {index} disagree on the number of samples: {sorted(sizes)}."
        )
    return sizes.pop()
