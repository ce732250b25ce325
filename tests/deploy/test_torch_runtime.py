"""The torch / torchao latency runtime (optuna_ctpe.deploy.torch_runtime): what it records, what
it times (torchao's model of a configuration, on the CPU here and on CUDA where there is a GPU),
whole-model timing with it, and ``--latency-runtime`` in the CLI's settings and searches.

No test asserts a speed: the machines are shared, and only sanity and structure are checked."""

from __future__ import annotations

import math
import os
from pathlib import Path
import subprocess
import sys
import warnings

import pytest


torch = pytest.importorskip("torch")
pytest.importorskip("torchao", reason="the torch runtime needs the deploy extra (torchao)")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from torch import nn  # noqa: E402

from optuna_ctpe import _attrs  # noqa: E402
from optuna_ctpe import HessianSearchSpace  # noqa: E402
from optuna_ctpe.cli.objective import check_latency_extra  # noqa: E402
from optuna_ctpe.cli.objective import latency_meter  # noqa: E402
from optuna_ctpe.cli.options import UsageError  # noqa: E402
from optuna_ctpe.cli.root import build_parser  # noqa: E402
from optuna_ctpe.cli.settings import resolve  # noqa: E402
from optuna_ctpe.cli.settings import Settings  # noqa: E402
from optuna_ctpe.deploy.latency import batched_inputs  # noqa: E402
from optuna_ctpe.deploy.latency import ModelTimer  # noqa: E402
from optuna_ctpe.deploy.torch_runtime import TorchRuntime  # noqa: E402
from optuna_ctpe.space.records import QuantConfig  # noqa: E402
from optuna_ctpe.tasks import Task  # noqa: E402
from optuna_ctpe.tasks.digits import digits_task  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]

#: Few runs: the tests check structure and sanity, never speed.
REPEATS = 10
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def task() -> Task:
    return digits_task(seed=0)


@pytest.fixture(scope="module")
def space(task: Task) -> HessianSearchSpace:
    with warnings.catch_warnings():
        # Hutchinson's negative-trace warnings of a few probes.
        warnings.filterwarnings("ignore", message=".*trace of layer.*is negative")
        return HessianSearchSpace.from_model(
            task.model,
            task.loss_fn,
            task.calibration_batches,
            bits=(2, 4, 8),
            widths=(0.5, 1.0),
            example_inputs=task.example_inputs,
            max_probes=2,
        )


def _mixed(space: HessianSearchSpace) -> QuantConfig:
    """A configuration with every bit-width of the grid and a width below 1: torchao's
    IntxWeightOnly and Int8WeightOnly Linear layers on a pruned model."""
    config = space.uniform(2)
    bits = dict(config.bits)
    bits["fc2"] = 8
    return QuantConfig(bits, dict.fromkeys(config.widths, 0.5))


# -- the runtime ---------------------------------------------------------------------------------


def test_cpu_runtime_describes_itself() -> None:
    runtime = TorchRuntime("cpu", threads=2)
    described = runtime.describe()
    assert described["runtime"] == runtime.name == "torch-cpu"
    assert (described["device"], described["threads"], described["dtype"]) == ("cpu", 2, "float32")
    assert described["torch"] == torch.__version__ and described["torchao"]
    assert "cuda_device" not in described
    # The default is the CPU with one thread; auto() picks CUDA only where there is a GPU.
    assert (TorchRuntime().device, TorchRuntime().threads) == ("cpu", 1)
    assert TorchRuntime.auto().is_cuda == torch.cuda.is_available()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"device": "tpu"}, "device must be 'cpu' or 'cuda', got 'tpu'"),
        ({"device": "meta"}, "device must be 'cpu' or 'cuda', got 'meta'"),
        ({"threads": 0}, "threads must be a positive integer, got 0"),
        ({"threads": 1.5}, "threads must be"),
    ],
)
def test_runtime_refuses_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TorchRuntime(**kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_cuda_is_refused_without_a_gpu() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        TorchRuntime("cuda")


def test_cpu_runtime_times_a_torchao_model_of_the_configuration(
    task: Task, space: HessianSearchSpace
) -> None:
    runtime = TorchRuntime("cpu", threads=1)
    config = _mixed(space)
    net = runtime.model(space, task.model, config, task.example_inputs)
    # torchao's tensors, not float parameters, hold the Linear weights; the widths are pruned.
    assert type(net.fc1.weight) is not nn.Parameter and type(net.fc2.weight) is not nn.Parameter
    assert net.conv2.out_channels < task.model.conv2.out_channels
    inputs = batched_inputs(task.example_inputs, 3)
    threads = torch.get_num_threads()
    timing = runtime.time_model(
        space, task.model, config, task.example_inputs, inputs, repeats=REPEATS, warmup=1
    )
    assert timing.n_runs == REPEATS and 0 < timing.median_ms < math.inf
    assert timing.q1_ms <= timing.median_ms <= timing.q3_ms
    assert torch.get_num_threads() == threads  # the caller's thread count is restored
    # The float model is a copy, in eval mode, that computes what the model computes.
    fp32 = runtime.model(space, task.model, None)
    assert fp32 is not task.model and not fp32.training
    with torch.inference_mode():
        torch.testing.assert_close(fp32(inputs), task.model(inputs))


def test_inputs_move_to_the_device_floating_ones_in_its_dtype() -> None:
    runtime = TorchRuntime("cpu")
    x, ids = torch.ones(2, 3, dtype=torch.float64), torch.arange(2)
    args, kwargs = runtime._arguments({"x": x, "ids": ids, "flag": True})
    assert args == ()
    assert kwargs["x"].dtype == runtime.dtype and kwargs["ids"].dtype == torch.int64
    assert kwargs["flag"] is True
    args, kwargs = runtime._arguments((x, ids))
    assert [a.dtype for a in args] == [torch.float32, torch.int64] and kwargs == {}


def test_model_timer_caches_torch_runtime_measurements(
    task: Task, space: HessianSearchSpace
) -> None:
    runtime = TorchRuntime("cpu")
    timer = ModelTimer(
        space, task.model, task.example_inputs, batch=2, runtime=runtime, repeats=REPEATS
    )
    assert timer.runtime is runtime
    config = space.uniform(4)
    first = timer(config)
    assert first.n_runs == REPEATS and first.median_ms > 0
    # An equal configuration (a new object) is the cached measurement, not a second build.
    assert timer(QuantConfig(dict(config.bits), dict(config.widths))) is first
    assert timer(space.uniform(8)) is not first
    fp32 = timer.fp32()
    assert fp32.median_ms > 0 and timer.fp32() is fp32


@needs_cuda
def test_cuda_runtime_times_the_configuration(task: Task, space: HessianSearchSpace) -> None:
    runtime = TorchRuntime("cuda")
    described = runtime.describe()
    assert described["runtime"] == "torch-cuda" and described["dtype"] == "bfloat16"
    assert described["cuda_device"] == torch.cuda.get_device_name(runtime.device)
    config = _mixed(space)
    net = runtime.model(space, task.model, config, task.example_inputs)
    assert next(net.parameters()).is_cuda
    timer = ModelTimer(space, task.model, task.example_inputs, runtime=runtime, repeats=REPEATS)
    timing = timer(config)
    assert timing.n_runs == REPEATS and 0 < timing.median_ms < math.inf
    assert timer(config) is timing and timer.fp32().median_ms > 0


# -- the CLI's --latency-runtime -----------------------------------------------------------------


def _requested(**given: object) -> dict[str, object]:
    return {f: given.get(f) for f in Settings.__dataclass_fields__}


def test_latency_runtime_option_parses() -> None:
    parser = build_parser()
    assert parser.parse_args(["search", "--latency-runtime", "torch"]).latency_runtime == "torch"
    assert parser.parse_args(["search"]).latency_runtime is None
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(["search", "--latency-runtime", "tensorrt"])
    assert stopped.value.code == 2


def test_torch_runtime_settings_time_whole_models() -> None:
    settings = resolve(
        _requested(objective="pareto-latency", latency_runtime="torch"),
        None,
        "new",
        lambda s: None,
    )
    # The table is onnxruntime's: torch defaults to measured latencies.
    assert (settings.latency_runtime, settings.latency_source) == ("torch", "measured")
    assert Settings.from_attr(settings.to_attr()) == settings
    default = resolve(_requested(objective="pareto-latency"), None, "new", lambda s: None)
    assert (default.latency_runtime, default.latency_source) == ("onnxruntime", "table")


@pytest.mark.parametrize(
    ("given", "match"),
    [
        (
            {"objective": "pareto-latency", "latency_runtime": "torch", "latency_source": "table"},
            "--latency-runtime torch supports --latency-source measured only",
        ),
        (
            {"objective": "budget", "latency_runtime": "torch"},
            "--latency-runtime applies to --objective latency-budget or pareto-latency only",
        ),
    ],
)
def test_latency_runtime_refuses_contradictions(given: dict[str, object], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        resolve(_requested(**given), None, "new", lambda s: None)


def test_settings_stored_without_the_runtime_load_as_onnxruntime() -> None:
    old = {
        "task": "optuna_ctpe.tasks.digits:digits_task",
        "seed": 0,
        "objective": "budget",
        "size_budget": 0.125,
        "bits": [2, 4, 8],
        "widths": [1.0],
        "hessian_pruning": True,
        "finetune_epochs": 0,
    }
    assert Settings.from_attr(old).latency_runtime is None
    # A latency study stored before the option was timed on onnxruntime, and says so.
    latency = {
        **old,
        "objective": "pareto-latency",
        "size_budget": None,
        "latency_source": "table",
        "latency_batch": 1,
    }
    settings = Settings.from_attr(latency)
    assert settings.latency_runtime == "onnxruntime"
    assert resolve(_requested(latency_runtime="onnxruntime"), latency, "old", lambda s: None) == (
        settings
    )
    with pytest.raises(UsageError, match="created with --latency-runtime onnxruntime"):
        resolve(_requested(latency_runtime="torch"), latency, "old", lambda s: None)


def test_latency_meter_times_on_the_torch_runtime(task: Task, space: HessianSearchSpace) -> None:
    settings = resolve(
        _requested(objective="pareto-latency", latency_runtime="torch"),
        None,
        "new",
        lambda s: None,
    )
    check_latency_extra(settings)  # torchao is installed: nothing refused
    meter = latency_meter(settings, space, task)
    assert isinstance(meter.runtime, TorchRuntime) and meter.source == "measured"
    assert meter.runtime_name == ("torch-cuda" if torch.cuda.is_available() else "torch-cpu")
    assert meter(space.uniform(8)) > 0 and meter.fp32() > 0


@pytest.mark.slow
def test_search_with_the_torch_runtime_records_it_per_trial(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cache = tmp_path_factory.mktemp("cache")
    digits_task(seed=0, cache_dir=cache)  # trained once here, not in the subprocesses
    env = {**os.environ, "OPTUNA_CTPE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    db = tmp_path / "t.db"
    base = [sys.executable, "-m", "optuna_ctpe.cli", "search", "--storage", f"sqlite:///{db}"]
    few = ["--n-trials", "2", "--no-progress", "--bits", "4,8", "--widths", "0.75,1"]
    torch_runtime = ["--objective", "pareto-latency", "--latency-runtime", "torch"]

    refused = subprocess.run(
        base + torch_runtime + ["--latency-source", "table"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert refused.returncode == 2
    assert "--latency-runtime torch supports --latency-source measured only" in refused.stderr
    assert not db.exists() or not optuna.get_all_study_summaries(f"sqlite:///{db}")

    result = subprocess.run(
        base + torch_runtime + few,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="optuna-ctpe", storage=f"sqlite:///{db}")
    stored = study.user_attrs[_attrs.SETTINGS]
    assert (stored["latency_runtime"], stored["latency_source"]) == ("torch", "measured")
    assert _attrs.LATENCY_TABLE not in study.user_attrs
    expected = "torch-cuda" if torch.cuda.is_available() else "torch-cpu"
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert trials
    for trial in trials:
        assert trial.user_attrs[_attrs.LATENCY_RUNTIME] == expected
        assert trial.user_attrs[_attrs.LATENCY_SOURCE] == "measured"
        assert trial.values[1] == trial.user_attrs[_attrs.LATENCY_MS] > 0
    assert study.user_attrs[_attrs.BASELINES]["fp32"][_attrs.LATENCY_MS] > 0
