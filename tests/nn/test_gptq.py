"""Tests of optuna_ctpe.nn.gptq (GPTQ's Algorithm 1, Hessians from hooks) and of the per-(layer,
format) store optuna_ctpe.nn.formats."""

from __future__ import annotations

import warnings

import pytest


torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from optuna_ctpe.nn.formats import FormatQuantizer  # noqa: E402
from optuna_ctpe.nn.formats import formats_in_place  # noqa: E402
from optuna_ctpe.nn.gptq import collect_hessians  # noqa: E402
from optuna_ctpe.nn.gptq import GPTQSettings  # noqa: E402
from optuna_ctpe.nn.gptq import gptq_rows  # noqa: E402
from optuna_ctpe.nn.gptq import hessian_factor  # noqa: E402
from optuna_ctpe.nn.gptq import InputHessian  # noqa: E402
from optuna_ctpe.nn.gptq import layer_input_rows  # noqa: E402
from optuna_ctpe.nn.grids import as_rows  # noqa: E402
from optuna_ctpe.nn.grids import fake_quantize  # noqa: E402
from optuna_ctpe.nn.grids import quantize_codes  # noqa: E402
from optuna_ctpe.nn.layers import model_layers  # noqa: E402
from optuna_ctpe.nn.quantize import quantize_weight  # noqa: E402
from optuna_ctpe.space.formats import FormatFallbackWarning  # noqa: E402
from optuna_ctpe.space.formats import legacy_format  # noqa: E402
from optuna_ctpe.space.formats import parse_format  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]

FORMATS = [
    "int3-pc-sym-gptq",
    "int2-pc-asym-gptq",
    "int3-g32-asym-gptq",
    "int4-g16-fullsym-gptq",
    "int4-g24-sym-gptq",  # groups straddling the blocks of 32 columns
]


def _problem(
    seed: int, rows: int = 24, n: int = 80, samples: int = 400
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight and correlated inputs (GPTQ gains from correlation)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen) / n**0.5
    x = torch.randn(samples, n, generator=gen) @ mix + 0.1 * torch.randn(samples, n, generator=gen)
    w = torch.randn(rows, n, generator=gen)
    h = InputHessian(n)
    h.add(x)
    return w, x, h.matrix()


def _output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - q).double() @ x.double().T).pow(2).sum())


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_output_error_is_at_most_rtn_on_the_same_grid(
    name: str, act_order: bool, seed: int
) -> None:
    fmt = parse_format(name)
    w, x, h = _problem(seed)
    q, fit = gptq_rows(w, h, fmt, GPTQSettings(block_size=32, act_order=act_order))
    rtn = fake_quantize(w, fmt)
    assert _output_error(w, q, x) <= _output_error(w, rtn, x)
    # The result lies on its grid: its codes decode to it exactly and stay in range.
    scale, zero = fit.columns(w.shape[1])
    codes = quantize_codes(q, scale, zero, fmt)
    assert torch.equal((codes - zero) * scale, q)
    if fmt.group_size is None or act_order:  # grids fitted before the sweep: RTN's grids
        _, rtn_zero = fit.columns(w.shape[1])
        rtn_codes = quantize_codes(w, scale, rtn_zero, fmt)
        assert torch.equal(fake_quantize(w, fmt), (rtn_codes - zero) * scale)


@pytest.mark.parametrize("name", FORMATS)
def test_with_uncorrelated_inputs_gptq_is_rtn(name: str) -> None:
    # H ∝ I: no error moves to other columns, so every weight is rounded to nearest.
    fmt = parse_format(name)
    w = torch.randn(10, 48, generator=torch.Generator().manual_seed(5))
    for act_order in (False, True):
        settings = GPTQSettings(block_size=16, act_order=act_order)
        q, _ = gptq_rows(w, 3.0 * torch.eye(48), fmt, settings)
        assert torch.equal(q, fake_quantize(w, fmt))


@pytest.mark.parametrize("name", FORMATS)
def test_one_input_column_is_rtn(name: str) -> None:
    fmt = parse_format(name)
    w = torch.randn(12, 1, generator=torch.Generator().manual_seed(6))
    q, _ = gptq_rows(w, torch.tensor([[0.7]]), fmt)
    assert torch.equal(q, fake_quantize(w, fmt))


def test_two_columns_match_the_closed_form_update() -> None:
    # OBS (Frantar et al., Eq. 3): after rounding column 0, column 1 moves by
    # -(w0 - q0) [H^-1]_01 / [H^-1]_00, then is rounded; H damped by 1% of its mean diagonal.
    # A third, independent column of 3s fixes every row's grid to the levels -3..3.
    fmt = legacy_format(3)
    gen = torch.Generator().manual_seed(7)
    w = torch.cat([torch.rand(64, 2, generator=gen) * 4 - 2, torch.full((64, 1), 3.0)], 1)
    h = torch.tensor([[2.0, 1.9, 0.0], [1.9, 2.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    q, fit = gptq_rows(w, h, fmt, GPTQSettings(percdamp=0.01))
    assert torch.equal(fit.scale, torch.ones(64, 1))
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(3, dtype=torch.float64)
    inv = torch.linalg.inv(damped)
    q0 = w[:, 0].round()
    w1 = w[:, 1].double() - (w[:, 0] - q0).double() * inv[0, 1] / inv[0, 0]
    assert torch.equal(q[:, 0], q0)
    assert torch.equal(q[:, 1], w1.round().clamp(-3, 3).float())
    assert torch.equal(q[:, 2], w[:, 2])
    assert not torch.equal(q[:, 1], w[:, 1].round())  # the update changed some roundings


def test_act_order_sweeps_by_decreasing_diagonal() -> None:
    # Permuting the inputs permutes the result: act-order's sweep depends on H alone.
    fmt = legacy_format(3)
    w, _, h = _problem(8, n=40)
    settings = GPTQSettings(block_size=16, act_order=True)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    q, _ = gptq_rows(w, h, fmt, settings)
    q_perm, _ = gptq_rows(w[:, perm], h[perm][:, perm], fmt, settings)
    assert torch.allclose(q_perm, q[:, perm], atol=1e-6)
    # With H's diagonal already decreasing, act-order is the plain sweep.
    order = torch.argsort(h.diagonal(), descending=True)
    plain, _ = gptq_rows(w[:, order], h[order][:, order], fmt, GPTQSettings(block_size=16))
    assert torch.allclose(plain, q[:, order], atol=1e-6)


def test_block_size_changes_nothing_but_speed() -> None:
    fmt = parse_format("int3-g32-asym-gptq")
    w, _, h = _problem(9)
    a, _ = gptq_rows(w, h, fmt, GPTQSettings(block_size=7))
    b, _ = gptq_rows(w, h, fmt, GPTQSettings(block_size=80))
    c, _ = gptq_rows(w, h, fmt, GPTQSettings(block_size=32))
    # Equal up to float32 rounding of the update order (a level flips where a weight lies
    # within rounding error of a decision boundary).
    assert (a != b).float().mean() < 0.01 and (c != b).float().mean() < 0.01


@pytest.mark.parametrize("act_order", [False, True])
def test_a_shared_factor_gives_the_same_result(act_order: bool) -> None:
    settings = GPTQSettings(act_order=act_order, block_size=32)
    w, _, h = _problem(11)
    factor = hessian_factor(h, settings)
    for name in FORMATS:
        direct, _ = gptq_rows(w, h, parse_format(name), settings)
        shared, _ = gptq_rows(w, factor, parse_format(name), settings)
        assert torch.equal(direct, shared)


def test_dead_inputs_are_rounded_to_nearest() -> None:
    fmt = legacy_format(3)
    w, x, _ = _problem(10, n=20)
    x[:, 4] = 0.0
    h = InputHessian(20)
    h.add(x)
    q, _ = gptq_rows(w, h.matrix(), fmt)
    assert torch.equal(q[:, 4], fake_quantize(w, fmt)[:, 4])


def test_settings_and_shape_checks() -> None:
    with pytest.raises(ValueError, match="percdamp must be a number > 0"):
        GPTQSettings(percdamp=0)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        GPTQSettings(block_size=0)
    with pytest.raises(ValueError, match="hessian must be 3 x 3"):
        gptq_rows(torch.randn(2, 3), torch.eye(4), legacy_format(4))
    with pytest.raises(ValueError, match="no integer grid"):
        gptq_rows(torch.randn(2, 3), torch.eye(3), parse_format("fp16"))
    with pytest.raises(ValueError, match="hessian must be a square matrix"):
        hessian_factor(torch.ones(2, 3))
    with pytest.raises(ValueError, match="not positive definite"):
        hessian_factor(-torch.eye(3))
    with pytest.raises(ValueError, match="no calibration input"):
        InputHessian(3).matrix()


def test_the_hessian_is_streamed() -> None:
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(12))
    h = InputHessian(12)
    for part in x.split(70):
        h.add(part)
    assert h.count == 300
    assert torch.allclose(h.matrix(), 2 * x.double().T @ x.double() / 300, atol=1e-5)


class Conv1D(nn.Module):
    """Hugging Face's Conv1D: ``y = x @ W + b`` with ``W`` of shape ``(in, out)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 48)
        self.conv = nn.Conv1d(48, 32, 3, padding=1, padding_mode="circular")
        self.conv2 = nn.Conv2d(1, 4, 3, dilation=2, stride=2)
        self.gpt = Conv1D(24, 32)
        self.fc = nn.Linear(24, 6)
        self.calls = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)  # (N, T, 32)
        side = self.conv2(h[:, None, :, :12]).mean()
        return self.fc(torch.relu(self.gpt(h))) + side


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 20, (8, 10), generator=gen) for _ in range(3)]


@pytest.mark.parametrize("name", ["conv", "conv2", "gpt", "fc"])
def test_input_rows_reproduce_the_layer(name: str) -> None:
    net = Net()
    seen = {}
    module = getattr(net, name)
    handle = module.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    net(_batches()[0])
    handle.remove()
    rows = layer_input_rows(module, seen["x"])
    w = module.weight.T if name == "gpt" else module.weight.reshape(module.weight.shape[0], -1)
    y = seen["y"]
    flat = y.reshape(-1, y.shape[-1]) if name in ("gpt", "fc") else y.flatten(2).transpose(1, 2)
    assert torch.allclose(rows @ w.T + module.bias, flat.reshape(rows.shape[0], -1), atol=1e-4)


def test_one_calibration_pass_for_every_layer_and_cached_results() -> None:
    net = Net()
    batches = _batches()
    quantizer = FormatQuantizer(net, calibration_batches=batches)
    formats = {
        "conv": "int3-g32-asym-gptq",
        "conv2": "int4-pc-sym-gptq",
        "gpt": "int3-pc-sym-gptq",
        "fc": "int4-g8-asym-gptq",
    }
    originals = {n: p.detach().clone() for n, p in net.named_parameters()}
    with formats_in_place(net, formats, quantizer) as q_net:
        assert q_net is net
        quantized = {n: getattr(net, n).weight.detach().clone() for n in formats}
    assert net.calls == len(batches)  # the Hessians of all four layers from one pass
    assert set(quantizer.hessians()) == {"conv", "conv2", "gpt", "fc"}
    for n, p in net.named_parameters():  # restored exactly
        assert torch.equal(p, originals[n])
    for n, fmt in formats.items():
        assert not torch.equal(quantized[n], getattr(net, n).weight)
        layer = model_layers(net)[n]
        assert quantizer.get(layer, fmt) is quantizer.get(layer, fmt)  # computed once
    assert len(quantizer) == 4 and net.calls == len(batches)
    # GPTQ beats RTN on the layer's own calibration inputs.
    layer = model_layers(net)["fc"]
    h = quantizer.hessians()["fc"].matrix().float()
    w = layer.weight.detach()
    for fmt in ("int3-pc-sym", "int4-g8-asym"):
        g = quantizer.get(layer, f"{fmt}-gptq") - w
        r = quantizer.get(layer, f"{fmt}-rtn") - w
        assert torch.trace(g @ h @ g.T) <= torch.trace(r @ h @ r.T)


def test_legacy_formats_are_todays_weights() -> None:
    net = Net()
    quantizer = FormatQuantizer(net)
    layer = model_layers(net)["gpt"]
    for bits in (2, 4, 8):
        expected = quantize_weight(layer.weight.detach(), bits, layer.out_axis)
        assert torch.equal(quantizer.get(layer, bits), expected)
        assert torch.equal(quantizer.get(layer, f"int{bits}-pc-sym-rtn"), expected)
        assert quantizer.get("gpt", bits) is quantizer.get(layer, bits)  # by name, the same
    with pytest.raises(ValueError, match="layer names layers the model lacks"):
        quantizer.get("nope", 4)


def test_fallbacks_are_reported() -> None:
    net = Net()
    quantizer = FormatQuantizer(net, calibration_batches=_batches())
    layers = model_layers(net, include_embeddings=True)
    with pytest.warns(FormatFallbackWarning, match="layer 'emb', format 'int4-g16-asym-gptq'"):
        q = quantizer.get(layers["emb"], "int4-g16-asym-gptq")
    assert torch.equal(q, fake_quantize(layers["emb"].weight, parse_format("int4-g16-asym-rtn")))
    # conv2's rows have 9 inputs: one group per row.
    with pytest.warns(FormatFallbackWarning, match="rows of 9 inputs are shorter than groups"):
        quantizer.get(layers["conv2"], "int4-g32-sym-rtn")
    assert set(quantizer.fallbacks) == {
        ("emb", "int4-g16-asym-gptq"),
        ("conv2", "int4-g32-sym-rtn"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to report for a supported layer
        quantizer.get(layers["fc"], "int4-g8-asym-gptq")


def test_gptq_without_calibration_and_other_errors() -> None:
    net = Net()
    quantizer = FormatQuantizer(net)
    with pytest.raises(ValueError, match="GPTQ formats need calibration_batches"):
        with formats_in_place(net, {"fc": "int4-pc-sym-gptq"}, quantizer):
            pass
    with pytest.raises(ValueError, match="quantizer was built on another model"):
        with formats_in_place(Net(), {"fc": 4}, quantizer):
            pass
    with pytest.raises(ValueError, match=r"formats\['fc'\]: format name 'int4'"):
        with formats_in_place(net, {"fc": "int4"}, quantizer):
            pass
    with pytest.raises(ValueError, match="formats names layers the model lacks"):
        with formats_in_place(net, {"nope": 4}, quantizer):
            pass
    with pytest.raises(ValueError, match="batches is empty"):
        collect_hessians(net, model_layers(net), [])


def test_a_changed_weight_is_quantized_again() -> None:
    net = Net()
    quantizer = FormatQuantizer(net)
    layer = model_layers(net)["fc"]
    first = quantizer.get(layer, "int3-g8-asym-rtn")
    with torch.no_grad():
        net.fc.weight.mul_(2.0)
    second = quantizer.get(layer, "int3-g8-asym-rtn")
    assert torch.equal(second, fake_quantize(net.fc.weight, parse_format("int3-g8-asym-rtn")))
    assert not torch.equal(first, second)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gptq_on_cuda_matches_the_cpu() -> None:
    net = Net()
    batches = _batches()
    formats = {"conv": "int3-g32-asym-gptq", "gpt": "int3-pc-sym-gptq", "fc": "int4-g8-asym-gptq"}
    on_cpu = FormatQuantizer(net, calibration_batches=batches)
    net_cuda = Net().cuda()
    net_cuda.load_state_dict(net.state_dict())
    on_cuda = FormatQuantizer(net_cuda, calibration_batches=[b.cuda() for b in batches])
    for name, fmt in formats.items():
        expected = on_cpu.get(name, fmt)
        got = on_cuda.get(name, fmt)
        assert got.device.type == "cuda"
        # Equal up to float rounding (a level may flip at a decision boundary), and as good.
        assert (got.cpu() != expected).float().mean() < 0.02
        layer = model_layers(net)[name]
        h = on_cpu.hessians()[name].matrix().float()
        w = as_rows(layer.weight, layer.out_axis)

        def error(q: torch.Tensor) -> float:
            d = as_rows(q, layer.out_axis) - w  # noqa: B023
            return float(torch.trace(d @ h @ d.T))  # noqa: B023

        assert error(got.cpu()) <= 1.01 * error(expected)
