"""Width calibration: each width group's measured loss increase, how Ω uses it, its JSON."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from optuna_ctpe.search_space import HessianSearchSpace
from optuna_ctpe.space.records import LayerSensitivity
from optuna_ctpe.space.records import ParamTensor
from optuna_ctpe.space.records import WidthGroupSensitivity


WIDTHS = (0.5, 0.75, 1.0)


def _space(loss_increase: dict[float, float] | None) -> HessianSearchSpace:
    """A torch-free space of one layer and one width group of 4 channels."""
    layer = LayerSensitivity("fc", 2.0, 8, {2: 0.5, 4: 0.1, 8: 0.01})
    group = WidthGroupSensitivity(
        "fc", 4, 2.0, {0.5: 0.02, 0.75: 0.01, 1.0: 0.0}, loss_increase=loss_increase
    )
    return HessianSearchSpace(
        [layer],
        [group],
        tensors=[ParamTensor("fc.weight", 8, "fc", out_group="fc")],
        bits=(2, 4, 8),
        widths=WIDTHS,
    )


def test_omega_takes_the_larger_of_measurement_and_estimate() -> None:
    plain = _space(None).omega["width:fc"]
    assert plain == pytest.approx({0.5: 0.04, 0.75: 0.02, 1.0: 0.0})
    # 0.5: measured 0.3 -> Ω 0.6 > 0.04; 0.75: a measured decrease keeps the estimate.
    calibrated = _space({0.5: 0.3, 0.75: -0.05, 1.0: 0.0}).omega["width:fc"]
    assert calibrated == pytest.approx({0.5: 0.6, 0.75: 0.02, 1.0: 0.0})
    # Bits are not calibrated.
    assert (
        _space({0.5: 0.3, 0.75: 0.0, 1.0: 0.0}).omega["bits:fc"] == _space(None).omega["bits:fc"]
    )


def test_json_round_trip_and_old_files() -> None:
    calibrated = _space({0.5: 0.3, 0.75: -0.05, 1.0: 0.0})
    again = HessianSearchSpace.from_json(calibrated.to_json())
    assert again.groups["fc"].loss_increase == {0.5: 0.3, 0.75: -0.05, 1.0: 0.0}
    assert again.omega == calibrated.omega
    # An uncalibrated space writes no loss_increase: its file is what it was before.
    data = json.loads(_space(None).to_json())
    assert "loss_increase" not in data["groups"][0]
    # A file written before calibration existed loads unchanged, second-order Ω.
    old = HessianSearchSpace.from_json(data)
    assert old.groups["fc"].loss_increase is None
    assert old.omega == _space(None).omega


@pytest.mark.parametrize(
    ("increase", "message"),
    [
        ({0.5: 0.3, 1.0: 0.0}, r"loss_increase of group 'fc' lack the widths \[0.75\]"),
        ({0.5: math.nan, 0.75: 0.0, 1.0: 0.0}, r"loss_increase\[0.5\] of group 'fc'"),
        ({0.5: "x", 0.75: 0.0, 1.0: 0.0}, r"loss_increase\[0.5\] of group 'fc'"),
    ],
)
def test_bad_loss_increase_is_named(increase: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _space(increase)


# -- torch side -----------------------------------------------------------------------------


torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from torch import nn  # noqa: E402

from optuna_ctpe.nn.width_calibration import calibrate_groups  # noqa: E402
from optuna_ctpe.nn.width_calibration import calibration_loss  # noqa: E402


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.fixture
def tiny() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Four hidden channels of clearly ordered magnitude (1, 10, 100, 1000): pruning to a
    ratio keeps the largest ones, so the expected pruned loss is known without the pruner.

    In float64: outputs reach 1e5-1e6 while the residual is about 0.1, so in float32 the
    rounding of the output (ulp 0.06 at 8e5) alone moves the loss by tenths, and a matmul kernel
    that sums in another order (three kept channels against four masked ones) fails the test."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        for k in range(4):
            model[0].weight[k] *= 10.0**k
            model[0].bias[k] = model[0].bias[k].abs() * 10.0**k
            model[2].weight[0, k] = 10.0**k
    inputs = [torch.randn(8, 2, dtype=torch.float64) for _ in range(2)]
    # Targets near the model's own outputs: a trained model, whose loss pruning increases.
    with torch.no_grad():
        batches = [(x, model(x) + 0.1 * torch.randn(8, 1, dtype=torch.float64)) for x in inputs]
    return model, batches


def _loss_without(model: nn.Module, batches: list, removed: list[int]) -> float:
    """The loss with the hidden channels ``removed`` cut from the output layer, by hand."""
    keep = torch.ones(4, dtype=torch.float64)
    keep[removed] = 0.0
    total = 0.0
    with torch.no_grad():
        for x, y in batches:
            hidden = torch.relu(model[0](x)) * keep
            total += float(torch.nn.functional.mse_loss(model[2](hidden), y))
    return total / len(batches)


def test_calibrate_groups_measures_the_pruned_loss(tiny: tuple) -> None:
    model, batches = tiny
    x = batches[0][0][:1]
    group = WidthGroupSensitivity("0", 4, 1.0, {0.5: 1.0, 0.75: 0.5, 1.0: 0.0})
    before = [p.detach().clone() for p in model.parameters()]
    (calibrated,) = calibrate_groups(model, _mse, batches, x, [group])
    base = _loss_without(model, batches, [])
    assert base == pytest.approx(calibration_loss(model, _mse, batches), rel=1e-6)
    expected = {
        0.5: _loss_without(model, batches, [0, 1]) - base,
        0.75: _loss_without(model, batches, [0]) - base,
        1.0: 0.0,
    }
    assert calibrated.loss_increase == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert calibrated.loss_increase[0.5] > calibrated.loss_increase[0.75] > 0
    # The rest of the record and the model are untouched.
    assert dataclasses.replace(calibrated, loss_increase=None) == group
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_from_model_calibrates_on_request(tiny: tuple) -> None:
    model, batches = tiny
    kwargs = {"example_inputs": batches[0][0][:1], "widths": WIDTHS, "estimator": "ggn"}
    kwargs["keep_first_last_bits"] = None
    plain = HessianSearchSpace.from_model(model, _mse, batches, **kwargs)
    assert plain.groups["0"].loss_increase is None
    calibrated = HessianSearchSpace.from_model(
        model, _mse, batches, calibrate_widths=True, **kwargs
    )
    (expected,) = calibrate_groups(
        model, _mse, batches, kwargs["example_inputs"], [plain.groups["0"]]
    )
    assert calibrated.groups["0"].loss_increase == pytest.approx(expected.loss_increase)
    for w in WIDTHS:
        assert calibrated.omega["width:0"][w] == pytest.approx(
            max(plain.omega["width:0"][w], 2 * expected.loss_increase[w])
        )
    assert HessianSearchSpace.from_json(calibrated.to_json()).omega == calibrated.omega


def test_errors_are_named(tiny: tuple) -> None:
    model, batches = tiny
    group = WidthGroupSensitivity("0", 4, 1.0, {0.5: 1.0, 1.0: 0.0})
    with pytest.raises(ValueError, match="example_inputs is required"):
        calibrate_groups(model, _mse, batches, None, [group])
    with pytest.raises(ValueError, match="batches must hold at least one batch"):
        calibration_loss(model, _mse, [])
    with pytest.raises(ValueError, match="non-finite calibration loss"):
        calibration_loss(model, lambda m, b: torch.tensor(math.nan), batches)
    # Without groups there is nothing to prune: no example inputs needed.
    assert calibrate_groups(model, _mse, batches, None, []) == []


def test_loss_increase_measures_configurations(tiny: tuple) -> None:
    model, batches = tiny
    x = batches[0][0][:1]
    space = HessianSearchSpace.from_model(
        model, _mse, batches, example_inputs=x, widths=WIDTHS, estimator="ggn",
        keep_first_last_bits=None, budget=math.inf,
    )  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    measure = space.loss_increase(model, _mse, batches, x)
    base = calibration_loss(model, _mse, batches)
    narrow = dataclasses.replace(space.uniform(8), widths={"0": 0.5})
    for config in (space.uniform(8), space.uniform(2), narrow):
        expected = calibration_loss(space.apply(model, config, x), _mse, batches) - base
        assert measure(config) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # Fewer bits and fewer channels lose more; the model is left as it was.
    assert measure(narrow) > measure(space.uniform(8))
    assert measure(space.uniform(2)) > measure(space.uniform(8))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="batches must hold at least one batch"):
        space.loss_increase(model, _mse, [], x)
