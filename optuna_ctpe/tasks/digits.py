"""The embedded default task: a small CNN on scikit-learn's ``load_digits``.

The data set (1,797 grayscale 8×8 images of the digits 0-9) ships with scikit-learn, so the task
needs no download. The CNN has five weight layers, enough for per-layer bit-widths and two
width groups to matter, and trains deterministically to 97-98% validation accuracy in a few
seconds on a CPU. The trained weights are cached in the platform's user cache folder
(:func:`default_cache_dir`) with a SHA-256 checksum beside them, and rebuilt when the file is
missing or does not match its checksum.

Example:
    .. code-block:: python

        from optuna_ctpe.tasks.digits import digits_task

        task = digits_task(seed=0)
        print(task.name, task.evaluate(task.model))  # digits-cnn 0.97...
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from optuna_ctpe._validation import check_integer
from optuna_ctpe.tasks._task import Task
from optuna_ctpe.tasks._cache import cached_state
from optuna_ctpe.tasks._cache import default_cache_dir
from optuna_ctpe.tasks._cache import single_threaded
from optuna_ctpe.tasks._training import cross_entropy
from optuna_ctpe.tasks._training import top1_accuracy
from optuna_ctpe.tasks._training import train_classifier


__all__ = ["DIGITS_SPLIT", "DigitsCNN", "default_cache_dir", "digits_task", "split_digits"]

# Bump when the architecture, split or training recipe changes: it is part of the cache key, so
# stale weights are never loaded into a changed model.
_RECIPE = {
    "version": 1,
    "n_validation": 540,
    "n_calibration": 180,
    "epochs": 40,
    "batch_size": 128,
    "lr": 5e-3,
    "weight_decay": 1e-4,
}
#: The sizes of the validation and calibration parts of :func:`split_digits` (the rest trains).
DIGITS_SPLIT = {"n_validation": _RECIPE["n_validation"], "n_calibration": _RECIPE["n_calibration"]}
_CALIBRATION_BATCH = 60


class DigitsCNN(nn.Module):
    """conv(1→16)-conv(16→32)-pool-conv(32→32)-fc(512→64)-fc(64→10), ReLU between layers.

    All convolutions are 3×3 with padding 1 on the 8×8 input; one 2×2 max-pool halves the
    resolution after the second convolution. About 47k parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def split_digits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic, seeded train / calibration / validation split of ``load_digits``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    # Pixel values are 0..16; scale to [0, 1] so the default Adam learning rate suits the net.
    x = torch.from_numpy((data.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(data.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    n_val, n_cal = DIGITS_SPLIT["n_validation"], DIGITS_SPLIT["n_calibration"]
    parts = {
        "validation": order[:n_val],
        "calibration": order[n_val : n_val + n_cal],
        "train": order[n_val + n_cal :],
    }
    return {name: (x[idx], y[idx]) for name, idx in parts.items()}


def _train(train: tuple[torch.Tensor, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Train a fresh :class:`DigitsCNN`; deterministic for a given seed on CPU."""
    torch.manual_seed(seed)
    return train_classifier(DigitsCNN(), *train, _RECIPE, seed)


def _batches(
    x: torch.Tensor, y: torch.Tensor, size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def digits_task(
    *, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None, device: str = "cpu"
) -> Task:
    """The embedded default task: a trained :class:`DigitsCNN` on scikit-learn's digits.

    The 1,797 images are split, with ``seed``, into 540 validation, 180 calibration and 1,077
    training images. Training (Adam, 40 epochs) takes a few seconds on a CPU and is cached.

    Args:
        seed: Seed of the data split, the initialisation and the training order. Each seed has
            its own cache entry.
        cache_dir: Folder of the weight cache; ``None`` uses :func:`default_cache_dir`.
        device: Torch device of the model and of every batch, e.g. ``"cpu"`` or ``"cuda"``.

    Returns:
        A :class:`~optuna_ctpe.tasks.Task` named ``"digits-cnn"``. ``validation_batches`` is one
        batch of all 540 validation images (a forward pass takes milliseconds), ``evaluate``
        returns top-1 accuracy on it, and ``calibration_batches`` are three batches of 60.

    Raises:
        ValueError: If ``seed`` is not a non-negative integer.
    """
    seed = check_integer(seed, "seed", minimum=0)
    splits = split_digits(seed)
    model = DigitsCNN()
    # One intra-op thread: on tensors this small, extra threads only add overhead.
    model.load_state_dict(
        cached_state(
            "digits",
            _RECIPE,
            seed,
            cache_dir,
            lambda: single_threaded(lambda: _train(splits["train"], seed)),
        )
    )
    model.to(device).eval()

    def to_device(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return pair[0].to(device), pair[1].to(device)

    calibration = [to_device(b) for b in _batches(*splits["calibration"], _CALIBRATION_BATCH)]
    validation = [to_device(splits["validation"])]

    return Task(
        name="digits-cnn",
        model=model,
        loss_fn=cross_entropy,
        calibration_batches=calibration,
        validation_batches=validation,
        example_inputs=calibration[0][0][:1].clone(),
        evaluate=top1_accuracy(validation),
    )
