"""Every common layer type, bits and widths: Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear,
grouped and depthwise convolutions (ConvNeXt-style block, MobileNetV2) with the normalisation
layers between them; and the warning for a module the package cannot quantize."""

from __future__ import annotations

import math
import warnings

import pytest


torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from optuna_ctpe import HessianSearchSpace  # noqa: E402
from optuna_ctpe.nn.layers import model_layers  # noqa: E402
from optuna_ctpe.nn.quantize import bops  # noqa: E402
from optuna_ctpe.nn.quantize import model_size  # noqa: E402
from optuna_ctpe.nn.quantize import quantize_model  # noqa: E402
from optuna_ctpe.nn.width import width_groups  # noqa: E402
from optuna_ctpe.nn.width import width_perturbation  # noqa: E402


pytestmark = pytest.mark.torch


class _AllConvs(nn.Module):
    """One branch per convolution dimension, each with a transposed convolution and a norm; the
    2-D branch also has a depthwise 7x7 and a grouped convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 8, 3, padding=1)
        self.t1 = nn.ConvTranspose1d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(8)
        self.c2 = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.gn = nn.GroupNorm(1, 8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.t2 = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.c3 = nn.Conv3d(1, 4, 3, padding=1)
        self.t3 = nn.ConvTranspose3d(4, 4, 3, padding=1)
        self.bn3 = nn.BatchNorm3d(4)
        self.fc = nn.Linear(8 + 4 + 4, 3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        a = self.bn1(self.t1(self.c1(x1).relu())).mean(-1)
        b = self.t2(self.grouped(self.gn(self.dw(self.c2(x2))))).mean((-1, -2))
        c = self.bn3(self.t3(self.c3(x3))).mean((-1, -2, -3))
        return self.fc(torch.cat([a, b, c], 1))


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(4, 2, 10, generator=g),
        torch.randn(4, 1, 8, 8, generator=g),
        torch.randn(4, 1, 4, 4, 4, generator=g),
    )


def _loss(net: nn.Module, batch: tuple[tuple[torch.Tensor, ...], torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(net(*batch[0]), batch[1])


def _space(model: nn.Module, batch, example_inputs) -> HessianSearchSpace:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trace of layer.*is negative")
        return HessianSearchSpace.from_model(
            model,
            _loss,
            [batch],
            widths=(0.5, 1.0),
            example_inputs=example_inputs,
            max_probes=4,
            keep_first_last_bits=None,
        )


def _check_pruned(space: HessianSearchSpace, model: nn.Module, batch, example_inputs) -> None:  # type: ignore[no-untyped-def]
    """Every group at half width: the space's size is the pruned copy's, the loss finite."""
    config = space.uniform(4, 0.5)
    net = space.apply(model, config, example_inputs)
    assert space.size(config) == model_size(net, dict(config.bits), scales=True).total_bits
    with torch.no_grad():
        assert math.isfinite(float(_loss(net, batch)))
    assert space.size(config) < space.size(space.uniform(4))
    assert space.warm_starts(size_ratio=0.2, n=2)


def test_every_convolution_type_gets_bits_and_widths() -> None:
    torch.manual_seed(0)
    model, xs = _AllConvs(), _inputs()
    batch = (xs, torch.tensor([0, 1, 2, 0]))
    space = _space(model, batch, xs)
    convs = ["c1", "t1", "c2", "dw", "grouped", "t2", "c3", "t3"]
    assert list(space.sensitivities) == [*convs, "fc"]
    # Every convolution roots a width group, except those coupled to another's channels (the
    # depthwise convolution follows c2).
    assert set(space.groups) == set(convs) - {"dw"}
    assert all(g.perturbations[0.5] > 0 for g in space.groups.values())
    _check_pruned(space, model, batch, xs)


def test_transposed_convolutions_are_quantized_per_output_channel() -> None:
    torch.manual_seed(0)
    model = _AllConvs()
    q = quantize_model(model, {"t2": 2, "t3": 2})
    for name in ("t2", "t3"):
        w = getattr(q, name).weight.detach()  # (in, out, *kernel)
        assert all(len(torch.unique(w[:, j])) <= 3 for j in range(w.shape[1]))
    assert model_layers(model)["t2"].out_axis == 1
    # A ConvTranspose2d's MACs: input elements x out_channels x kernel elements.
    full = bops(model, {}, _inputs(), activation_bits=32)
    low = bops(model, {"t2": 4}, _inputs(), activation_bits=32)
    assert full - low == 8 * 8 * 8 * 4 * 2 * 2 * (32 - 4) * 32


def test_measured_perturbations_match_width_perturbation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 6, 1),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    )
    x = torch.randn(2, 3, 4, 4)
    space = _space(model, ((x,), torch.tensor([0, 1])), x)
    for g in width_groups(model, x):
        assert space.groups[g.name].perturbations[0.5] == pytest.approx(
            width_perturbation(model, g, 0.5), rel=1e-9
        )


class _ConvNeXtBlock(nn.Module):
    """A ConvNeXt block: depthwise 7x7, channels-last LayerNorm, inverted MLP, residual."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(nn.functional.gelu(self.pwconv1(y))).permute(0, 3, 1, 2)
        return self.head((x + y).mean((-1, -2)))


def test_convnext_block() -> None:
    torch.manual_seed(0)
    model = _ConvNeXtBlock()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = ((x,), torch.tensor([0, 1, 2, 0]))
    space = _space(model, batch, x)
    assert list(space.sensitivities) == ["stem", "dwconv", "pwconv1", "pwconv2", "head"]
    assert {"stem", "pwconv1"} <= set(space.groups)  # residual channels; MLP hidden size
    _check_pruned(space, model, batch, x)


@pytest.mark.slow
def test_mobilenet_v2() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = ((x,), torch.tensor([0, 1]))
    space = _space(model, batch, x)
    assert len(space.sensitivities) == 53  # 52 convolutions (17 depthwise) and the classifier
    assert len(space.groups) == 25
    _check_pruned(space, model, batch, x)


class _Scale(nn.Module):
    """A module with a weight matrix of its own making, which the package cannot quantize."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class _Unsupported(nn.Module):
    """Linear layers around a custom weight matrix, and an (unused) nn.Bilinear and nn.LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), _Scale(), nn.LayerNorm(4), nn.Linear(4, 3))
        self.bilinear = nn.Bilinear(3, 3, 3)
        self.lstm = nn.LSTM(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_an_unsupported_weight_is_named_in_a_warning() -> None:
    torch.manual_seed(0)
    model, x = _Unsupported(), torch.randn(4, 4)
    batch = ((x,), torch.tensor([0, 1, 2, 0]))
    with pytest.warns(
        UserWarning, match=r"'body.1' \(_Scale\).*'bilinear' \(Bilinear\).*'lstm' \(LSTM\)"
    ) as rec:
        space = _space(model, batch, None)
    assert not any("LayerNorm" in str(w.message) for w in rec)  # norm scales: float by design
    assert list(space.sensitivities) == ["body.0", "body.3"]
