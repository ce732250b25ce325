"""Latency in PyTorch with torchao's weight-only kernels: on CUDA when there is a GPU, else CPU.

:class:`TorchRuntime` is the other runtime of :class:`~optuna_ctpe.deploy.latency.ModelTimer`
(beside onnxruntime's CPU provider, :class:`~optuna_ctpe.deploy.latency.OrtRuntime`). A
configuration's model is what :func:`~optuna_ctpe.deploy.torchao.quantize_with_torchao`
returns for the device: on CUDA in bfloat16, so that 4-bit and narrower Linear layers run
torch's tinygemm int4 kernel; on the CPU in float32, with torchao's ``IntxWeightOnly`` and
``Int8WeightOnly`` tensors, which run there, slower than float32 (issue 11): the honest CPU
number of this runtime, not a speed-up. Layers torchao has no weight-only path for
(convolutions, above all) run in float with fake-quantized values, so their bit-widths do not
change this runtime's latency: only widths do.

Each call runs under ``torch.inference_mode()``; on CUDA it ends with
``torch.cuda.synchronize()``, so the time of a call is the GPU's work, not its launch. The CPU
thread count (``torch.set_num_threads``) is fixed for the measurement and restored after.

Only the CPU code path was run on this project's machines (no GPU there); the CUDA path is
built to torchao 0.18's documented API and tested only where a GPU is present.
Requires the ``torch`` and ``deploy`` extras (``torchao``).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import copy
from dataclasses import dataclass
from typing import Any
from typing import TYPE_CHECKING
import warnings

import torch
from torch.utils import _pytree as pytree

from optuna_ctpe._validation import check_integer
from optuna_ctpe.deploy.latency import DEFAULT_REPEATS
from optuna_ctpe.deploy.latency import DEFAULT_WARMUP
from optuna_ctpe.deploy.latency import time_call
from optuna_ctpe.deploy.latency import Timing
from optuna_ctpe.space.records import QuantConfig


if TYPE_CHECKING:
    from optuna_ctpe.space.records import HasSpec
    from optuna_ctpe.space.records import SpaceSpec


__all__ = ["TorchRuntime"]

_DEVICE_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class TorchRuntime:
    """PyTorch eager mode with torchao's weight-only tensors, on one device.

    Example:
        .. code-block:: python

            from optuna_ctpe import HessianSearchSpace
            from optuna_ctpe.deploy.latency import ModelTimer
            from optuna_ctpe.deploy.torch_runtime import TorchRuntime
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task(seed=0)
            space = HessianSearchSpace.from_model(
                task.model, task.loss_fn, task.calibration_batches,
                example_inputs=task.example_inputs,
            )
            runtime = TorchRuntime.auto()  # CUDA when there is a GPU, else the CPU
            timer = ModelTimer(space, task.model, task.example_inputs, runtime=runtime)
            print(runtime.describe(), timer(space.uniform(4)).median_ms)

    Attributes:
        device: ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``); CUDA must be available.
        threads: CPU intra-op threads during a measurement (``torch.set_num_threads``), >= 1;
            the caller's count is restored after.
    """

    device: str = "cpu"
    threads: int = 1

    def __post_init__(self) -> None:
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}: {e}") from e
        if device.type not in _DEVICE_TYPES:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}.")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device is {self.device!r} but CUDA is not available.")
        check_integer(self.threads, "threads", minimum=1)
        # Normalised ("cuda" and "cuda:0" name one device and compare equal once resolved).
        object.__setattr__(self, "device", str(device))

    @classmethod
    def auto(cls, threads: int = 1) -> TorchRuntime:
        """CUDA's current device when ``torch.cuda.is_available()``, else the CPU.

        Args:
            threads: CPU intra-op threads during a measurement, an integer >= 1.
        """
        if torch.cuda.is_available():
            return cls(f"cuda:{torch.cuda.current_device()}", threads)
        return cls("cpu", threads)

    @property
    def is_cuda(self) -> bool:
        """Whether the runtime times on a GPU."""
        return self.device.startswith("cuda")

    @property
    def dtype(self) -> torch.dtype:
        """The models' floating dtype, bfloat16 on CUDA (torchao's int4 kernel needs it),
        float32 on the CPU."""
        return torch.bfloat16 if self.is_cuda else torch.float32

    @property
    def name(self) -> str:
        """How reports and trial attributes name the runtime, ``torch-cpu`` or ``torch-cuda``."""
        return "torch-cuda" if self.is_cuda else "torch-cpu"

    def describe(self) -> dict[str, Any]:
        """The runtime as recorded beside a measurement (JSON-ready): name, torch and torchao
        versions, device, dtype and threads, and on CUDA the GPU's name and CUDA version."""
        import torchao

        described: dict[str, Any] = {
            "runtime": self.name,
            "torch": torch.__version__,
            "torchao": torchao.__version__,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "threads": self.threads,
        }
        if self.is_cuda:
            described["cuda_device"] = torch.cuda.get_device_name(self.device)
            described["cuda"] = torch.version.cuda
        return described

    def model(
        self,
        space: SpaceSpec | HasSpec,
        model: torch.nn.Module,
        config: QuantConfig | None,
        example_inputs: Any = None,
    ) -> torch.nn.Module:
        """``config``'s model as this runtime times it, on its device and dtype, in eval mode.

        Args:
            space: The search space ``config`` belongs to, or its
                :class:`~optuna_ctpe.space.records.SpaceSpec`.
            model: The float model the space was measured on (not modified).
            config: The configuration (quantized by
                :func:`~optuna_ctpe.deploy.torchao.quantize_with_torchao`), or None for a
                copy of the float model.
            example_inputs: Inputs for dependency tracing; required when a width is below 1.
        """
        if config is None:
            return copy.deepcopy(model).to(device=self.device, dtype=self.dtype).eval()
        from optuna_ctpe.deploy.torchao import quantize_with_torchao

        with warnings.catch_warnings():
            # The layers without a torchao path (named in the warning, with their bits, so new
            # at every configuration) are what the module's docstring says: float, fake-quantized.
            warnings.filterwarnings("ignore", message=r"layers .* have no torchao weight-only")
            return quantize_with_torchao(
                space, model, config, example_inputs, device=self.device, dtype=self.dtype
            )

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
        """The latency of ``config``'s model (:meth:`model`) on ``inputs``.

        Args:
            space: The search space ``config`` belongs to, or its
                :class:`~optuna_ctpe.space.records.SpaceSpec`.
            model: The float model the space was measured on.
            config: The configuration, or None for the float model.
            example_inputs: What the model is pruned (traced) on.
            inputs: What the model runs on: a tensor, a tuple of positional inputs or a mapping
                of keyword inputs (e.g. :func:`~optuna_ctpe.deploy.latency.batched_inputs`);
                floating tensors are cast to :attr:`dtype`, all moved to :attr:`device`.
            repeats: Timed runs (see :func:`~optuna_ctpe.deploy.latency.time_calls`).
            warmup: Untimed runs first.
        """
        net = self.model(space, model, config, example_inputs)
        args, kwargs = self._arguments(inputs)
        synchronize = torch.cuda.synchronize if self.is_cuda else None

        def call() -> None:
            net(*args, **kwargs)
            if synchronize is not None:
                synchronize(self.device)

        with _threads(self.threads), torch.inference_mode():
            return time_call(call, repeats=repeats, warmup=warmup)

    def _arguments(self, inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword inputs on the device, floating ones in the dtype."""
        from optuna_ctpe.deploy.onnx import call_arguments

        def moved(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            dtype = self.dtype if value.is_floating_point() else value.dtype
            return value.to(device=self.device, dtype=dtype)

        args, kwargs = call_arguments(inputs)
        return pytree.tree_map(moved, args), pytree.tree_map(moved, kwargs)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block, the caller's restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
