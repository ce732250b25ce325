"""Torchvision classifiers trained briefly on scikit-learn's digits, upscaled: real deep CNNs.

The digits CNN is small; users quantize deeper networks. These tasks train torchvision's
``resnet18`` (11.2M parameters, 21 weight layers) or ``mobilenet_v2`` (2.2M parameters,
grouped and depthwise convolutions, 53 weight layers) from scratch on the same offline data and
split as :func:`optuna_ctpe.tasks.digits.digits_task`, with every 8×8 image upscaled
(bilinear) to 32×32 and repeated over three channels, so the models keep their ImageNet
architecture (stem, strides, 10-class head). Training is a few epochs of Adam, deterministic
for a seed on a CPU, cached like the digits weights (:mod:`optuna_ctpe.tasks._cache`).

Requires the ``vision`` extra (torchvision).

Example:
    .. code-block:: python

        from optuna_ctpe.tasks.vision import resnet18_digits_task

        task = resnet18_digits_task(seed=0)  # trains once (about a minute on 2 cores), cached
        print(task.name, task.evaluate(task.model))  # resnet18-digits 0.9...
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from optuna_ctpe._validation import check_integer
from optuna_ctpe.tasks._task import Task
from optuna_ctpe.tasks._cache import cached_state
from optuna_ctpe.tasks._cache import single_threaded
from optuna_ctpe.tasks._training import cross_entropy
from optuna_ctpe.tasks._training import top1_accuracy
from optuna_ctpe.tasks._training import train_classifier
from optuna_ctpe.tasks.digits import DIGITS_SPLIT
from optuna_ctpe.tasks.digits import split_digits


__all__ = ["ARCHITECTURES", "mobilenet_v2_digits_task", "resnet18_digits_task", "vision_task"]

#: Architecture name -> its training recipe. Bump ``version`` when an architecture, the input
#: transform or a recipe changes: it is part of the cache key.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "resnet18": {
        "version": 1,
        "image_size": 32,
        "epochs": 6,
        "batch_size": 64,
        "lr": 1e-3,
        "weight_decay": 1e-4,
    },
    "mobilenet_v2": {
        "version": 1,
        "image_size": 32,
        "epochs": 10,
        "batch_size": 64,
        "lr": 2e-3,
        "weight_decay": 1e-5,
    },
}
_BATCH = 60


def _build(arch: str) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, arch)(num_classes=10)


def _upscaled(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, 1, 8, 8)`` digits in [0, 1] -> ``(N, 3, size, size)``, centred at 0."""
    up = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (up.repeat(1, 3, 1, 1) - 0.5) / 0.5


def vision_task(
    arch: str,
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> Task:
    """A torchvision ``arch`` trained briefly on upscaled digits.

    Args:
        arch: One of :data:`ARCHITECTURES`: ``"resnet18"`` or ``"mobilenet_v2"``.
        seed: Seed of the data split, the initialisation and the training order.
        cache_dir: Folder of the weight cache; ``None`` uses the platform cache folder
            (:func:`optuna_ctpe.tasks.digits.default_cache_dir`).
        device: Torch device of the model and of every batch.

    Returns:
        A :class:`~optuna_ctpe.tasks.Task` named ``"<arch>-digits"``: 540 validation images in
        batches of 60 scored by top-1 accuracy, three calibration batches of 60.

    Raises:
        ValueError: If ``arch`` is unknown or ``seed`` is not a non-negative integer.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}.")
    seed = check_integer(seed, "seed", minimum=0)
    recipe = ARCHITECTURES[arch]
    splits = {
        name: (_upscaled(x, recipe["image_size"]), y)
        for name, (x, y) in split_digits(seed).items()
    }

    def train() -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return train_classifier(_build(arch), *splits["train"], recipe, seed)

    model = _build(arch)
    model.load_state_dict(
        cached_state(
            f"{arch}-digits",
            {**recipe, "split": DIGITS_SPLIT},
            seed,
            cache_dir,
            lambda: single_threaded(train),
        )
    )
    model.to(device).eval()

    def batches(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = splits[name]
        return [
            (x[i : i + _BATCH].to(device), y[i : i + _BATCH].to(device))
            for i in range(0, len(y), _BATCH)
        ]

    calibration, validation = batches("calibration"), batches("validation")

    return Task(
        name=f"{arch}-digits",
        model=model,
        loss_fn=cross_entropy,
        calibration_batches=calibration,
        validation_batches=validation,
        example_inputs=calibration[0][0][:1].clone(),
        evaluate=top1_accuracy(validation),
    )


def resnet18_digits_task(
    *, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None, device: str = "cpu"
) -> Task:
    """torchvision's resnet18 trained briefly on upscaled digits (:func:`vision_task`)."""
    return vision_task("resnet18", seed=seed, cache_dir=cache_dir, device=device)


def mobilenet_v2_digits_task(
    *, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None, device: str = "cpu"
) -> Task:
    """torchvision's mobilenet_v2 trained briefly on upscaled digits (:func:`vision_task`)."""
    return vision_task("mobilenet_v2", seed=seed, cache_dir=cache_dir, device=device)
