"""Tests of optuna_ctpe.nn.quantize: fake quantization, size and BOPs accounting."""

from __future__ import annotations

import pytest


torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from optuna_ctpe.nn.quantize import bops  # noqa: E402
from optuna_ctpe.nn.quantize import model_size  # noqa: E402
from optuna_ctpe.nn.quantize import quantization_error  # noqa: E402
from optuna_ctpe.nn.quantize import quantize_model  # noqa: E402
from optuna_ctpe.nn.quantize import quantize_weight  # noqa: E402


pytestmark = pytest.mark.torch


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # "0": weight 108, bias 4
        nn.BatchNorm2d(4),  # "1": 8 parameters
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10, bias=False),  # "4": weight 2560
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_quantize_weight_levels_and_range(bits: int) -> None:
    torch.manual_seed(1)
    w = torch.randn(6, 3, 3, 3)
    q = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.shape == w.shape and q.dtype == w.dtype
    for c in range(6):
        scale = float(w[c].abs().max()) / qmax
        levels = q[c] / scale
        tol = 1e-6 * qmax + 1e-4  # float32 resolution at q_max
        assert torch.allclose(levels, levels.round(), atol=tol)  # integer multiples of the scale
        assert float(levels.abs().max()) == pytest.approx(qmax, abs=tol)  # max|w| maps to q_max
        assert (q[c] - w[c]).abs().max() <= scale / 2 + 1e-6  # round to nearest
        assert len(torch.unique(q[c])) <= 2 * qmax + 1


def test_quantize_weight_edge_cases() -> None:
    w = torch.zeros(3, 4)
    w[1] = torch.tensor([0.5, -1.0, 0.25, 0.0])
    q = quantize_weight(w, 4)
    assert torch.isfinite(q).all() and torch.equal(q[0], torch.zeros(4))  # zero channel, no NaN
    w64 = torch.randn(4, 5, dtype=torch.float64)
    assert quantize_weight(w64, 8).dtype == torch.float64
    assert quantize_weight(torch.tensor(0.3), 4).shape == ()
    # Straight-through gradient inside the clipping range.
    wg = torch.randn(4, 5, requires_grad=True)
    quantize_weight(wg, 3).sum().backward()
    assert torch.equal(wg.grad, torch.ones_like(wg))


@pytest.mark.parametrize("bits", [1, 17, 0, 4.0, True, "8", None])
def test_bad_bits(bits) -> None:
    with pytest.raises(ValueError, match=r"bits must be an integer bit-width in \[2, 16\], got"):
        quantize_weight(torch.randn(3, 3), bits)
    with pytest.raises(ValueError, match=r"bits\['0'\] must be an integer bit-width"):
        quantize_model(small_cnn(), {"0": bits})


def test_bad_weight_type() -> None:
    with pytest.raises(TypeError, match="floating-point tensor"):
        quantize_weight(torch.ones(3, 3, dtype=torch.int64), 4)


def test_quantization_error_strictly_decreases_with_bits() -> None:
    torch.manual_seed(2)
    w = torch.randn(16, 8, 3, 3)
    errors = [quantization_error(w, b) for b in range(2, 17)]
    assert all(a > b > 0 for a, b in zip(errors, errors[1:]))
    assert errors[2] == pytest.approx(float((quantize_weight(w, 4) - w).double().pow(2).sum()))


def test_quantize_model_copies_and_quantizes_only_named_layers() -> None:
    model = small_cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_model(model, {"0": 3})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(q[0].weight, quantize_weight(before["0.weight"], 3))
    for k, v in q.state_dict().items():
        if k != "0.weight":
            assert torch.equal(v, before[k]), k
    assert q.training and q[1].training
    assert q is not model and q[0].weight is not model[0].weight


def test_quantize_model_rejects_bad_names() -> None:
    model = small_cnn()
    with pytest.raises(ValueError, match=r"bits names layers the model lacks: \['nope', 'zzz'\]"):
        quantize_model(model, {"0": 4, "zzz": 4, "nope": 8})
    with pytest.raises(ValueError, match=r"without a weight parameter: \['2'\]"):
        quantize_model(model, {"2": 4})
    with pytest.raises(ValueError, match="calibration_batches is required"):
        quantize_model(model, {"0": 4}, activation_bits=8)
    with pytest.raises(ValueError, match="calibration_batches is empty"):
        quantize_model(model, {"0": 4}, activation_bits=8, calibration_batches=[])
    with pytest.raises(ValueError, match=r"activation_bits names layers the model lacks: \['x'\]"):
        quantize_model(
            model,
            {"0": 4},
            activation_bits={"x": 8},
            calibration_batches=[torch.zeros(1, 3, 8, 8)],
        )
    with pytest.raises(TypeError, match="bits must be a mapping"):
        quantize_model(model, [("0", 4)])


def test_activation_quantization_is_calibrated() -> None:
    model = small_cnn().eval()
    torch.manual_seed(3)
    calib = [(torch.randn(4, 3, 8, 8), torch.zeros(4)), (torch.randn(4, 3, 8, 8), torch.zeros(4))]
    q = quantize_model(model, {"0": 8, "4": 8}, activation_bits=2, calibration_batches=calib)
    seen = {}
    q[4].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    x = torch.randn(4, 3, 8, 8)
    out = q(x)
    assert out.shape == (4, 10)
    # 2-bit activations: the Linear's (non-negative, ReLU) inputs take at most 4 levels.
    assert len(torch.unique(seen["x"])) <= 4
    weights_only = quantize_model(model, {"0": 8, "4": 8})
    assert not torch.allclose(out, weights_only(x))
    # The copy with its hooks can be copied again and behaves the same.
    import copy

    assert torch.equal(copy.deepcopy(q)(x), out)


def test_model_size_hand_count() -> None:
    model = small_cnn()
    size = model_size(model, {"0": 4, "4": 2})
    expected = 108 * 4 + 4 * 32 + 8 * 32 + 2560 * 2
    assert size.total_bits == expected
    assert size.n_params == 108 + 4 + 8 + 2560
    assert size.bytes == expected / 8
    assert size.compression_ratio == pytest.approx(32 * size.n_params / expected)
    assert size.layer_bits == {"0": 108 * 4 + 4 * 32, "1": 8 * 32, "4": 2560 * 2}
    fp32 = model_size(model)
    assert fp32.total_bits == 32 * fp32.n_params and fp32.compression_ratio == 1.0
    assert model_size(model, default_bits=16).total_bits == 16 * fp32.n_params
    with pytest.raises(ValueError, match="default_bits must be an integer in"):
        model_size(model, default_bits=0)
    with pytest.raises(ValueError, match=r"lacks: \['9'\]"):
        model_size(model, {"9": 4})


def test_model_size_counts_shared_parameters_once() -> None:
    lin = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert model_size(model, {"0": 8}).total_bits == 16 * 8


def test_bops_hand_count() -> None:
    model = small_cnn()
    model.train()
    x = torch.randn(3, 3, 8, 8)
    conv_macs = 4 * 8 * 8 * 3 * 3 * 3  # outputs per sample x in_channels x kernel
    fc_macs = 10 * 256
    assert bops(model, {"0": 4, "4": 8}, x, 8) == conv_macs * 4 * 8 + fc_macs * 8 * 8
    assert bops(model, {}, x) == (conv_macs + fc_macs) * 32 * 32
    assert bops(model, {"0": 4}, x, {"4": 4}) == conv_macs * 4 * 32 + fc_macs * 32 * 4
    assert model.training  # mode restored
    with pytest.raises(
        ValueError, match=r"activation_bits must be an integer bit-width in \[2, 32\]"
    ):
        bops(model, {}, x, 1)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_mixed_precision(arch: str) -> None:
    models = pytest.importorskip("torchvision").models
    torch.manual_seed(0)
    model = getattr(models, arch)(weights=None, num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    bits = {n: 2 + i % 7 for i, n in enumerate(layers)}
    x = torch.randn(2, 3, 32, 32)
    q = quantize_model(model, bits, activation_bits=8, calibration_batches=[x])
    assert q(x).shape == (2, 10)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    modules = dict(model.named_modules())
    quantized = sum(modules[n].weight.numel() * b for n, b in bits.items())
    weights = sum(modules[n].weight.numel() for n in bits)
    n_params = sum(p.numel() for p in model.parameters())
    size = model_size(q, bits)
    assert size.total_bits == quantized + 32 * (n_params - weights)
    assert size.n_params == n_params
    assert size.compression_ratio > 4
