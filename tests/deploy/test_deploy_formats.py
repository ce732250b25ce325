"""Weight formats in the deploy wing: the packed file of every format (its tensor bytes the
accounted size, reloaded bit for bit), files of 0.1.x loading unchanged, ONNX with MatMulNBits
blocks and blocked DequantizeLinear, and torchao's per-group and asymmetric configs."""

from __future__ import annotations

from pathlib import Path

import pytest


torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
safetensors_torch = pytest.importorskip("safetensors.torch")

from optuna_ctpe.deploy import load_packed  # noqa: E402
from optuna_ctpe.deploy import read_packed_metadata  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).parent.parent / "fixtures"


def _fixture_model() -> torch.nn.Module:
    """The architecture of ``tests/fixtures/make_packed_v1.py``."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 6)
    )


def test_a_packed_file_of_0_1_loads_bit_for_bit() -> None:
    expected = safetensors_torch.load_file(str(FIXTURES / "packed_v1_expected.safetensors"))
    document = read_packed_metadata(FIXTURES / "packed_v1.safetensors")
    assert document["version"] == 1 and document["config"]["bits"] == {"0": 3, "3": 5}
    net = load_packed(FIXTURES / "packed_v1.safetensors", _fixture_model())
    state = net.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype
        assert torch.equal(state[name].view(torch.int32), tensor.view(torch.int32)), name
    # The weights really are on 3- and 5-bit grids (the fixture is not a float model).
    assert len(torch.unique(state["0.weight"][0])) <= 7
    assert len(torch.unique(state["3.weight"][0])) <= 31


# -- packed files of every format ----------------------------------------------------------------

from optuna_ctpe.deploy import save_packed_formats  # noqa: E402
from optuna_ctpe.deploy.packing import packed_nbytes  # noqa: E402
from optuna_ctpe.nn.formats import FormatQuantizer  # noqa: E402
from optuna_ctpe.nn.formats import formats_in_place  # noqa: E402
from optuna_ctpe.space.formats import format_bits  # noqa: E402
from optuna_ctpe.space.formats import FormatFallbackWarning  # noqa: E402
from optuna_ctpe.space.formats import parse_format  # noqa: E402


class _Net(torch.nn.Module):
    """A conv (rows of 2 × 3 × 3 = 18 inputs), a linear layer (rows of 48) and a tied pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 6, 3, padding=1)
        self.fc = torch.nn.Linear(96, 48)
        self.out = torch.nn.Linear(48, 5)
        self.norm = torch.nn.BatchNorm1d(48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean((2, 3)).repeat(1, 16)
        return self.out(torch.relu(self.norm(self.fc(h))))


FORMATS = [
    f"int{bits}-{granularity}-{grid}-{rounding}"
    for bits in (2, 3, 4, 8)
    for granularity in ("pc", "g16", "g32")
    for grid in ("sym", "fullsym", "asym")
    for rounding in ("rtn", "gptq")
    if not (bits == 8 and granularity == "g32")  # keep the grid of cases small
] + ["int5-g64-asym-gptq", "int6-g24-sym-rtn", "int7-pc-fullsym-gptq", "fp16", "fp32"]


@pytest.fixture(scope="module")
def net_and_quantizer() -> tuple[torch.nn.Module, FormatQuantizer, torch.Tensor]:
    torch.manual_seed(0)
    net = _Net().eval()
    net.norm.running_mean.normal_()
    batches = [torch.randn(8, 2, 4, 4) for _ in range(3)]
    return net, FormatQuantizer(net, calibration_batches=batches), batches[0]


def _bits_of_tensors(path: Path) -> dict[str, int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_is_stored_at_its_accounted_size_and_reloads_bit_for_bit(
    name: str,
    net_and_quantizer,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    net, quantizer, x = net_and_quantizer
    fmt = parse_format(name)
    formats = {"conv": name, "fc": name, "out": "int4-g16-asym-gptq"}
    falls_back = fmt.group_size is not None and fmt.group_size > 18  # the conv's rows
    with pytest.warns(FormatFallbackWarning) if falls_back else _no_warning():
        packed = save_packed_formats(net, formats, quantizer, tmp_path / "net.safetensors")
    with formats_in_place(net, formats, quantizer) as fake:
        expected = {k: v.clone() for k, v in fake.state_dict().items()}
        expected_out = fake(x)
    loaded = load_packed(tmp_path / "net.safetensors", _Net())
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        got, want = state[key].reshape(-1), tensor.reshape(-1)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), key
    assert torch.equal(loaded(x), expected_out)
    # Tensor bytes: each format's codes, scales and zero points at their accounted bits.
    stored = _bits_of_tensors(packed.path)
    for layer, shape in (("conv", (6, 18)), ("fc", (48, 96))):
        f = parse_format(formats[layer])
        if not f.quantized:
            assert stored[f"float/{layer}.weight"] * 8 == format_bits(f, *shape)
            continue
        groups = 1 if f.group_size is None else -(-shape[1] // f.group_size)
        assert stored[f"packed/{layer}.weight"] == packed_nbytes(shape[0] * shape[1], f.bits)
        assert stored[f"scales/{layer}.weight"] * 8 == shape[0] * groups * f.scale_bits
        zeros = stored.get(f"zeros/{layer}.weight", 0)
        assert zeros == (packed_nbytes(shape[0] * groups, f.bits) if f.zero_bits else 0)
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    padding = packed.payload_bytes - buffers - packed.accounted_bytes
    assert 0 <= padding < 3 * 3  # under a byte per packed tensor (codes, zero points)
    accounted = sum(
        format_bits(parse_format(formats[n]), *s)
        for n, s in (("conv", (6, 18)), ("fc", (48, 96)), ("out", (5, 48)))
    )
    floats = 32 * sum(p.numel() for n, p in net.named_parameters() if not n.endswith("weight"))
    floats += 32 * net.norm.weight.numel()
    assert packed.accounted_bytes * 8 == accounted + floats
    assert read_packed_metadata(packed.path)["formats"] == formats


class _no_warning:
    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", FormatFallbackWarning)

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)


# -- ONNX ----------------------------------------------------------------------------------------

ONNX_FORMATS = [
    "int4-pc-sym-rtn",
    "int4-pc-asym-gptq",
    "int2-g16-asym-rtn",
    "int2-g64-sym-gptq",
    "int3-g16-fullsym-gptq",
    "int3-g32-asym-rtn",
    "int4-g32-asym-gptq",
    "int4-g64-sym-rtn",
    "int5-g32-fullsym-rtn",
    "int6-g16-asym-gptq",
    "int8-g32-asym-rtn",
    "int8-pc-fullsym-gptq",
    "int5-g24-asym-rtn",  # no power-of-two block divides 24: DequantizeLinear
    "int12-g16-asym-rtn",  # wider than MatMulNBits' 8 bits: DequantizeLinear, uint16
]


class _OnnxNet(torch.nn.Module):
    """A conv (rows of 4 × 3 × 3 = 36 inputs: groups of 16 and 32 end short) and two linear
    layers (rows of 128 and 64)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.fc = torch.nn.Linear(128, 64)
        self.out = torch.nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean((2, 3)).repeat(1, 16)
        return self.out(torch.relu(self.fc(h)))


@pytest.fixture(scope="module")
def onnx_net() -> tuple[torch.nn.Module, FormatQuantizer, torch.Tensor]:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(1)
    net = _OnnxNet().eval()
    batches = [torch.randn(8, 4, 5, 5) for _ in range(3)]
    return net, FormatQuantizer(net, calibration_batches=batches), batches[0]


@pytest.mark.parametrize("name", ONNX_FORMATS)
def test_onnx_of_every_format_matches_the_fake_quantized_model(
    name: str,
    onnx_net,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    import warnings

    import onnx
    from onnx import helper

    from optuna_ctpe.deploy.onnx import export_onnx_formats

    net, quantizer, x = onnx_net
    fmt = parse_format(name)
    formats = {"conv": name, "fc": name, "out": name}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FormatFallbackWarning)
        report = export_onnx_formats(net, formats, quantizer, tmp_path / "net.onnx", x)
    assert report.max_rel_diff is not None and report.max_rel_diff <= 1e-5
    assert report.layers["conv"].operator == "DequantizeLinear"
    model = onnx.load(str(tmp_path / "net.onnx"))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    blocked = fmt.group_size is not None and fmt.group_size % 16 == 0
    if fmt.bits <= 8 and (fmt.group_size is None or blocked):
        assert report.operators == {"DequantizeLinear": 1, "MatMulNBits": 2}
        assert len(nbits) == 2
        for node in nbits:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if fmt.group_size is not None and fmt.group_size < attrs["K"]:
                assert attrs["block_size"] == fmt.group_size
            # Zero points (input 3) where asymmetric, the default otherwise.
            has_zero = len(node.input) > 3 and node.input[3] != ""
            assert has_zero == (fmt.grid == "asym")
    else:
        assert report.operators == {"DequantizeLinear": 3} and not nbits
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    for node in dq:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        row = 36 if node.name.startswith("conv") else 128 if node.name.startswith("fc") else 64
        if fmt.group_size is not None and fmt.group_size < row:
            assert attrs.get("block_size") == fmt.group_size
        else:  # per channel, or one group per row (a group longer than the row)
            assert "block_size" not in attrs
        assert (len(node.input) > 2) == (fmt.grid == "asym")


def test_onnx_before_opset_21_stores_groups_as_rows_and_says_so(
    onnx_net,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    import onnx

    from optuna_ctpe.deploy.onnx import export_onnx_formats

    net, quantizer, x = onnx_net
    formats = {"conv": "int4-g16-asym-gptq", "fc": "int3-g24-sym-rtn", "out": "int4-pc-asym-rtn"}
    with pytest.warns(UserWarning, match=r"\['conv', 'fc'\] have groups.*opset 18"):
        report = export_onnx_formats(net, formats, quantizer, tmp_path / "n.onnx", x, opset=18)
    assert report.max_rel_diff is not None and report.max_rel_diff <= 1e-5
    model = onnx.load(str(tmp_path / "n.onnx"))
    assert not any(
        a.name == "block_size"
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        for a in n.attribute
    )


# -- torchao -------------------------------------------------------------------------------------

TORCHAO_FORMATS = [
    "int2-g16-asym-gptq",
    "int3-pc-sym-rtn",
    "int4-g32-asym-rtn",
    "int4-g16-fullsym-gptq",
    "int5-pc-asym-gptq",
    "int8-g32-sym-rtn",
    "int4-g128-asym-rtn",  # longer than the rows of 96: one group per row
]


@pytest.mark.parametrize("name", TORCHAO_FORMATS)
def test_torchao_tensors_hold_the_codes_bit_for_bit(
    name: str,
    net_and_quantizer,  # type: ignore[no-untyped-def]
) -> None:
    import warnings

    pytest.importorskip("torchao")
    from optuna_ctpe.deploy.torchao import quantize_with_torchao_formats

    net, quantizer, x = net_and_quantizer
    formats = {"conv": "int4-pc-asym-rtn", "fc": name, "out": "int4-g16-asym-gptq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FormatFallbackWarning)
        with pytest.warns(UserWarning, match=r"'conv' \(Conv2d, int4-pc-asym-rtn\)"):
            tao = quantize_with_torchao_formats(net, formats, quantizer)
        with formats_in_place(net, formats, quantizer) as fake:
            expected = fake(x)
            fake_weights = {n: getattr(fake, n).weight.detach().clone() for n in formats}
    assert type(tao.fc.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(tao.out.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(tao.conv.weight) is torch.nn.Parameter and torch.equal(
        tao.conv.weight, fake_weights["conv"]
    )
    for layer in ("fc", "out"):
        assert torch.equal(getattr(tao, layer).weight.dequantize(), fake_weights[layer])
    with torch.no_grad():
        assert torch.allclose(tao(x), expected, rtol=1e-5, atol=1e-6)
    assert type(net.fc.weight) is torch.nn.Parameter  # the model is left alone


def test_torchao_refuses_what_it_cannot_hold(
    net_and_quantizer,  # type: ignore[no-untyped-def]
) -> None:
    pytest.importorskip("torchao")
    from optuna_ctpe.deploy.torchao import quantize_with_torchao_formats
    from optuna_ctpe.deploy.torchao import torchao_format_config

    net, quantizer, _ = net_and_quantizer
    with pytest.raises(ValueError, match=r"layer 'fc', format 'int12-pc-sym-rtn'.*at most 8"):
        quantize_with_torchao_formats(net, {"fc": "int12-pc-sym-rtn"}, quantizer)
    with pytest.raises(ValueError, match=r"layer 'fc', format 'int4-g64-asym-rtn'.*96 inputs"):
        quantize_with_torchao_formats(net, {"fc": "int4-g64-asym-rtn"}, quantizer)
    with pytest.raises(ValueError, match=r"layer 'out', format 'int4-g16-asym-gptq'.*GPTQ"):
        torchao_format_config(net, {"out": "int4-g16-asym-gptq"})
    with pytest.raises(ValueError, match=r"layer 'out', format 'int4-pc-sym-rtn'.*q_max"):
        torchao_format_config(net, {"out": "int4-pc-sym-rtn"})


@pytest.mark.parametrize("name", ["int4-g32-asym-rtn", "int3-pc-fullsym-rtn", "int8-g16-asym-rtn"])
def test_torchao_configs_are_the_same_grids(name: str) -> None:
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    from optuna_ctpe.deploy.torchao import torchao_format_config
    from optuna_ctpe.nn.grids import fake_quantize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16))
    original = model[0].weight.detach().clone()
    fmt = parse_format(name)
    quantize_(model, torchao_format_config(model, {"0": name}), filter_fn=None)
    ours = fake_quantize(original, fmt)
    theirs = model[0].weight.dequantize()
    step = (original.amax() - original.amin()) / (2**fmt.bits - 1)
    # The same grid up to the scales' precision (float32 there, float16 per group here): values
    # far under a step apart, but for a few that a scale's last bit rounds to the next level;
    # another grid would put most values elsewhere.
    diff = (theirs - ours).abs()
    # A value (q - z) s moves by (q - z) ds: under 2^-10 of itself for a float16 scale.
    assert (diff > 2.0**-10 * ours.abs() + 1e-7).float().mean() < 0.02
    assert diff.max() <= 1.01 * step
