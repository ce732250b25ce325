"""Tests of optuna_ctpe.nn.width: dependency groups and structured width pruning."""

from __future__ import annotations

import pytest


torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from torch import nn  # noqa: E402

from optuna_ctpe.nn.width import prune_widths  # noqa: E402
from optuna_ctpe.nn.width import width_groups  # noqa: E402
from optuna_ctpe.nn.width import width_perturbation  # noqa: E402


pytestmark = pytest.mark.torch


class Residual(nn.Module):
    """conv0 -> bn -> relu -> (conv1 + identity) -> conv2 -> pool -> fc: conv0/conv1 are tied."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.conv1 = nn.Conv2d(5, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 7, 1)
        self.fc = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv0(x)))
        h = h + self.conv1(h)
        h = self.conv2(h).mean((2, 3))
        return self.fc(h)


@pytest.fixture
def residual() -> Residual:
    torch.manual_seed(0)
    return Residual()


EX = torch.randn(2, 3, 6, 6)


def removed_sq_norm(model: nn.Module, pruned: nn.Module, layers) -> float:
    a, b = dict(model.named_modules()), dict(pruned.named_modules())
    return sum(
        float(
            a[n].weight.detach().double().pow(2).sum() - b[n].weight.detach().double().pow(2).sum()
        )
        for n in layers
        if isinstance(a[n], (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    )


def test_groups_of_a_residual_block(residual: Residual) -> None:
    groups = width_groups(residual, EX)
    by_name = {g.name: g for g in groups}
    assert set(by_name) == {"conv0", "conv2"}  # conv1 is tied to conv0; fc is ignored
    assert by_name["conv0"].n_channels == 5 and by_name["conv2"].n_channels == 7
    assert by_name["conv0"].layers == ("conv0", "bn", "conv1", "conv2")
    assert by_name["conv2"].layers == ("conv2", "fc")
    assert {g.name for g in width_groups(residual, EX, ignored_layers=[])} == {
        "conv0",
        "conv2",
        "fc",
    }


@pytest.mark.parametrize(
    ("width", "kept0", "kept2"),
    # Python rounding of width * n (half to even), never below one channel.
    [(0.3, 2, 2), (0.5, 2, 4), (0.7, 4, 5), (0.9, 4, 6), (0.01, 1, 1), (1.0, 5, 7)],
)
def test_kept_channels_are_rounded_width(residual: Residual, width, kept0, kept2) -> None:
    residual.train()
    before = {k: v.clone() for k, v in residual.state_dict().items()}
    pruned = prune_widths(residual, EX, {"conv0": width, "conv2": width})
    assert pruned.conv0.out_channels == pruned.conv1.out_channels == kept0
    assert pruned.conv1.in_channels == pruned.conv2.in_channels == pruned.bn.num_features == kept0
    assert pruned.conv2.out_channels == pruned.fc.in_features == kept2
    assert pruned.fc.out_features == 4
    assert pruned(EX).shape == (2, 4)
    assert pruned.training and residual.training
    assert all(torch.equal(v, before[k]) for k, v in residual.state_dict().items())


def test_unlisted_groups_and_width_one_are_untouched(residual: Residual) -> None:
    pruned = prune_widths(residual, EX, {"conv2": 1.0})
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, residual.state_dict()[k]), k
    only = prune_widths(residual, EX, {"conv2": 0.5})
    assert only.conv0.out_channels == 5 and only.conv2.out_channels == 4


def test_round_to(residual: Residual) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 8, 1))
    pruned = prune_widths(model, torch.randn(1, 3, 8, 8), {"0": 0.6}, round_to=8)
    assert pruned[0].out_channels % 8 == 0 and 0 < pruned[0].out_channels < 32
    with pytest.raises(ValueError, match="round_to must be a positive integer or None, got 0"):
        prune_widths(residual, EX, {"conv0": 0.5}, round_to=0)


def test_width_perturbation_equals_removed_weights(residual: Residual) -> None:
    groups = {g.name: g for g in width_groups(residual, EX)}
    for name, group in groups.items():
        previous = None
        for width in (0.2, 0.5, 0.8, 1.0):
            pruned = prune_widths(residual, EX, {name: width})
            value = width_perturbation(residual, group, width)
            assert value == pytest.approx(
                removed_sq_norm(residual, pruned, group.layers), rel=1e-9, abs=1e-9
            )
            assert previous is None or value <= previous  # wider keeps more
            previous = value
        assert previous == 0.0


@pytest.mark.parametrize("width", [0.0, -0.1, 1.5, float("nan"), "a", None, True])
def test_bad_widths(residual: Residual, width) -> None:
    with pytest.raises(ValueError, match=r"the width of group 'conv0' must be .*in \(0, 1\], got"):
        prune_widths(residual, EX, {"conv0": width})
    group = width_groups(residual, EX)[0]
    with pytest.raises(ValueError, match=r"must be .*in \(0, 1\]"):
        width_perturbation(residual, group, width)


def test_bad_names(residual: Residual) -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown width groups \['conv1', 'fc'\]; the groups are \['conv0', 'conv2'\]",
    ):
        prune_widths(residual, EX, {"conv1": 0.5, "fc": 0.5})
    with pytest.raises(
        ValueError, match=r"ignored_layers names modules the model lacks: \['nope'\]"
    ):
        width_groups(residual, EX, ignored_layers=["nope"])
    with pytest.raises(TypeError, match="group must be a WidthGroup"):
        width_perturbation(residual, "conv0", 0.5)
    with pytest.raises(TypeError, match="widths must be a mapping"):
        prune_widths(residual, EX, [("conv0", 0.5)])


@pytest.mark.parametrize(("arch", "n_groups"), [("resnet18", 12), ("mobilenet_v2", 25)])
def test_torchvision_groups_and_pruning(arch: str, n_groups: int) -> None:
    models = pytest.importorskip("torchvision").models
    torch.manual_seed(0)
    model = getattr(models, arch)(weights=None, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = width_groups(model, x)
    assert len(groups) == n_groups
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs <= {n for g in groups for n in g.layers}  # every conv belongs to a group
    widths = {g.name: (0.25, 0.5, 0.75, 1.0)[i % 4] for i, g in enumerate(groups)}
    pruned = prune_widths(model, x, widths)
    assert pruned(x).shape == (2, 10)
    modules = dict(pruned.named_modules())
    for g in groups:
        root = modules[g.name]
        assert root.out_channels == max(1, round(widths[g.name] * g.n_channels)), g.name
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # width_perturbation ranks channels as torch-pruning does, on the real architectures too.
    for g in (groups[1], groups[-1]):
        single = prune_widths(model, x, {g.name: 0.5})
        assert width_perturbation(model, g, 0.5) == pytest.approx(
            removed_sq_norm(model, single, g.layers), rel=1e-6
        )


@pytest.mark.parametrize("conv, example", [(nn.Conv1d, (2, 3, 5)), (nn.Conv3d, (2, 3, 3, 3, 3))])
def test_conv1d_and_conv3d_layers_are_width_groups(conv, example) -> None:  # type: ignore[no-untyped-def]
    """Every supported layer type roots a width group, not only Conv2d and Linear."""
    torch.manual_seed(0)
    n_positions = int(torch.Size(example[2:]).numel())
    model = nn.Sequential(
        conv(3, 8, 3, padding=1),
        nn.ReLU(),
        conv(8, 6, 1),
        nn.Flatten(),
        nn.Linear(6 * n_positions, 4),
    )
    ex = torch.randn(*example)
    groups = {g.name: g for g in width_groups(model, ex)}
    assert sorted(groups) == ["0", "2"]
    pruned = prune_widths(model, ex, {"0": 0.5})
    assert pruned[0].out_channels == 4 and pruned[2].in_channels == 4
    assert pruned(ex).shape == (2, 4)
    assert width_perturbation(model, groups["0"], 0.5) == pytest.approx(
        removed_sq_norm(model, pruned, ["0", "2"])
    )
