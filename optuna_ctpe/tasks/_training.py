"""The embedded tasks' classifiers: seeded Adam training on cross-entropy, their loss and their
top-1 accuracy."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from optuna_ctpe.nn.layers import eval_mode


Batch = tuple[torch.Tensor, torch.Tensor]


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The task loss ``loss_fn(model, (x, y))``: the mean cross-entropy of ``model(x)``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def top1_accuracy(validation: Sequence[Batch]) -> Callable[[nn.Module], float]:
    """The task metric ``evaluate(net)``: top-1 accuracy over ``validation``, in eval mode."""

    @torch.no_grad()
    def evaluate(net: nn.Module) -> float:
        with eval_mode(net):
            correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in validation)
        return correct / sum(len(y) for _, y in validation)

    return evaluate


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Mapping[str, Any],
    seed: int,
) -> dict[str, torch.Tensor]:
    """Train ``model`` in place on ``(x, y)`` and return a detached copy of its state dict.

    Adam with ``recipe["lr"]`` and ``recipe["weight_decay"]`` for ``recipe["epochs"]`` passes in
    mini-batches of ``recipe["batch_size"]``, shuffled by a generator seeded with ``seed``; the
    caller seeds the initialisation. Deterministic for a seed on a CPU at a fixed thread count.
    The model is left in eval mode.
    """
    optimiser = torch.optim.Adam(
        model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"]
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(recipe["epochs"]):
        perm = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), recipe["batch_size"]):
            idx = perm[start : start + recipe["batch_size"]]
            optimiser.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimiser.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
