"""A configuration's latency as one number, for an objective: from a lookup table or timed.

A latency objective needs ``config -> milliseconds``. :class:`LatencyMeter` is that function, on
one of two runtimes (:data:`LATENCY_RUNTIMES`: onnxruntime's CPU provider, or PyTorch with
torchao's kernels, on CUDA when there is a GPU) and from one of two sources: a
:class:`~optuna_ctpe.deploy.latency_table.LatencyTable`'s prediction (``"table"``: microseconds
per configuration, after a one-off measurement), or the configuration's whole model timed
(``"measured"``: :class:`~optuna_ctpe.deploy.latency.ModelTimer`, about a second per new
configuration). The command line's ``--objective latency-budget`` and ``pareto-latency`` are
built on it; so can a user's own objective, e.g. accuracy against latency::

    meter = LatencyMeter(space, model, example_inputs)

    def objective(trial):
        config = space.suggest(trial)
        net = space.apply(model, config, example_inputs)
        return evaluate(net), meter(config)  # directions=["maximize", "minimize"]

Importing this module imports neither torch nor a runtime: :func:`missing_packages` tells
what a runtime needs before anything is built. Requires the ``torch`` and ``deploy`` extras to
measure.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Any
from typing import TYPE_CHECKING

from optuna_ctpe._validation import check_integer
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import spec_of


if TYPE_CHECKING:
    import torch

    from optuna_ctpe.deploy.latency import ModelRuntime
    from optuna_ctpe.deploy.latency_table import LatencyTable
    from optuna_ctpe.space.records import HasSpec
    from optuna_ctpe.space.records import SpaceSpec


__all__ = [
    "LATENCY_RUNTIMES",
    "LATENCY_SOURCES",
    "LatencyMeter",
    "missing_packages",
    "runtime_named",
]

#: Where latency is timed, onnxruntime's CPU provider or PyTorch with torchao's kernels (CUDA
#: when there is a GPU, else the CPU; whole models only, since a table's one-layer graphs are
#: onnxruntime's).
LATENCY_RUNTIMES = ("onnxruntime", "torch")
#: Where a configuration's latency comes from, a lookup table's prediction or its model timed.
LATENCY_SOURCES = ("table", "measured")

# Runtime name -> what it times, and the packages (the ``deploy`` extra) it needs.
_NEEDS = {
    "onnxruntime": ("ONNX models", ("onnx", "onnxscript", "onnxruntime")),
    "torch": ("torchao models", ("torchao",)),
}


def _check_runtime(name: Any) -> str:
    if name not in LATENCY_RUNTIMES:
        raise ValueError(f"runtime must be one of {list(LATENCY_RUNTIMES)}, got {name!r}.")
    return str(name)


def missing_packages(runtime: str) -> tuple[str, list[str]]:
    """What ``runtime`` times, and the packages it needs that are not installed (empty when it
    can run), found without importing them.

    Example:
        .. code-block:: python

            from optuna_ctpe.deploy.latency_meter import missing_packages

            missing_packages("torch")  # ("torchao models", []) where torchao is installed

    Raises:
        ValueError: If ``runtime`` is not one of :data:`LATENCY_RUNTIMES`.
    """
    what, needed = _NEEDS[_check_runtime(runtime)]
    return what, [m for m in needed if importlib.util.find_spec(m) is None]


def runtime_named(name: str) -> ModelRuntime:
    """The runtime called ``name`` in this process: ``"onnxruntime"``, its CPU provider with one
    thread (:class:`~optuna_ctpe.deploy.latency.OrtRuntime`); ``"torch"``, PyTorch on CUDA
    when this process has a GPU, else on the CPU
    (:meth:`~optuna_ctpe.deploy.torch_runtime.TorchRuntime.auto`).

    Raises:
        ValueError: If ``name`` is not one of :data:`LATENCY_RUNTIMES`.
    """
    if _check_runtime(name) == "torch":
        from optuna_ctpe.deploy.torch_runtime import TorchRuntime

        return TorchRuntime.auto()
    from optuna_ctpe.deploy.latency import OrtRuntime

    return OrtRuntime()


class LatencyMeter:
    """``meter(config)``: a configuration's latency in milliseconds, for an objective.

    With a ``table``, the table's prediction (the table names its own runtime); without, the
    configuration's model on ``runtime`` (exported by
    :func:`~optuna_ctpe.deploy.onnx.export_onnx` for onnxruntime, quantized by torchao for
    torch) timed as a whole by a :class:`~optuna_ctpe.deploy.latency.ModelTimer` (made on first
    use, cached by configuration), on ``example_inputs`` repeated to ``batch`` rows.

    Example:
        .. code-block:: python

            from optuna_ctpe import HessianSearchSpace
            from optuna_ctpe.deploy.latency_meter import LatencyMeter
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task(seed=0)
            space = HessianSearchSpace.from_model(
                task.model, task.loss_fn, task.calibration_batches,
                example_inputs=task.example_inputs,
            )
            meter = LatencyMeter(space, task.model, task.example_inputs)
            print(meter(space.uniform(4)), meter.fp32(), meter.source, meter.runtime_name)

    Args:
        space: The search space the configurations belong to, or its
            :class:`~optuna_ctpe.space.records.SpaceSpec`.
        model: The float model the space was measured on (not modified).
        example_inputs: The model's inputs (see :func:`~optuna_ctpe.deploy.onnx.export_onnx`).
        batch: Rows of the timed input, an integer >= 1 (a table has its own).
        runtime: One of :data:`LATENCY_RUNTIMES` (see :func:`runtime_named`).
        table: A :class:`~optuna_ctpe.deploy.latency_table.LatencyTable` of the space, or None
            to time whole models.

    Attributes:
        table: The table, or None.
        source: ``"table"`` or ``"measured"`` (one of :data:`LATENCY_SOURCES`).
        runtime: The runtime whole models are timed on.
        runtime_name: The runtime the latencies are of: a table's own, else :attr:`runtime`'s.

    Raises:
        ValueError: If ``batch`` or ``runtime`` is out of range.
        TypeError: If ``space`` is neither a search space nor a ``SpaceSpec``.
    """

    def __init__(
        self,
        space: SpaceSpec | HasSpec,
        model: torch.nn.Module,
        example_inputs: Any,
        *,
        batch: int = 1,
        runtime: str = "onnxruntime",
        table: LatencyTable | None = None,
    ) -> None:
        self._spec = spec_of(space)
        self._batch = check_integer(batch, "batch", minimum=1)
        self.table = table
        self.source = "measured" if table is None else "table"
        self.runtime = runtime_named(runtime)
        self.runtime_name = self.runtime.name if table is None else table.runtime["runtime"]
        self._model = model
        self._example = example_inputs
        self._timer: Any = None
        self._lock = threading.Lock()

    def __call__(self, config: QuantConfig) -> float:
        """The latency of ``config``'s model, in milliseconds."""
        if self.table is not None:
            return float(self.table.predict(config))
        return float(self._model_timer()(config).median_ms)

    def fp32(self) -> float:
        """The latency of the float model on the same runtime, in milliseconds."""
        if self.table is not None:
            return float(self.table.fp32_ms)
        return float(self._model_timer().fp32().median_ms)

    def _model_timer(self) -> Any:
        # Made on first use: a table-based meter never exports.
        with self._lock:
            if self._timer is None:
                from optuna_ctpe.deploy.latency import ModelTimer

                self._timer = ModelTimer(
                    self._spec,
                    self._model,
                    self._example,
                    batch=self._batch,
                    runtime=self.runtime,
                )
            return self._timer
