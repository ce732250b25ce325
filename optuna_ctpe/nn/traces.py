"""What the trace estimators share: the :class:`LayerTrace` record, argument checks, layer
selection, running statistics, the model-preserving context and the progress bar."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
import contextlib
from dataclasses import dataclass
import math
import re
import sys
from typing import Any

import torch
from torch import nn
from torch.nn.attention import sdpa_kernel
from torch.nn.attention import SDPBackend
from tqdm.auto import tqdm

from optuna_ctpe._validation import check_integer
from optuna_ctpe._validation import is_real
from optuna_ctpe.nn.layers import eval_mode
from optuna_ctpe.nn.layers import LAYER_TYPES
from optuna_ctpe.nn.layers import LayerWeight
from optuna_ctpe.nn.layers import MHA_PARAMETERS
from optuna_ctpe.nn.layers import model_layers
from optuna_ctpe.nn.layers import resolve_layers
from optuna_ctpe.nn.layers import weight_of


LossFn = Callable[[nn.Module, Any], torch.Tensor]
Layers = Sequence[str] | tuple[type[nn.Module], ...] | None


@dataclass(frozen=True)
class LayerTrace:
    """Estimated trace of one layer's weight Hessian (or empirical Fisher) block.

    Attributes:
        name: Module name.
        trace: Estimated trace, summed over the ``n_params`` weights of the layer.
        stderr: Standard error of ``trace`` (sample standard deviation of the per-probe or
            per-sample estimates over the square root of their number).
        n_params: Number of elements of the layer's weight.
        n_probes: Number of probes (Hutchinson) or samples (empirical Fisher) averaged.
    """

    name: str
    trace: float
    stderr: float
    n_params: int
    n_probes: int

    @property
    def mean_trace(self) -> float:
        """``trace / n_params``: HAWQ-V2's average Hessian eigenvalue of the layer."""
        return self.trace / self.n_params

    @property
    def relative_stderr(self) -> float:
        """``stderr / |trace|``; 0 when both are 0 and ``inf`` when only the trace is 0."""
        if self.trace == 0:
            return 0.0 if self.stderr == 0 else math.inf
        return self.stderr / abs(self.trace)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields."""
        return {
            "name": self.name,
            "trace": self.trace,
            "stderr": self.stderr,
            "n_params": self.n_params,
            "n_probes": self.n_probes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerTrace:
        """Inverse of :meth:`to_dict`.

        Args:
            data: A dict with exactly the keys ``name``, ``trace``, ``stderr``, ``n_params``
                and ``n_probes``.

        Raises:
            ValueError: On missing or extra keys.
        """
        keys = {"name", "trace", "stderr", "n_params", "n_probes"}
        if not isinstance(data, dict) or set(data) != keys:
            raise ValueError(
                f"a LayerTrace dict needs exactly the keys {sorted(keys)}, got {data!r}."
            )
        return cls(
            name=str(data["name"]),
            trace=float(data["trace"]),
            stderr=float(data["stderr"]),
            n_params=int(data["n_params"]),
            n_probes=int(data["n_probes"]),
        )


@dataclass(frozen=True)
class Setup:
    """The checked inputs of an estimator run."""

    batches: list[Any]
    names: list[str]
    weights: list[torch.Tensor]
    device: torch.device
    param_names: list[str]


def setup(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Layers,
    max_probes: Any,
    min_probes: Any,
    rtol: Any,
    seed: Any,
    device: torch.device | str | None,
) -> Setup:
    """Check an estimator's arguments and select its layers (see ``hutchinson_traces``)."""
    check_integer(max_probes, "max_probes", minimum=2)
    check_integer(min_probes, "min_probes", minimum=2)
    if not is_real(rtol) or not 0 <= rtol < math.inf:
        raise ValueError(f"rtol must be a finite number >= 0, got {rtol!r}.")
    check_integer(seed, "seed", minimum=0)
    if isinstance(batches, torch.Tensor):
        raise TypeError(
            "batches must be an iterable of batches, not a single tensor; wrap it in a list."
        )
    batch_list = list(batches)
    if not batch_list:
        raise ValueError("batches is empty: at least one batch is needed.")
    selected = select_layers(model, layers)
    weights = [layer.weight for layer in selected.values()]
    dev = weights[0].device if device is None else torch.device(device)
    return Setup(
        batch_list,
        list(selected),
        weights,
        dev,
        [layer.param_name for layer in selected.values()],
    )


def select_layers(model: nn.Module, layers: Layers) -> dict[str, LayerWeight]:
    """The selected layers (name -> :class:`~optuna_ctpe.nn.layers.LayerWeight`), in module
    order.

    Args:
        model: The network.
        layers: A sequence of layer names (module names, or parameter names of
            ``nn.MultiheadAttention`` projection weights), a tuple of module types, or None for
            every supported layer (:func:`optuna_ctpe.nn.layers.model_layers`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if layers is None:
        selected = model_layers(model)
        if not selected:
            raise ValueError(
                f"the model has no layer of types {[t.name for t in LAYER_TYPES]} "
                "or nn.MultiheadAttention."
            )
        return selected
    if isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers):
        names = [
            n
            for n, m in model.named_modules()
            if isinstance(m, layers) and weight_of(m) is not None
        ]
        if not names:
            raise ValueError(f"the model has no layer of types {[t.__name__ for t in layers]}.")
        return resolve_layers(model, names, "layers")
    if isinstance(layers, Sequence) and not isinstance(layers, str):
        if not layers or not all(isinstance(n, str) for n in layers):
            raise ValueError(
                f"layers must be a non-empty sequence of module names, got {layers!r}."
            )
        chosen = resolve_layers(model, list(layers), "layers")
        position = {n: i for i, n in enumerate(dict(model.named_modules()))}
        return dict(sorted(chosen.items(), key=lambda kv: _module_order(kv[1], position)))
    raise TypeError(
        "layers must be None, a sequence of module names or a tuple of module types, "
        f"got {layers!r}."
    )


def _module_order(layer: LayerWeight, position: Mapping[str, int]) -> tuple[int, int]:
    """A layer's place in module order (its module's; parameter layers in attribute order)."""
    rank = MHA_PARAMETERS.index(layer.attr) + 1 if layer.attr in MHA_PARAMETERS else 0
    return position[layer.module_name], rank


def checked_loss(loss: Any, index: int) -> torch.Tensor:
    """``loss_fn``'s result on batch ``index``, if it is a finite scalar with a graph."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"loss_fn must return a tensor, got {type(loss).__name__} on batch {index}."
        )
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar, got shape {tuple(loss.shape)} on batch {index}."
        )
    if not torch.isfinite(loss).all():
        raise ValueError(f"loss_fn returned a non-finite loss ({loss.item()}) on batch {index}.")
    if not loss.requires_grad:
        raise ValueError(
            f"the loss of batch {index} does not depend on the traced weights (no autograd graph)."
        )
    return loss.reshape(())


@contextlib.contextmanager
def traced(model: nn.Module, weights: list[torch.Tensor]) -> Iterator[None]:
    """Eval mode, differentiable ``weights`` and twice-differentiable attention inside; flags,
    grads, modes and the user's attention-kernel choice restored after.

    PyTorch's fused scaled-dot-product-attention kernels (flash, memory-efficient, cuDNN) have
    no second derivative; the math kernel has, so measurement runs on it (the same attention,
    computed without fusion). :func:`twice_differentiable` explains what else can fail.
    """
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        with eval_mode(model), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            for w in weights:
                w.requires_grad_(True)
            yield
    finally:
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad


# How autograd says that an op has no second derivative.
_NO_SECOND_DERIVATIVE = re.compile(r"derivative for (\S+) is not implemented")


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Turn autograd's "no second derivative" error into one that says what to do.

    Raises:
        RuntimeError: Naming the op without a second derivative, when the block raises autograd's
            error for one; other errors pass unchanged.
    """
    try:
        yield
    except RuntimeError as err:
        found = _NO_SECOND_DERIVATIVE.search(str(err))
        if found is None:
            raise
        raise RuntimeError(
            f"the loss is not twice differentiable: PyTorch has no second derivative for "
            f"{found.group(1)}, which the Hessian (Hutchinson) estimator needs. Use an "
            "implementation of that op with double backward (for a Hugging Face model, "
            "attn_implementation='eager'; for attention, torch.nn.functional."
            "scaled_dot_product_attention, whose math kernel this package selects), or "
            "estimator='fisher', which needs first derivatives only."
        ) from err


# What autograd records where a custom ``torch.autograd.Function`` whose backward is marked
# ``@once_differentiable`` ran with ``create_graph``: differentiating through it raises, but a
# Hessian-vector product whose weights lie upstream of it never reaches it and silently drops
# the curvature behind it.
_ONCE_DIFFERENTIABLE_NODE = "torch::autograd::Error"


def check_second_order(grads: Sequence[torch.Tensor]) -> None:
    """Raise if the graph of the gradients ``grads`` holds a once-differentiable backward.

    Raises:
        RuntimeError: Saying that the loss is not twice differentiable, and what to use instead.
    """
    stack = [g.grad_fn for g in grads if g.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.name() == _ONCE_DIFFERENTIABLE_NODE:
            raise RuntimeError(
                "the loss is not twice differentiable: its gradient passes through a custom "
                "torch.autograd.Function whose backward is marked @once_differentiable (a fused "
                "kernel of an extension, typically), so Hessian-vector products would silently "
                "miss the curvature behind it. Use a twice-differentiable implementation of "
                "that op during measurement, or estimator='fisher' (first derivatives only)."
            )
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)


@contextlib.contextmanager
def progress_bar(label: str, total: int, enabled: bool) -> Iterator[Callable[[float, int], None]]:
    """A tqdm bar on stderr (a no-op when not ``enabled``), as ``update(worst_rel_stderr, n)``."""
    with tqdm(total=total, desc=label, unit="probe", file=sys.stderr, disable=not enabled) as bar:

        def update(worst_relative_stderr: float, n: int = 1) -> None:
            bar.update(n)
            bar.set_postfix(worst_rel_stderr=f"{worst_relative_stderr:.3g}", refresh=False)

        yield update


def stop_after_round(
    stats: RunningStats,
    k: int,
    n_batches: int,
    min_probes: int,
    rtol: float,
    update: Callable[[float, int], None],
) -> bool:
    """Report probe ``k`` (0-based) to the progress bar and say whether the relative-error stop
    holds: at least ``min_probes`` probes and every layer's ``stderr / |trace|`` below ``rtol``,
    checked only after complete rounds over the ``n_batches`` batches, so that every batch
    weighs the same in the estimate. The one stop rule of the round-robin estimators."""
    worst = stats.worst_relative_stderr()
    update(worst, 1)
    return stats.n >= min_probes and (k + 1) % n_batches == 0 and worst < rtol


class RunningStats:
    """Mean and variance of per-layer estimates, merged batch-wise (Chan et al.) in float64."""

    def __init__(self, n_layers: int) -> None:
        self.n = 0
        self.mean = torch.zeros(n_layers, dtype=torch.float64)
        self.m2 = torch.zeros(n_layers, dtype=torch.float64)

    def add(self, values: torch.Tensor) -> None:
        """Merge ``values`` of shape (n_new, n_layers)."""
        values = values.detach().to(dtype=torch.float64, device="cpu")
        n_new = values.shape[0]
        mean_new = values.mean(0)
        m2_new = ((values - mean_new) ** 2).sum(0)
        total = self.n + n_new
        delta = mean_new - self.mean
        self.mean = self.mean + delta * (n_new / total)
        self.m2 = self.m2 + m2_new + delta**2 * (self.n * n_new / total)
        self.n = total

    def stderr(self) -> torch.Tensor:
        """Standard error of each layer's mean (``inf`` before two estimates)."""
        if self.n < 2:
            return torch.full_like(self.mean, math.inf)
        return (self.m2 / (self.n - 1) / self.n).sqrt()

    def worst_relative_stderr(self) -> float:
        """The largest ``stderr / |mean|`` over the layers, the stopping criterion."""
        err = self.stderr()
        undefined = torch.where(err == 0, 0.0, math.inf)  # zero trace: exact only if no spread
        rel = torch.where(self.mean != 0, err / self.mean.abs(), undefined)
        return float(rel.max())

    def result(self, names: list[str], weights: list[torch.Tensor]) -> dict[str, LayerTrace]:
        """Layer name -> its :class:`LayerTrace`, in the order of ``names``."""
        err = self.stderr()
        return {
            name: LayerTrace(name, float(self.mean[i]), float(err[i]), int(w.numel()), self.n)
            for i, (name, w) in enumerate(zip(names, weights))
        }
