"""The torchvision example tasks (optuna_ctpe.tasks.vision): deep CNNs trained on upscaled digits.

Each task trains once (under a minute on two cores) into the weight cache and loads from it
afterwards. Checked here: the trained models are real classifiers, the cache round trip, and
that the search space measures and applies to them (grouped and depthwise convolutions).
"""

from __future__ import annotations

import pytest


pytest.importorskip("torch", reason="the vision tasks need the torch extra")
pytest.importorskip("torchvision", reason="the vision tasks need the vision extra")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from optuna_ctpe import HessianSearchSpace  # noqa: E402
from optuna_ctpe.tasks import Task  # noqa: E402
from optuna_ctpe.tasks.vision import ARCHITECTURES  # noqa: E402
from optuna_ctpe.tasks.vision import vision_task  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.slow]


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def task(request: pytest.FixtureRequest) -> Task:
    return vision_task(request.param, seed=0)


def test_a_trained_classifier_with_the_digits_split(task: Task) -> None:
    accuracy = task.evaluate(task.model)
    # Ten classes: chance is 0.1; briefly trained, both reach well above 0.9.
    assert accuracy > 0.9, accuracy
    n_validation = sum(len(y) for _, y in task.validation_batches)
    assert n_validation == 540
    x, _ = task.calibration_batches[0]
    assert x.shape[1:] == (3, 32, 32)
    assert not task.model.training


def test_the_cache_returns_the_same_weights(task: Task) -> None:
    arch = task.name.removesuffix("-digits")
    again = vision_task(arch, seed=0)
    for (name, a), (_, b) in zip(
        task.model.state_dict().items(), again.model.state_dict().items()
    ):
        assert torch.equal(a, b), name


def test_the_search_space_measures_and_applies(task: Task) -> None:
    space = HessianSearchSpace.from_model(
        task.model,
        task.loss_fn,
        task.calibration_batches[:1],
        bits=(4, 8),
        widths=(1.0,),
        max_probes=2,
        min_probes=2,
    )
    convs = [n for n, m in task.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert list(space.sensitivities) == convs
    depthwise = [
        n
        for n, m in task.model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
    ]
    assert bool(depthwise) == (task.name == "mobilenet_v2-digits")
    fp32 = task.evaluate(task.model)
    eight = task.evaluate(space.apply(task.model, space.uniform(8)))
    # 8-bit per-channel weights keep a trained CNN's accuracy within a few images.
    assert abs(eight - fp32) <= 0.02, (eight, fp32)
    assert task.evaluate(task.model) == fp32  # the task's model is untouched


def test_an_unknown_architecture_is_named() -> None:
    with pytest.raises(ValueError, match="arch must be one of.*'vgg'"):
        vision_task("vgg")
