"""ONNX export with integer weights (optuna_ctpe.deploy.onnx): onnxruntime runs the file and
matches the fake-quantized PyTorch model, MatMulNBits / DequantizeLinear hold each layer at its
container, the file is smaller than the float export, and bad arguments fail clearly."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest


torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx", reason="the ONNX export needs the deploy extra (onnx)")
ort = pytest.importorskip("onnxruntime", reason="the ONNX export needs the deploy extra")
pytest.importorskip("onnxscript", reason="the dynamo exporter needs the deploy extra")

import numpy as np  # noqa: E402
from onnx import TensorProto  # noqa: E402
from torch import nn  # noqa: E402

from optuna_ctpe import HessianSearchSpace  # noqa: E402
from optuna_ctpe.deploy._onnx_graph import integer_weight  # noqa: E402
from optuna_ctpe.deploy.onnx import export_onnx  # noqa: E402
from optuna_ctpe.nn.layers import model_layers  # noqa: E402
from optuna_ctpe.space.records import LayerSensitivity  # noqa: E402
from optuna_ctpe.space.records import QuantConfig  # noqa: E402
from optuna_ctpe.tasks import Task  # noqa: E402
from optuna_ctpe.tasks.digits import digits_task  # noqa: E402
from _quiet import quiet  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]

#: onnxruntime vs the fake-quantized PyTorch model, relative to the largest output: the weights
#: dequantize to the fake-quantized values to a float32 rounding step; sums run in another order.
RTOL = 1e-5
BITS = (2, 3, 4, 5, 6, 8, 12)
#: Bits -> MatMulNBits' container; bits -> DequantizeLinear's integer type at opset 21.
NBITS_CONTAINER = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 8: 8}
DQ_TYPE = {2: TensorProto.INT4, 3: TensorProto.INT4, 4: TensorProto.INT4, 5: TensorProto.INT8}
DQ_TYPE.update({6: TensorProto.INT8, 8: TensorProto.INT8, 12: TensorProto.INT16})


@pytest.fixture(scope="module")
def task() -> Task:
    return digits_task(seed=0)


@pytest.fixture(scope="module")
def digits_space(task: Task) -> HessianSearchSpace:
    return quiet(
        HessianSearchSpace.from_model,
        task.model,
        task.loss_fn,
        task.calibration_batches,
        bits=BITS,
        widths=(0.5, 0.75, 1.0),
        example_inputs=task.example_inputs,
        keep_first_last_bits=None,
        max_probes=10,
    )


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _relative(got: np.ndarray, expected: torch.Tensor) -> float:
    ref = expected.detach().numpy()
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_digits_mixed_bits_and_widths_run_in_onnxruntime(
    task: Task, digits_space: HessianSearchSpace, tmp_path: Path
) -> None:
    bits = {"conv1": 2, "conv2": 3, "conv3": 5, "fc1": 4, "fc2": 12}
    config = QuantConfig(bits, dict.fromkeys(digits_space.groups, 0.75))
    path = tmp_path / "digits.onnx"
    report = export_onnx(digits_space, task.model, config, path, task.example_inputs)

    # Another batch size than the traced one: the batch dimension is dynamic.
    x, y = task.validation_batches[0]
    (got,) = _session(path).run(None, {"x": x.numpy()})
    net = digits_space.apply(task.model, config, task.example_inputs)
    with torch.no_grad():
        expected = net(x)
    assert got.shape == (540, 10)
    assert _relative(got, expected) <= RTOL
    assert report.max_rel_diff is not None and report.max_rel_diff <= RTOL
    assert np.array_equal(got.argmax(1), expected.argmax(1).numpy())

    model = onnx.load(str(path))
    # fc1 (a Gemm at 4 bits) is a MatMulNBits; the convolutions and the 12-bit fc2 are read
    # through DequantizeLinear, each in its container.
    (matmul,) = _nodes(model, "MatMulNBits")
    attrs = _attrs(matmul)
    assert (attrs["bits"], attrs["N"], attrs["K"]) == (4, 48, 24 * 16)  # 0.75 of 64 and 32
    assert len(_nodes(model, "Gemm")) == 1  # fc2, reading its dequantized weight
    dq = _nodes(model, "DequantizeLinear")
    assert len(dq) == 4
    inits = {i.name: i for i in model.graph.initializer}
    types = sorted(inits[n.input[0]].data_type for n in dq)
    assert types == sorted(DQ_TYPE[bits[name]] for name in ("conv1", "conv2", "conv3", "fc2"))
    # Each integer takes its container's bits in the file: int4 two to a byte.
    for node in dq:
        tensor = inits[node.input[0]]
        width = {TensorProto.INT4: 4, TensorProto.INT8: 8, TensorProto.INT16: 16}
        assert len(tensor.raw_data) == -(-int(np.prod(tensor.dims)) * width[tensor.data_type] // 8)
    blob = inits[matmul.input[1]]
    n_blocks, block = blob.dims[1], attrs["block_size"]
    assert blob.data_type == TensorProto.UINT8 and tuple(blob.dims) == (48, n_blocks, block // 2)
    assert n_blocks * block - block < 24 * 16 <= n_blocks * block  # padding under one block
    assert {n: layer.operator for n, layer in report.layers.items()} == {
        "conv1": "DequantizeLinear",
        "conv2": "DequantizeLinear",
        "conv3": "DequantizeLinear",
        "fc1": "MatMulNBits",
        "fc2": "DequantizeLinear",
    }
    assert [report.layers[n].container_bits for n in bits] == [4, 4, 8, 4, 16]
    # No float initializer of a quantized weight's shape is left.
    shapes = {tuple(layer.weight.shape) for layer in model_layers(net).values()}
    floats = [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT]
    assert not [i.name for i in floats if tuple(i.dims) in shapes | {s[::-1] for s in shapes}]
    assert report.file_bytes == path.stat().st_size
    assert report.accounted_bytes == digits_space.size(config) / 8


def _bert() -> nn.Module:
    pytest.importorskip("transformers")
    from _tiny_hf import tiny_bert

    return tiny_bert().eval()


def test_tiny_bert_with_pruned_heads_runs_every_linear_as_matmulnbits(tmp_path: Path) -> None:
    model = _bert()
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids}

    def loss_fn(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return net(input_ids=batch[0], labels=batch[1]).loss

    space = quiet(
        HessianSearchSpace.from_model,
        model,
        loss_fn,
        [(ids, torch.tensor([0, 1, 2, 0]))],
        bits=(2, 3, 4, 6, 8),
        widths=(0.5, 1.0),
        example_inputs=inputs,
        keep_first_last_bits=None,
        max_probes=4,
    )
    cycle = (2, 3, 4, 6, 8)
    config = QuantConfig(
        {name: cycle[i % 5] for i, name in enumerate(space.sensitivities)},
        {g: (0.5, 1.0)[i % 2] for i, g in enumerate(space.groups)},
    )
    assert any(w < 1 for w in config.widths.values())
    path = tmp_path / "bert.onnx"
    report = export_onnx(space, model, config, path, inputs)

    other = torch.randint(0, 100, (7, 8), generator=torch.Generator().manual_seed(1))
    (got,) = _session(path).run(None, {"input_ids": other.numpy()})
    with torch.no_grad():
        expected = space.apply(model, config, inputs)(input_ids=other).logits
    assert _relative(got, expected) <= RTOL
    model_proto = onnx.load(str(path))
    nodes = _nodes(model_proto, "MatMulNBits")
    assert len(nodes) == len(config.bits) == 14
    assert Counter(_attrs(n)["bits"] for n in nodes) == Counter(
        NBITS_CONTAINER[b] for b in config.bits.values()
    )
    assert all(layer.operator == "MatMulNBits" for layer in report.layers.values())
    assert not _nodes(model_proto, "DequantizeLinear")


def _float_export(net: nn.Module, x: torch.Tensor, path: Path) -> int:
    torch.onnx.export(net, (x,), str(path), dynamo=True, verbose=False, external_data=False)
    return path.stat().st_size


def test_file_sizes_shrink_with_the_bits(
    task: Task, digits_space: HessianSearchSpace, tmp_path: Path
) -> None:
    float_bytes = _float_export(task.model.eval(), task.example_inputs, tmp_path / "f.onnx")
    sizes = {}
    for b in (8, 4, 2):
        report = export_onnx(
            digits_space,
            task.model,
            digits_space.uniform(b),
            tmp_path / f"u{b}.onnx",
            task.example_inputs,
            verify=False,
        )
        assert report.max_abs_diff is None
        sizes[b] = report.file_bytes
    assert sizes[2] < sizes[4] < sizes[8] < float_bytes / 3
    assert sizes[4] < float_bytes / 5


def test_opset_18_stores_every_dequantized_weight_in_int8(
    task: Task, digits_space: HessianSearchSpace, tmp_path: Path
) -> None:
    path = tmp_path / "o18.onnx"
    report = export_onnx(
        digits_space, task.model, digits_space.uniform(3), path, task.example_inputs, opset=18
    )
    model = onnx.load(str(path))
    assert {o.version for o in model.opset_import if o.domain == ""} == {18}
    inits = {i.name: i for i in model.graph.initializer}
    dq = _nodes(model, "DequantizeLinear")
    assert len(dq) == 3 and all(inits[n.input[0]].data_type == TensorProto.INT8 for n in dq)
    assert report.max_rel_diff is not None and report.max_rel_diff <= RTOL


class _Transposed(nn.Module):
    """ConvTranspose (output channels on axis 1), one grouped, then a Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.t1 = nn.ConvTranspose2d(3, 6, 3, stride=2)
        self.t2 = nn.ConvTranspose2d(6, 4, 3, groups=2)
        self.c = nn.Conv1d(4, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.t2(torch.relu(self.t1(x))).flatten(2))


class _Attention(nn.Module):
    """``nn.MultiheadAttention`` (a fused in_proj_weight parameter layer) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x)
        return self.head(out.mean(1))


class _Sliced(nn.Module):
    """A Linear whose forward reads only part of its weight: the graph never holds it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(x @ self.fc.weight[:4].T))


def _bits_space(model: nn.Module) -> HessianSearchSpace:
    """A bits-only space over every layer of ``model`` (the sensitivities do not matter)."""
    layers = [
        LayerSensitivity(name, 1.0, layer.weight.numel(), {b: 1.0 / b for b in BITS})
        for name, layer in model_layers(model).items()
    ]
    return HessianSearchSpace(layers, bits=BITS, widths=(1.0,), budget=1e9)


@pytest.mark.parametrize(
    ("make", "shape", "operator"),
    [
        (_Transposed, (2, 3, 5, 5), "DequantizeLinear"),
        (_Attention, (2, 7, 16), "MatMulNBits"),
    ],
)
def test_transposed_convolutions_and_fused_attention(
    make: type[nn.Module], shape: tuple[int, ...], operator: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    space = _bits_space(model)
    report = export_onnx(space, model, space.uniform(3), tmp_path / "m.onnx", x)
    assert {layer.operator for layer in report.layers.values()} == {operator}
    assert report.max_rel_diff is not None and report.max_rel_diff <= RTOL
    if make is _Transposed:
        dq = _nodes(onnx.load(str(tmp_path / "m.onnx")), "DequantizeLinear")
        assert sorted(_attrs(n)["axis"] for n in dq) == [0, 1, 1]


def test_a_weight_the_graph_slices_stays_float_with_a_warning(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = _Sliced().eval(), torch.randn(3, 8)
    space = _bits_space(model)
    with pytest.warns(UserWarning, match=r"layers \['fc'\] are not one weight initializer"):
        report = export_onnx(space, model, space.uniform(4), tmp_path / "s.onnx", x)
    assert report.layers["fc"].operator == "float"
    assert report.layers["fc"].container_bits == 32
    assert report.layers["head"].operator == "MatMulNBits"
    assert report.operators == {"float": 1, "MatMulNBits": 1}
    # The sliced weight keeps its fake-quantized values: the outputs still match.
    assert report.max_rel_diff is not None and report.max_rel_diff <= RTOL


def test_bad_arguments_are_named(
    task: Task, digits_space: HessianSearchSpace, tmp_path: Path
) -> None:
    config, x, path = digits_space.uniform(4), task.example_inputs, tmp_path / "x.onnx"
    with pytest.raises(ValueError, match=r"opset must be an integer in \[18, \d+\], got 17"):
        export_onnx(digits_space, task.model, config, path, x, opset=17)
    with pytest.raises(ValueError, match=r"accuracy_level must be an integer in \[0, 4\]"):
        export_onnx(digits_space, task.model, config, path, x, accuracy_level=5)
    with pytest.raises(ValueError, match="example_inputs is required"):
        export_onnx(digits_space, task.model, config, path, None)
    with pytest.raises(ValueError, match="path must be a str or os.PathLike, got 3"):
        export_onnx(digits_space, task.model, config, 3, x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="verify must be a bool"):
        export_onnx(digits_space, task.model, config, path, x, verify=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"config.bits must name exactly the layers"):
        export_onnx(digits_space, task.model, QuantConfig({"fc1": 4}), path, x)
    with pytest.raises(ValueError, match="the search space names layers the model lacks"):
        export_onnx(digits_space, nn.Sequential(), config, path, x)  # type: ignore[arg-type]
    half = digits_task(seed=0).model.half()
    with pytest.raises(ValueError, match=r"needs float32 weights; layer 'conv1' is torch.float16"):
        export_onnx(digits_space, half, config, path, x.half())
    assert not path.exists()


@pytest.mark.parametrize("bits", [2, 3, 8, 12])
def test_integer_weight_recovers_the_integers(bits: int) -> None:
    from optuna_ctpe.nn.quantize import quantize_weight

    torch.manual_seed(bits)
    weight = torch.randn(6, 5, 3)
    weight[:, 2] = 0  # an all-zero channel
    values = quantize_weight(weight, bits, axis=1).numpy()
    w = integer_weight("w", values, bits, axis=1)
    qmax = 2 ** (bits - 1) - 1
    assert w.q.shape == values.shape and w.scale.shape == (5,)
    assert np.abs(w.q).max() == qmax
    rebuilt = w.q * w.scale[None, :, None]
    np.testing.assert_allclose(rebuilt, values, rtol=2e-7, atol=0)
    # Integers, not floats rounded twice: the step between two levels is one scale.
    assert np.array_equal(np.rint(values / w.scale[None, :, None]), w.q)
