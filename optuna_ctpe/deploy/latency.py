"""Latency on a target runtime: robust timing of onnxruntime sessions, and of a trial's model.

The default runtime is onnxruntime's CPU provider (:class:`OrtRuntime`), with its intra- and
inter-op thread counts fixed (1 each by default, so that a number does not depend on how busy
the other cores are) and recorded with every measurement; PyTorch with torchao's kernels
(:class:`~optuna_ctpe.deploy.torch_runtime.TorchRuntime`, CUDA or CPU) is the other. A
measurement (:class:`Timing`) is the median of many runs after a warm-up, with the
interquartile range over the median as its noise.

Two ways to get a configuration's latency, both built here and in
:mod:`optuna_ctpe.deploy.latency_table`:

* :class:`ModelTimer` (whole-model timing): build the configuration's model for the runtime
  (on onnxruntime, :func:`~optuna_ctpe.deploy.onnx.export_onnx` to a temporary file) and time
  it, cached by :meth:`QuantConfig.key`. Exact, but each new configuration costs an export
  (seconds).
* :class:`~optuna_ctpe.deploy.latency_table.LatencyTable` (HAWQ-V3's lookup table): one
  one-layer graph per layer and choice, measured once, summed per configuration.

Nothing here was measured on a GPU: only the CPU code paths ran on this project's machines.
Requires the ``torch`` and ``deploy`` extras.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
import copy
import os
from pathlib import Path
import statistics
import tempfile
import threading
import time
from typing import Any
from typing import Protocol
from typing import TYPE_CHECKING

import numpy as np

from optuna_ctpe._validation import check_integer
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import spec_of


if TYPE_CHECKING:
    import torch

    from optuna_ctpe.space.records import HasSpec
    from optuna_ctpe.space.records import SpaceSpec


__all__ = [
    "DEFAULT_REPEATS",
    "DEFAULT_WARMUP",
    "ModelRuntime",
    "ModelTimer",
    "OrtRuntime",
    "Timing",
    "batched_inputs",
    "float_model_bytes",
    "session_feed",
    "time_call",
    "time_calls",
]

#: Timed runs per measurement, enough for a stable median of sub-millisecond runs.
DEFAULT_REPEATS = 200
#: Untimed runs first, while onnxruntime allocates its buffers and caches.
DEFAULT_WARMUP = 20


@dataclass(frozen=True)
class Timing:
    """One latency measurement.

    Attributes:
        median_ms: The median time of one run, in milliseconds.
        q1_ms: The 25th percentile, in milliseconds.
        q3_ms: The 75th percentile, in milliseconds.
        n_runs: The timed runs.
    """

    median_ms: float
    q1_ms: float
    q3_ms: float
    n_runs: int

    @property
    def noise(self) -> float:
        """The interquartile range over the median, how much the machine moved the runs."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else 0.0


class ModelRuntime(Protocol):
    """What :class:`ModelTimer` times on: :class:`OrtRuntime` or
    :class:`~optuna_ctpe.deploy.torch_runtime.TorchRuntime`."""

    @property
    def name(self) -> str:
        """How tables, reports and trial attributes name the runtime."""

    def describe(self) -> dict[str, Any]:
        """The runtime as recorded beside a measurement (JSON-ready)."""

    def time_model(
        self,
        space: SpaceSpec | HasSpec,
        model: torch.nn.Module,
        config: QuantConfig | None,
        example_inputs: Any,
        inputs: Any,
        *,
        repeats: int,
        warmup: int,
    ) -> Timing:
        """Build ``config``'s model (None: the float model) on the runtime and time it on
        ``inputs`` (``example_inputs`` are what the model is traced or pruned on)."""


@dataclass(frozen=True)
class OrtRuntime:
    """onnxruntime's CPU provider with fixed threads: where latencies are measured.

    Attributes:
        intra_op_threads: Threads inside an operator (``SessionOptions.intra_op_num_threads``),
            >= 1.
        inter_op_threads: Threads across operators (``inter_op_num_threads``), >= 1.
        fold_dequantize: Set the session option ``session.disable_quant_qdq``, which folds
            ``DequantizeLinear`` of constant weights into float32 weights when the session
            loads. onnxruntime's default (False) keeps them, which is what
            ``InferenceSession(path)`` runs; folded, low-bit convolutions run at FP32 speed
            (``benchmarks/results/onnx_runtime.md``).
    """

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    fold_dequantize: bool = False

    def __post_init__(self) -> None:
        for name in ("intra_op_threads", "inter_op_threads"):
            check_integer(getattr(self, name), name, minimum=1)
        if not isinstance(self.fold_dequantize, bool):
            raise ValueError(f"fold_dequantize must be a bool, got {self.fold_dequantize!r}.")

    @property
    def name(self) -> str:
        """How tables and reports name the runtime."""
        return "onnxruntime-cpu" + ("-folded" if self.fold_dequantize else "")

    def session(self, model: str | os.PathLike[str] | bytes) -> Any:
        """An ``onnxruntime.InferenceSession`` of a file or serialized model, on the CPU."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        if self.fold_dequantize:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        source = model if isinstance(model, bytes) else str(model)
        return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    def describe(self) -> dict[str, Any]:
        """The runtime as recorded beside a measurement (JSON-ready)."""
        import onnxruntime

        return {
            "runtime": self.name,
            "onnxruntime": onnxruntime.__version__,
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "fold_dequantize": self.fold_dequantize,
        }

    def time_model(
        self,
        space: SpaceSpec | HasSpec,
        model: torch.nn.Module,
        config: QuantConfig | None,
        example_inputs: Any,
        inputs: Any,
        *,
        repeats: int = DEFAULT_REPEATS,
        warmup: int = DEFAULT_WARMUP,
    ) -> Timing:
        """The latency of ``config``'s model as :func:`~optuna_ctpe.deploy.onnx.export_onnx`
        writes it (None: the float model exported as it is), on ``inputs``.

        Args:
            space: The search space ``config`` belongs to, or its
                :class:`~optuna_ctpe.space.records.SpaceSpec`.
            model: The float model the space was measured on.
            config: The configuration, or None for the float model.
            example_inputs: What the exporter traces the model on.
            inputs: What the session runs on (e.g. :func:`batched_inputs`).
            repeats: Timed runs (see :func:`time_calls`).
            warmup: Untimed runs first.
        """
        if config is None:
            data = float_model_bytes(model, example_inputs)
        else:
            data = _exported(space, model, config, example_inputs)
        session = self.session(data)
        feed = session_feed(session, inputs)
        return time_call(lambda: session.run(None, feed), repeats=repeats, warmup=warmup)


def time_calls(
    calls: Sequence[Callable[[], Any]],
    *,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    rounds: int = 10,
) -> list[Timing]:
    """Time each of ``calls``, interleaved: the median of ``repeats`` runs after ``warmup``.

    The runs go in ``rounds`` rounds, each running every call ``repeats / rounds`` times in
    turn, so that a burst of load from other processes falls on all of them rather than on one:
    on a shared machine the differences between the calls are then steadier than their levels.

    Example:
        .. code-block:: python

            from optuna_ctpe.deploy.latency import time_calls

            (timing,) = time_calls([lambda: sum(range(1000))], repeats=50)
            print(timing.median_ms, timing.noise)

    Args:
        calls: Functions of no argument (e.g. ``lambda: session.run(None, feed)``).
        repeats: Timed runs of each call, an integer >= 1.
        warmup: Untimed runs of each call first, an integer >= 0.
        rounds: Rounds the timed runs are split into, an integer in [1, ``repeats``].

    Returns:
        One :class:`Timing` per call, in order.
    """
    repeats = check_integer(repeats, "repeats", minimum=1)
    warmup = check_integer(warmup, "warmup", minimum=0)
    rounds = check_integer(rounds, "rounds", minimum=1, maximum=repeats)
    for call in calls:
        for _ in range(warmup):
            call()
    samples: list[list[float]] = [[] for _ in calls]
    for r in range(rounds):
        # The first rounds take one run more when repeats is not a multiple of rounds.
        runs = repeats // rounds + (r < repeats % rounds)
        for call, times in zip(calls, samples):
            for _ in range(runs):
                start = time.perf_counter_ns()
                call()
                times.append((time.perf_counter_ns() - start) / 1e6)
    return [_timing(times) for times in samples]


def time_call(
    call: Callable[[], Any], *, repeats: int = DEFAULT_REPEATS, warmup: int = DEFAULT_WARMUP
) -> Timing:
    """:func:`time_calls` of one call, in up to 10 rounds: how a whole model is timed.

    Example:
        .. code-block:: python

            from optuna_ctpe.deploy.latency import time_call

            print(time_call(lambda: sum(range(1000)), repeats=50).median_ms)

    Args:
        call: A function of no argument.
        repeats: Timed runs, an integer >= 1.
        warmup: Untimed runs first, an integer >= 0.
    """
    repeats = check_integer(repeats, "repeats", minimum=1)
    (timing,) = time_calls([call], repeats=repeats, warmup=warmup, rounds=min(10, repeats))
    return timing


def _timing(times: list[float]) -> Timing:
    if len(times) == 1:
        return Timing(times[0], times[0], times[0], 1)
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return Timing(median, q1, q3, len(times))


def batched_inputs(example_inputs: Any, batch: int) -> Any:
    """``example_inputs`` with ``batch`` rows: its rows repeated (or cut) along dimension 0.

    Every tensor of one dimension or more is taken to be batched along its first dimension (as
    :func:`~optuna_ctpe.deploy.onnx.export_onnx`'s ``dynamic_batch`` takes it).

    Args:
        example_inputs: A tensor, a tuple of positional inputs or a mapping of keyword inputs.
        batch: The rows wanted, an integer >= 1.
    """
    import torch
    from torch.utils import _pytree as pytree

    batch = check_integer(batch, "batch", minimum=1)

    def rows(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        if value.shape[0] == 0:
            raise ValueError("example_inputs hold a tensor with no rows to repeat.")
        return value[torch.arange(batch) % value.shape[0]].contiguous()

    return pytree.tree_map(rows, example_inputs)


def session_feed(session: Any, inputs: Any) -> dict[str, np.ndarray]:
    """The feed of ``session``: its inputs in order, from the tensors of ``inputs``.

    Raises:
        RuntimeError: If the session takes another number of inputs than ``inputs`` holds
            (the exporter drops inputs a graph does not use).
    """
    import torch
    from torch.utils import _pytree as pytree

    leaves = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(leaves):
        raise RuntimeError(
            f"the graph takes inputs {names} but the example inputs hold {len(leaves)} tensors; "
            "pass only the inputs the model uses."
        )
    return {name: t.detach().cpu().numpy() for name, t in zip(names, leaves)}


class ModelTimer:
    """Whole-model latency of configurations: build each once for the runtime, time it, cache it.

    A configuration's model is built and timed by ``runtime``'s ``time_model``
    (:class:`ModelRuntime`): on :class:`OrtRuntime`, the file
    :func:`~optuna_ctpe.deploy.onnx.export_onnx` writes (the file a user deploys), loaded in a
    session; on :class:`~optuna_ctpe.deploy.torch_runtime.TorchRuntime`, the model
    :func:`~optuna_ctpe.deploy.torchao.quantize_with_torchao` returns. It is timed by
    :func:`time_calls` on ``example_inputs`` repeated to ``batch`` rows. The result is cached
    by :meth:`QuantConfig.key`; measurements run one at a time (a lock), since two at once
    would slow each other down.

    Example:
        .. code-block:: python

            from optuna_ctpe import HessianSearchSpace
            from optuna_ctpe.deploy.latency import ModelTimer
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task(seed=0)
            space = HessianSearchSpace.from_model(
                task.model, task.loss_fn, task.calibration_batches,
                example_inputs=task.example_inputs,
            )
            timer = ModelTimer(space, task.model, task.example_inputs, batch=1)
            print(timer(space.uniform(4)).median_ms, timer.fp32().median_ms)

    Args:
        space: The search space the configurations belong to, or its
            :class:`~optuna_ctpe.space.records.SpaceSpec`.
        model: The float model the space was measured on.
        example_inputs: The model's inputs (see :func:`export_onnx`).
        batch: Rows of the timed input, an integer >= 1.
        runtime: Where to time, a :class:`ModelRuntime` (default: :class:`OrtRuntime` with one
            thread each).
        repeats: Timed runs per configuration (see :func:`time_calls`).
        warmup: Untimed runs per configuration first.
    """

    def __init__(
        self,
        space: SpaceSpec | HasSpec,
        model: torch.nn.Module,
        example_inputs: Any,
        *,
        batch: int = 1,
        runtime: ModelRuntime | None = None,
        repeats: int = DEFAULT_REPEATS,
        warmup: int = DEFAULT_WARMUP,
    ) -> None:
        if example_inputs is None:
            raise ValueError("example_inputs is required: the exporter traces the model on them.")
        self._spec = spec_of(space)
        self._model = model
        self._example = example_inputs
        self.batch = check_integer(batch, "batch", minimum=1)
        self.runtime: ModelRuntime = OrtRuntime() if runtime is None else runtime
        self._repeats = check_integer(repeats, "repeats", minimum=1)
        self._warmup = check_integer(warmup, "warmup", minimum=0)
        self._inputs = batched_inputs(example_inputs, self.batch)
        self._cache: dict[Any, Timing] = {}
        self._lock = threading.Lock()

    def __call__(self, config: QuantConfig) -> Timing:
        """The latency of ``config``'s model on the runtime (measured once per configuration)."""
        if not isinstance(config, QuantConfig):
            raise ValueError(f"config must be a QuantConfig, got {config!r}.")
        with self._lock:
            key = config.key()
            if key not in self._cache:
                self._cache[key] = self._measure(config)
            return self._cache[key]

    def fp32(self) -> Timing:
        """The latency of the float model itself on the runtime (on onnxruntime, exported as it
        is)."""
        with self._lock:
            if "fp32" not in self._cache:
                self._cache["fp32"] = self._measure(None)
            return self._cache["fp32"]

    def _measure(self, config: QuantConfig | None) -> Timing:
        return self.runtime.time_model(
            self._spec,
            self._model,
            config,
            self._example,
            self._inputs,
            repeats=self._repeats,
            warmup=self._warmup,
        )


def _exported(
    space: SpaceSpec | HasSpec, model: torch.nn.Module, config: QuantConfig, example_inputs: Any
) -> bytes:
    """``config``'s model as :func:`~optuna_ctpe.deploy.onnx.export_onnx` writes it."""
    from optuna_ctpe.deploy.onnx import export_onnx

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(space, model, config, path, example_inputs, verify=False)
        return path.read_bytes()


def float_model_bytes(
    model: torch.nn.Module, example_inputs: Any, opset: int | None = None
) -> bytes:
    """The float model as a serialized ONNX graph, exported as :func:`export_onnx` exports
    (dynamo, a dynamic batch, no per-node metadata) but with every weight float32."""
    from optuna_ctpe.deploy._onnx_graph import strip_node_metadata
    from optuna_ctpe.deploy.onnx import call_arguments
    from optuna_ctpe.deploy.onnx import DEFAULT_OPSET
    from optuna_ctpe.deploy.onnx import export_proto

    # A copy on the CPU in eval mode: the model itself is left as it is.
    net = copy.deepcopy(model).cpu().eval()
    args, kwargs = call_arguments(example_inputs)
    proto = export_proto(net, args, kwargs, DEFAULT_OPSET if opset is None else opset, True)
    strip_node_metadata(proto.graph)
    return proto.SerializeToString()
