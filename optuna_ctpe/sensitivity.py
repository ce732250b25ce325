"""Per-layer Hessian traces (Hutchinson) and empirical-Fisher traces of PyTorch models.

HAWQ-V2 (Dong et al., 2020) measures how sensitive a layer is to a weight perturbation ``ΔW`` by
the second-order change of the loss, averaged over directions:
``Ω = Tr̄(H) · ‖ΔW‖²`` with ``Tr̄(H) = Tr(H_W) / n`` the average eigenvalue of the layer's
weight Hessian block (:func:`choice_sensitivity`).

:func:`hutchinson_traces` estimates ``Tr(H_W)`` for every layer at once with Hutchinson's
estimator ``E[vᵀHv] = Tr(H)`` over Rademacher probes ``v``. One Hessian-vector product (autograd
double backward) of the whole network gives an estimate for *all* layers: the block
``v_l · (Hv)_l``. Its expectation is ``Tr(H_ll)``, because the cross terms ``v_l · H_lm v_m``
(``m ≠ l``) have mean zero; they do add variance, so each layer reports a standard error and
the estimator stops once every layer is precise enough. Running one estimator per layer with the
other layers frozen (what a whole-model tool such as PyHessian needs) costs one run per layer.

:func:`empirical_fisher_traces` is a cheaper, always non-negative alternative: the trace of the
empirical Fisher ``mean_i ‖∇ℓ_i‖²`` from per-sample gradients, a Gauss-Newton stand-in for the
Hessian near a minimum.

Both functions evaluate the model in eval mode (batch norm uses its running statistics, dropout
is off, so the loss is a deterministic function of the weights) and leave the model exactly as
they found it: parameters, ``.grad`` fields, ``requires_grad`` flags and train/eval modes.

Requires the ``torch`` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
import contextlib
from dataclasses import dataclass
import math
import numbers
import sys
from typing import Any
import warnings

import torch
from torch import nn


__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LayerTrace",
    "choice_sensitivity",
    "empirical_fisher_traces",
    "hutchinson_traces",
    "hutchinson_traces_from_criterion",
]

#: Module types whose weights are traced when ``layers`` is None.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

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


def hutchinson_traces(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    layers: Layers = None,
    max_probes: int = 200,
    min_probes: int = 10,
    rtol: float = 0.05,
    seed: int = 0,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, LayerTrace]:
    """Per-layer traces of the loss Hessian by Hutchinson's estimator, all layers per HVP.

    Probe ``k`` uses batch ``k mod len(batches)``: the batches are visited round-robin, one
    Rademacher probe per visit, so the estimate is that of the Hessian of the loss averaged
    over the batches, with the batch-to-batch variation included in the standard error. The
    stopping test is only made after complete rounds, so every batch weighs the same (unless
    ``max_probes`` is not a multiple of the number of batches). With a single batch the gradient
    graph is built once and reused by every probe; with several, it is rebuilt at each visit
    (one extra forward and backward pass per probe) instead of holding every batch's graph in
    memory.

    Args:
        model: The network; it is left unchanged.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, twice differentiable in the weights.
        batches: Batches passed to ``loss_fn`` (e.g. ``(inputs, targets)`` tuples); tensors
            inside tuples, lists and dicts are moved to ``device``.
        layers: Which modules' weights to trace: a sequence of module names, a tuple of module
            types, or None for every Conv1d/2d/3d and Linear module (:data:`DEFAULT_LAYER_TYPES`).
        max_probes: Most probes (Hessian-vector products); at least 2.
        min_probes: Fewest probes before the relative-error stop may trigger; at least 2
            (a value above ``max_probes`` just means that all ``max_probes`` run).
        rtol: Stop when every layer's ``stderr / |trace|`` is below it; 0 runs ``max_probes``.
        seed: Seed of the CPU ``torch.Generator`` drawing the probes, so the probes (and, on
            CPU, the result) are the same on every call and every device.
        progress: Show a progress bar (tqdm if installed, else a line on stderr).
        device: Device the batches are moved to; None uses the device of the traced weights
            (the probes always live there).

    Returns:
        Layer name -> :class:`LayerTrace`, in module order.

    Raises:
        ValueError: On a bad numeric argument, empty ``batches``, an unknown layer name, a
            selected module without a weight, a non-scalar or non-finite loss, or a loss that
            does not depend on the weights.
        TypeError: If ``layers`` or the loss has the wrong type.
    """
    _check_probes(max_probes, min_probes, rtol, seed)
    batches = _check_batches(batches)
    names, weights = _select(model, layers)
    dev = weights[0].device if device is None else torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    stats = _RunningStats(len(names))
    with _preserved(model, weights), _Progress("Hutchinson", max_probes, progress) as bar:
        grads: list[torch.Tensor] | None = None
        for k in range(max_probes):
            b = k % len(batches)
            if grads is None or len(batches) > 1:
                grads = None  # free the previous batch's graph before building the next
                grads = _first_gradient(model, loss_fn, batches[b], b, weights, dev)
            probes = [_rademacher(w, generator) for w in weights]
            stats.add(_block_quadratic_forms(grads, weights, probes).unsqueeze(0))
            worst = stats.worst_relative_stderr()
            bar.update(worst)
            if stats.n >= min_probes and (k + 1) % len(batches) == 0 and worst < rtol:
                break
    return stats.result(names, weights)


def hutchinson_traces_from_criterion(
    model: nn.Module,
    criterion: Callable[[torch.Tensor, Any], torch.Tensor],
    loader: Iterable[Any],
    *,
    n_batches: int | None = None,
    **kwargs: Any,
) -> dict[str, LayerTrace]:
    """:func:`hutchinson_traces` for ``(inputs, targets)`` batches and a criterion.

    The loss of a batch is ``criterion(model(inputs), targets)``.

    Args:
        model: The network; it is left unchanged.
        criterion: E.g. ``nn.CrossEntropyLoss()`` (mean reduction).
        loader: Iterable of ``(inputs, targets)`` pairs, e.g. a ``DataLoader``.
        n_batches: Use only the first ``n_batches`` batches of ``loader``; None uses them all
            (they are all held in memory).
        **kwargs: Keyword arguments of :func:`hutchinson_traces`.

    Raises:
        ValueError: If a batch is not an ``(inputs, targets)`` pair, ``n_batches`` is not a
            positive integer, or as :func:`hutchinson_traces`.
    """
    if n_batches is not None and (
        isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1
    ):
        raise ValueError(f"n_batches must be a positive integer or None, got {n_batches!r}.")
    batches = []
    for batch in loader:
        if n_batches is not None and len(batches) == n_batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}."
            )
        batches.append(batch)

    def loss_fn(net: nn.Module, batch: Any) -> torch.Tensor:
        return criterion(net(batch[0]), batch[1])

    return hutchinson_traces(model, loss_fn, batches, **kwargs)


def empirical_fisher_traces(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    layers: Layers = None,
    max_probes: int = 200,
    min_probes: int = 10,
    rtol: float = 0.05,
    seed: int = 0,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, LayerTrace]:
    """Per-layer traces of the empirical Fisher, ``mean_i ‖∇_W ℓ_i‖²`` over samples ``i``.

    Here a "probe" is one sample: each sample's loss is ``loss_fn`` on a one-sample batch (every
    tensor in the batch sliced along its first dimension), its gradient is taken with
    ``torch.func.vmap(grad)`` over ``functional_call`` (falling back, with a warning, to a
    per-sample autograd loop when ``loss_fn`` cannot be vmapped), and the standard error is
    that of the mean across samples. No second derivative is needed, and the estimate is
    never negative, but it approximates the Hessian only where the model fits the data.

    Args:
        model: The network; it is left unchanged.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; on a one-sample batch it must give
            that sample's loss (a mean-reduced loss does).
        batches: Batches of samples: tensors, or tuples/lists/dicts of tensors sharing their
            first (sample) dimension; non-tensor entries are passed unchanged.
        layers: As in :func:`hutchinson_traces`.
        max_probes: Most samples used; at least 2.
        min_probes: Fewest samples before the relative-error stop may trigger; at least 2.
        rtol: Stop after a batch once every layer's ``stderr / |trace|`` is below it.
        seed: Seed of the random order in which the batches are visited (which matters only
            when the estimate stops before using every sample).
        progress: Show a progress bar.
        device: As in :func:`hutchinson_traces`.

    Returns:
        Layer name -> :class:`LayerTrace`, in module order.

    Raises:
        ValueError: As :func:`hutchinson_traces`, and for batches whose tensors disagree on
            the number of samples.
    """
    _check_probes(max_probes, min_probes, rtol, seed)
    batches = _check_batches(batches)
    names, weights = _select(model, layers)
    dev = weights[0].device if device is None else torch.device(device)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    stats = _RunningStats(len(names))
    per_sample = _VmapSquaredNorms(model, loss_fn, names, weights)
    with _preserved(model, weights), _Progress("Fisher", max_probes, progress) as bar:
        for b in order:
            batch = _to_device(batches[b], dev)
            n = min(_n_samples(batch, b), max_probes - stats.n)
            batch = _map_tensors(lambda t, n=n: t[:n], batch)
            stats.add(per_sample(batch, b).double().cpu())
            worst = stats.worst_relative_stderr()
            bar.update(worst, n)
            if stats.n >= max_probes or (stats.n >= min_probes and worst < rtol):
                break
    return stats.result(names, weights)


def choice_sensitivity(mean_trace: float, delta_w_sq_norm: float) -> float:
    """HAWQ-V2's sensitivity ``Ω = Tr̄(H) · ‖ΔW‖²`` of one choice for one layer.

    ``Ω`` is the second-order loss increase ``½ ΔWᵀ H ΔW`` (up to the factor ½) for a
    perturbation spread evenly over the Hessian's eigendirections, so choices of different
    layers are comparable. ``ΔW`` is ``Q_b(W) − W`` for a bit-width (see
    :func:`optuna_ctpe.quantize.quantization_error`) or the removed weights for a width (see
    :func:`optuna_ctpe.width.width_perturbation`).

    Args:
        mean_trace: The layer's :attr:`LayerTrace.mean_trace`.
        delta_w_sq_norm: ``‖ΔW‖²``, non-negative.

    Raises:
        ValueError: If an argument is not finite or ``delta_w_sq_norm`` is negative.
    """
    if not isinstance(mean_trace, numbers.Real) or not math.isfinite(mean_trace):
        raise ValueError(f"mean_trace must be a finite number, got {mean_trace!r}.")
    if (
        not isinstance(delta_w_sq_norm, numbers.Real)
        or not math.isfinite(delta_w_sq_norm)
        or delta_w_sq_norm < 0
    ):
        raise ValueError(
            f"delta_w_sq_norm must be a finite non-negative number, got {delta_w_sq_norm!r}."
        )
    return float(mean_trace) * float(delta_w_sq_norm)


class _RunningStats:
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
        if self.n < 2:
            return torch.full_like(self.mean, math.inf)
        return (self.m2 / (self.n - 1) / self.n).sqrt()

    def worst_relative_stderr(self) -> float:
        err = self.stderr()
        undefined = torch.where(err == 0, 0.0, math.inf)  # zero trace: exact only if no spread
        rel = torch.where(self.mean != 0, err / self.mean.abs(), undefined)
        return float(rel.max())

    def result(self, names: list[str], weights: list[torch.Tensor]) -> dict[str, LayerTrace]:
        err = self.stderr()
        return {
            name: LayerTrace(name, float(self.mean[i]), float(err[i]), int(w.numel()), self.n)
            for i, (name, w) in enumerate(zip(names, weights))
        }


def _first_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    index: int,
    weights: list[torch.Tensor],
    device: torch.device,
) -> list[torch.Tensor]:
    """``∇_W loss`` with its graph kept (``create_graph``) for Hessian-vector products."""
    loss = _checked_loss(loss_fn(model, _to_device(batch, device)), index)
    grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
    # A weight the loss does not use has a zero gradient and a zero Hessian block.
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]


def _block_quadratic_forms(
    grads: list[torch.Tensor], weights: list[torch.Tensor], probes: list[torch.Tensor]
) -> torch.Tensor:
    """``v_l · (Hv)_l`` for every layer ``l`` from one Hessian-vector product."""
    # Only gradients that depend on some weight take part; a constant gradient (loss linear in
    # that weight) contributes nothing to Hv.
    live = [(g, v) for g, v in zip(grads, probes) if g.requires_grad]
    if live:
        hv = torch.autograd.grad(
            [g for g, _ in live],
            weights,
            grad_outputs=[v for _, v in live],
            retain_graph=True,
            allow_unused=True,
        )
    else:
        hv = (None,) * len(weights)
    zero = torch.zeros((), dtype=torch.float64, device=weights[0].device)
    return torch.stack(
        [
            zero if h is None else torch.dot(v.flatten(), h.flatten()).double()
            for v, h in zip(probes, hv)
        ]
    )


def _rademacher(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A ±1 probe shaped like ``weight``, drawn on the CPU generator and moved to its device."""
    v = torch.randint(0, 2, weight.shape, generator=generator, dtype=weight.dtype)
    return v.mul_(2).sub_(1).to(weight.device)


class _VmapSquaredNorms:
    """Per-sample squared gradient norms of the selected weights, shape (n_samples, n_layers)."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, names: list[str], weights: list[torch.Tensor]
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.module = _LossModule(model, loss_fn)
        self.weights = weights
        self.keys = [f"{n}.weight" if n else "weight" for n in names]
        self.use_vmap = True

    def __call__(self, batch: Any, index: int) -> torch.Tensor:
        if self.use_vmap:
            try:
                return self._vmap(batch, index)
            except ValueError:
                raise  # a bad loss, not a vmap limitation
            except Exception as err:  # noqa: BLE001 - any functorch limitation
                warnings.warn(
                    f"per-sample gradients could not be vmapped ({type(err).__name__}: {err}); "
                    "falling back to a slower per-sample loop.",
                    stacklevel=3,
                )
                self.use_vmap = False
        return self._loop(batch, index)

    def _vmap(self, batch: Any, index: int) -> torch.Tensor:
        from torch.func import functional_call
        from torch.func import grad
        from torch.func import vmap

        params = dict(zip(self.keys, (w.detach() for w in self.weights)))

        def squared_norms(p: dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
            def loss(q: dict[str, torch.Tensor]) -> torch.Tensor:
                one = _map_tensors(lambda t: t.unsqueeze(0), sample)
                return functional_call(self.module, _prefixed(q), (one,))

            g = grad(loss)(p)
            return torch.stack([g[k].pow(2).sum() for k in self.keys])

        in_dims = _map_any(lambda x: 0 if isinstance(x, torch.Tensor) else None, batch)
        out = vmap(squared_norms, in_dims=(None, in_dims), chunk_size=8)(params, batch)
        if not torch.isfinite(out).all():
            raise ValueError(f"loss_fn gave a non-finite gradient on batch {index}.")
        return out

    def _loop(self, batch: Any, index: int) -> torch.Tensor:
        rows = []
        for i in range(_n_samples(batch, index)):
            one = _map_tensors(lambda t, i=i: t[i : i + 1], batch)
            loss = _checked_loss(self.loss_fn(self.model, one), index)
            grads = torch.autograd.grad(loss, self.weights, allow_unused=True)
            rows.append(
                torch.stack(
                    [
                        torch.zeros((), device=w.device) if g is None else g.pow(2).sum()
                        for g, w in zip(grads, self.weights)
                    ]
                )
            )
        return torch.stack(rows)


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can swap its weights."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _prefixed(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in params.items()}


def _select(model: nn.Module, layers: Layers) -> tuple[list[str], list[torch.Tensor]]:
    """Names and weight parameters of the selected layers, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    modules = dict(model.named_modules())
    if (
        layers is None
        or isinstance(layers, tuple)
        and layers
        and all(isinstance(t, type) for t in layers)
    ):
        types = DEFAULT_LAYER_TYPES if layers is None else layers
        names = [n for n, m in modules.items() if isinstance(m, types) and _weight(m) is not None]
        if not names:
            raise ValueError(f"the model has no layer of types {[t.__name__ for t in types]}.")
    elif isinstance(layers, Sequence) and not isinstance(layers, str):
        if not layers or not all(isinstance(n, str) for n in layers):
            raise ValueError(
                f"layers must be a non-empty sequence of module names, got {layers!r}."
            )
        unknown = [n for n in layers if n not in modules]
        if unknown:
            raise ValueError(f"layers names modules the model lacks: {unknown}.")
        no_weight = [n for n in layers if _weight(modules[n]) is None]
        if no_weight:
            raise ValueError(f"layers names modules without a weight parameter: {no_weight}.")
        chosen = set(layers)
        names = [n for n in modules if n in chosen]
    else:
        raise TypeError(
            "layers must be None, a sequence of module names or a tuple of module types, "
            f"got {layers!r}."
        )
    return names, [_weight(modules[n]) for n in names]  # type: ignore[misc]


def _weight(module: nn.Module) -> torch.Tensor | None:
    w = getattr(module, "weight", None)
    return w if isinstance(w, nn.Parameter) else None


def _check_probes(max_probes: Any, min_probes: Any, rtol: Any, seed: Any) -> None:
    def is_int(x: Any) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if not is_int(max_probes) or max_probes < 2:
        raise ValueError(f"max_probes must be an integer >= 2, got {max_probes!r}.")
    if not is_int(min_probes) or min_probes < 2:
        raise ValueError(f"min_probes must be an integer >= 2, got {min_probes!r}.")
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0 <= rtol < math.inf:
        raise ValueError(f"rtol must be a finite number >= 0, got {rtol!r}.")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")


def _check_batches(batches: Iterable[Any]) -> list[Any]:
    if isinstance(batches, torch.Tensor):
        raise TypeError(
            "batches must be an iterable of batches, not a single tensor; wrap it in a list."
        )
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: at least one batch is needed.")
    return batches


def _checked_loss(loss: Any, index: int) -> torch.Tensor:
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
def _preserved(model: nn.Module, weights: list[torch.Tensor]) -> Iterator[None]:
    """Eval mode and differentiable ``weights`` inside; flags, grads and modes restored after."""
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        model.eval()
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad


def _map_any(fn: Callable[[Any], Any], batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_any(fn, x) for x in batch)
    if isinstance(batch, dict):
        return {k: _map_any(fn, v) for k, v in batch.items()}
    return fn(batch)


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (tuple, list)):
        for x in batch:
            yield from _tensors(x)
    elif isinstance(batch, dict):
        for x in batch.values():
            yield from _tensors(x)


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> Any:
    return _map_any(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, batch)


def _to_device(batch: Any, device: torch.device) -> Any:
    return _map_tensors(lambda t: t.to(device), batch)


def _n_samples(batch: Any, index: int) -> int:
    sizes = {t.shape[0] if t.dim() else -1 for t in _tensors(batch)}
    if not sizes or -1 in sizes:
        raise ValueError(
            f"batch {index} must hold tensors with a sample dimension, got {type(batch).__name__}."
        )
    if len(sizes) > 1:
        raise ValueError(
            f"the tensors of batch {index} disagree on the number of samples: {sorted(sizes)}."
        )
    return sizes.pop()


class _Progress:
    """tqdm bar if tqdm is installed, else a single rewritten line on stderr; no-op if disabled."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label = label
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.bar: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.bar = None
            else:
                self.bar = tqdm(total=self.total, desc=self.label, unit="probe", file=sys.stderr)
        return self

    def update(self, worst_relative_stderr: float, n: int = 1) -> None:
        if not self.enabled:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(worst_rel_stderr=f"{worst_relative_stderr:.3g}", refresh=False)
        else:
            print(
                f"\r{self.label}: {self.done}/{self.total} probes, "
                f"worst relative stderr {worst_relative_stderr:.3g}",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)
