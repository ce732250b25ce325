"""Latency on onnxruntime (optuna_ctpe.deploy.latency, .latency_table): the timing helper, the
one-layer graphs (they compute what the torch layer computes, with the operators export_onnx
uses), the lookup table (additive, JSON round trip, version check, bad inputs named), whole-model
timing with its cache, and the CLI settings of old studies."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest


torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx", reason="latency timing needs the deploy extra (onnx)")
ort = pytest.importorskip("onnxruntime", reason="latency timing needs the deploy extra")
pytest.importorskip("onnxscript", reason="the dynamo exporter needs the deploy extra")

import numpy as np  # noqa: E402
from torch import nn  # noqa: E402

from optuna_ctpe import HessianSearchSpace  # noqa: E402
from optuna_ctpe.cli.options import UsageError  # noqa: E402
from optuna_ctpe.cli.settings import resolve  # noqa: E402
from optuna_ctpe.cli.settings import Settings  # noqa: E402
from optuna_ctpe.deploy._layer_graph import float_graph  # noqa: E402
from optuna_ctpe.deploy._layer_graph import layer_cells  # noqa: E402
from optuna_ctpe.deploy._layer_graph import quantized_graph  # noqa: E402
from optuna_ctpe.deploy.latency import batched_inputs  # noqa: E402
from optuna_ctpe.deploy.latency import ModelTimer  # noqa: E402
from optuna_ctpe.deploy.latency import OrtRuntime  # noqa: E402
from optuna_ctpe.deploy.latency import time_calls  # noqa: E402
from optuna_ctpe.deploy.latency_meter import LatencyMeter  # noqa: E402
from optuna_ctpe.deploy.latency_meter import missing_packages  # noqa: E402
from optuna_ctpe.deploy.latency_meter import runtime_named  # noqa: E402
from optuna_ctpe.deploy.latency_table import LatencyTable  # noqa: E402
from optuna_ctpe.deploy.latency_table import LayerLatency  # noqa: E402
from optuna_ctpe.deploy.latency_table import measure_latency_table  # noqa: E402
from optuna_ctpe.space.records import QuantConfig  # noqa: E402
from optuna_ctpe.space.size import FLOAT_BITS  # noqa: E402
from optuna_ctpe.tasks import Task  # noqa: E402
from optuna_ctpe.tasks.digits import digits_task  # noqa: E402
from _quiet import quiet  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]

#: Few runs: the tests check structure and sanity, never speed.
REPEATS = 20


@pytest.fixture(scope="module")
def task() -> Task:
    return digits_task(seed=0)


@pytest.fixture(scope="module")
def space(task: Task) -> HessianSearchSpace:
    return quiet(
        HessianSearchSpace.from_model,
        task.model,
        task.loss_fn,
        task.calibration_batches,
        bits=(2, 3, 4, 8),
        widths=(0.5, 1.0),
        example_inputs=task.example_inputs,
        max_probes=4,
    )


@pytest.fixture(scope="module")
def table(task: Task, space: HessianSearchSpace) -> LatencyTable:
    return measure_latency_table(
        space, task.model, task.example_inputs, batch=2, repeats=REPEATS, warmup=2
    )


# -- timing --------------------------------------------------------------------------------------


def test_time_calls_returns_ordered_quartiles_of_every_run() -> None:
    counts = [0, 0]

    def call(i: int) -> None:
        counts[i] += 1
        sum(range(200 * (i + 1)))

    timings = time_calls([lambda: call(0), lambda: call(1)], repeats=25, warmup=3, rounds=4)
    assert counts == [28, 28]  # warm-up plus every timed run, the odd runs in the first rounds
    for timing in timings:
        assert timing.n_runs == 25
        assert 0 < timing.q1_ms <= timing.median_ms <= timing.q3_ms
        assert math.isfinite(timing.noise) and timing.noise >= 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"repeats": 0}, "repeats must be a positive integer, got 0"),
        ({"warmup": -1}, "warmup must be a non-negative integer, got -1"),
        ({"repeats": 5, "rounds": 6}, r"rounds must be an integer in \[1, 5\], got 6"),
    ],
)
def test_time_calls_names_bad_arguments(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        time_calls([lambda: None], **kwargs)


def test_runtime_records_its_threads_and_refuses_bad_ones() -> None:
    described = OrtRuntime(intra_op_threads=2).describe()
    assert described["intra_op_threads"] == 2 and described["inter_op_threads"] == 1
    assert described["onnxruntime"] == ort.__version__
    assert described["runtime"] == "onnxruntime-cpu"
    assert OrtRuntime(fold_dequantize=True).name == "onnxruntime-cpu-folded"
    with pytest.raises(ValueError, match="intra_op_threads must be a positive integer, got 0"):
        OrtRuntime(intra_op_threads=0)
    with pytest.raises(ValueError, match="fold_dequantize must be a bool"):
        OrtRuntime(fold_dequantize=1)  # type: ignore[arg-type]


def test_batched_inputs_repeat_rows() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    got = batched_inputs({"x": x, "n": 3}, 5)
    assert got["n"] == 3
    assert torch.equal(got["x"], x[[0, 1, 0, 1, 0]])
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        batched_inputs(x, 0)


# -- one-layer graphs ----------------------------------------------------------------------------


class _Mixed(nn.Module):
    """Each kind of one-layer graph: Conv1d with 'same' padding and a dilation, a transposed
    convolution, a Linear on a matrix (Gemm) and one on a 3-D tensor (MatMul + Add)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding="same", dilation=2)
        self.up = nn.ConvTranspose1d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.seq = nn.Linear(4, 8)
        self.head = nn.Linear(8 * 20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(torch.relu(self.conv(x)))  # (N, 4, 20)
        y = self.seq(y.transpose(1, 2))  # (N, 20, 8): a Linear on a 3-D input
        return self.head(torch.flatten(y, 1))


def test_one_layer_graphs_compute_what_the_layer_computes() -> None:
    torch.manual_seed(0)
    model = _Mixed().eval()
    x = torch.randn(3, 4, 10)
    space = quiet(
        HessianSearchSpace.from_model,
        model,
        lambda m, b: m(b[0]).square().mean(),
        [(x,)],
        bits=(4, 8),
        widths=(1.0,),
        example_inputs=x,
        max_probes=2,
    )
    cells = {c.layer: c for c in layer_cells(space.spec, model, x)}
    assert set(cells) == {"conv", "up", "seq", "head"}
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: object) -> None:
            inputs[name] = args[0]

        return hook

    hooks = [getattr(model, n).register_forward_hook(keep(n)) for n in cells]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for name, cell in cells.items():
        assert cell.input_shape == tuple(inputs[name].shape)
        session = ort.InferenceSession(float_graph(cell, 21).SerializeToString())
        (got,) = session.run(None, {"x": inputs[name].numpy()})
        with torch.no_grad():
            expected = getattr(model, name)(inputs[name]).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        graph, storage = quantized_graph(cell, 4, 21)
        ops = {n.op_type for n in graph.graph.node}
        # As export_onnx stores them: matrix products in MatMulNBits, the rest dequantized.
        expected_op = "MatMulNBits" if name in ("seq", "head") else "DequantizeLinear"
        assert storage[0] == expected_op and expected_op in ops
        (low,) = ort.InferenceSession(graph.SerializeToString()).run(
            None, {"x": inputs[name].numpy()}
        )
        assert low.shape == expected.shape and np.isfinite(low).all()


def test_unsupported_layers_are_named() -> None:
    class _Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    model = _Attention().eval()
    x = torch.randn(2, 5, 8)
    space = quiet(
        HessianSearchSpace.from_model,
        model,
        lambda m, b: m(b[0]).square().mean(),
        [(x,)],
        bits=(4, 8),
        widths=(1.0,),
        example_inputs=x,
        max_probes=2,
    )
    with pytest.raises(ValueError, match=r"in_proj_weight.*no one-layer latency graph"):
        layer_cells(space.spec, model, x)


# -- the lookup table ----------------------------------------------------------------------------


def test_table_covers_every_choice_and_records_its_runtime(
    table: LatencyTable, space: HessianSearchSpace
) -> None:
    assert set(table.layers) == set(space.sensitivities)
    assert table.batch == 2
    assert table.runtime["intra_op_threads"] == 1 and table.runtime["inter_op_threads"] == 1
    assert table.runtime["onnxruntime"] == ort.__version__
    assert table.fp32_ms > 0 and table.remainder_ms >= 0 and math.isfinite(table.noise)
    for name, layer in table.layers.items():
        bits = {*space.bits, 8, FLOAT_BITS, space.fixed_bits.get(name, 8)}
        n_ratios = len(space.widths) ** len(layer.groups)
        assert len(layer.ms) == len(bits) * n_ratios
        assert all(math.isfinite(ms) and ms >= 0 for ms in layer.ms.values())
    # fc1 is a Gemm: MatMulNBits stores 3 bits in its 4-bit container, one graph for both.
    fc1 = table.layers["fc1"]
    ones = (1.0,) * len(fc1.groups)
    assert fc1.ms[(3, ones)] == fc1.ms[(4, ones)]


def test_prediction_is_the_remainder_plus_each_layers_entry(
    table: LatencyTable, space: HessianSearchSpace
) -> None:
    config = QuantConfig(
        {n: space.fixed_bits.get(n, b) for n, b in zip(space.sensitivities, (2, 3, 4, 8, 2))},
        dict.fromkeys(space.groups, 0.5),
    )
    expected = table.remainder_ms + sum(
        layer.ms[(config.bits[n], tuple(config.widths[g] for g in layer.groups))]
        for n, layer in table.layers.items()
    )
    assert table.predict(config) == pytest.approx(expected)
    assert table.predict(space.uniform(8)) > 0


def test_table_json_round_trip_and_version_check(table: LatencyTable) -> None:
    text = table.to_json()
    assert LatencyTable.from_json(text) == table
    data = json.loads(text)
    data["version"] = 99
    with pytest.raises(ValueError, match="latency table version 99 is not supported"):
        LatencyTable.from_json(json.dumps(data))
    with pytest.raises(ValueError, match="not a latency table"):
        LatencyTable.from_json(json.dumps({"version": 1}))
    with pytest.raises(ValueError, match="must be JSON text"):
        LatencyTable.from_json("{")
    data = json.loads(text)
    del data["remainder_ms"]
    with pytest.raises(ValueError, match="lacks or garbles the field 'remainder_ms'"):
        LatencyTable.from_json(json.dumps(data))


def _toy_table() -> LatencyTable:
    entries = {(b, (r,)): b * r for b in (4, 8, 32) for r in (0.5, 1.0)}
    layers = {
        "a": LayerLatency("a", ("g",), entries),
        "b": LayerLatency("b", (), {(4, ()): 1.0, (8, ()): 3.0, (32, ()): 2.0}),
    }
    return LatencyTable(layers, remainder_ms=0.5, fp32_ms=34.5, batch=1, runtime={}, noise=0.1)


def test_prediction_is_additive_and_follows_its_entries() -> None:
    table = _toy_table()
    base = table.predict(QuantConfig({"a": 4, "b": 4}, {"g": 0.5}))
    assert base == 0.5 + 2.0 + 1.0
    # Changing one layer changes the prediction by its entries' difference, nothing else.
    assert table.predict(QuantConfig({"a": 8, "b": 4}, {"g": 0.5})) - base == 2.0
    assert table.predict(QuantConfig({"a": 4, "b": 8}, {"g": 0.5})) - base == 2.0
    # Monotone where the entries are: wider is slower for "a".
    assert table.predict(QuantConfig({"a": 4, "b": 4}, {"g": 1.0})) > base


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ("a=4", "config must be a QuantConfig"),
        (QuantConfig({"a": 4}, {"g": 1.0}), r"must name exactly the table's layers \['a', 'b'\]"),
        (QuantConfig({"a": 4, "b": 4}, {}), r"config.widths lacks the width groups \['g'\]"),
        (QuantConfig({"a": 5, "b": 4}, {"g": 1.0}), "no entry for layer 'a' at bits 5"),
        (QuantConfig({"a": 4, "b": 4}, {"g": 0.75}), r"widths \{'g': 0.75\}"),
    ],
)
def test_prediction_names_what_the_table_lacks(config: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _toy_table().predict(config)  # type: ignore[arg-type]


def test_table_records_are_validated() -> None:
    with pytest.raises(ValueError, match="needs one ratio per group"):
        LayerLatency("a", ("g",), {(4, ()): 1.0})
    with pytest.raises(ValueError, match=r"entry \(4, \(\)\) of layer 'a' must be"):
        LayerLatency("a", (), {(4, ()): -1.0})
    with pytest.raises(ValueError, match=r"layers\['x'\] must be the LayerLatency of 'x'"):
        LatencyTable({"x": LayerLatency("a", (), {})}, 0.0, 0.0, 1, {}, 0.0)
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        LatencyTable({}, 0.0, 0.0, 0, {}, 0.0)


# -- whole-model timing --------------------------------------------------------------------------


def test_model_timer_caches_by_configuration(task: Task, space: HessianSearchSpace) -> None:
    timer = ModelTimer(space, task.model, task.example_inputs, repeats=REPEATS, warmup=2)
    config = space.uniform(4)
    first = timer(config)
    assert first.n_runs == REPEATS and 0 < first.median_ms < math.inf
    # An equal configuration (a new object) is the cached measurement, not a second export.
    assert timer(QuantConfig(dict(config.bits), dict(config.widths))) is first
    assert timer.fp32().median_ms > 0
    with pytest.raises(ValueError, match="config must be a QuantConfig"):
        timer({"fc1": 4})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        ModelTimer(space, task.model, task.example_inputs, batch=0)


def test_latency_meter_reads_its_table_without_timing(
    task: Task, space: HessianSearchSpace
) -> None:
    table = dataclasses.replace(_toy_table(), runtime={"runtime": "r"})
    meter = LatencyMeter(space.spec, task.model, task.example_inputs, table=table)
    config = QuantConfig({"a": 4, "b": 8}, {"g": 0.5})
    assert meter(config) == table.predict(config) and meter.fp32() == table.fp32_ms
    assert (meter.source, meter.runtime_name) == ("table", "r")
    assert isinstance(meter.runtime, OrtRuntime)


def test_latency_meter_times_whole_models_without_a_table(
    task: Task, space: HessianSearchSpace
) -> None:
    meter = LatencyMeter(space, task.model, task.example_inputs, batch=2)
    assert (meter.source, meter.runtime_name) == ("measured", "onnxruntime-cpu")
    assert meter(space.uniform(4)) > 0 and meter.fp32() > 0


def test_latency_meter_names_bad_arguments(task: Task, space: HessianSearchSpace) -> None:
    with pytest.raises(ValueError, match="runtime must be one of"):
        LatencyMeter(space, task.model, task.example_inputs, runtime="tvm")
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        LatencyMeter(space, task.model, task.example_inputs, batch=0)
    with pytest.raises(TypeError, match="space must be a HessianSearchSpace or a SpaceSpec"):
        LatencyMeter(object(), task.model, task.example_inputs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="runtime must be one of"):
        missing_packages("tvm")
    # The deploy extra is installed where these tests run.
    assert missing_packages("onnxruntime") == ("ONNX models", [])
    assert isinstance(runtime_named("onnxruntime"), OrtRuntime)


# -- settings of studies created before the latency objectives -----------------------------------


OLD_SETTINGS = {
    "task": "optuna_ctpe.tasks.digits:digits_task",
    "seed": 0,
    "objective": "budget",
    "size_budget": 0.125,
    "bits": [2, 3, 4, 6, 8],
    "widths": [0.5, 0.75, 1.0],
    "hessian_pruning": True,
    "finetune_epochs": 0,
}


def _requested(**given: object) -> dict[str, object]:
    return {f: given.get(f) for f in Settings.__dataclass_fields__}


def test_settings_of_old_studies_load_and_resume_unchanged() -> None:
    settings = Settings.from_attr(OLD_SETTINGS)
    assert (settings.latency_budget_ms, settings.latency_source, settings.latency_batch) == (
        None,
        None,
        None,
    )
    assert not settings.has_latency and settings.directions == ["maximize"]
    assert resolve(_requested(), OLD_SETTINGS, "old", lambda s: None) == settings
    with pytest.raises(UsageError, match="created with no --latency-source"):
        resolve(_requested(latency_source="table"), OLD_SETTINGS, "old", lambda s: None)


def test_latency_settings_resolve_with_defaults_and_round_trip() -> None:
    settings = resolve(_requested(objective="pareto-latency"), None, "new", lambda s: None)
    assert (settings.latency_source, settings.latency_batch) == ("table", 1)
    assert settings.directions == ["maximize", "minimize", "minimize"]
    assert settings.metric_names == ["accuracy", "latency_ms", "size_kb"]
    assert Settings.from_attr(json.loads(json.dumps(settings.to_attr()))) == settings
    budget = resolve(
        _requested(objective="latency-budget", latency_budget_ms=2.5, latency_batch=8),
        None,
        "new",
        lambda s: None,
    )
    assert budget.has_latency and budget.directions == ["maximize"]
    assert (budget.latency_budget_ms, budget.latency_batch) == (2.5, 8)


@pytest.mark.parametrize(
    ("given", "match"),
    [
        ({"objective": "latency-budget"}, "--objective latency-budget needs --latency-budget MS"),
        (
            {"latency_budget_ms": 1.0},
            "--latency-budget applies to --objective latency-budget or pareto-latency only",
        ),
        (
            {"objective": "pareto-latency", "latency_budget_ms": 1.0},
            "--latency-budget applies to --objective latency-budget only",
        ),
        ({"objective": "budget", "latency_batch": 4}, "--latency-batch applies to"),
        (
            {"objective": "pareto-latency", "size_budget": 0.25},
            "--size-budget applies to --objective budget only",
        ),
    ],
)
def test_latency_settings_refuse_contradictions(given: dict[str, object], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        resolve(_requested(**given), None, "new", lambda s: None)
