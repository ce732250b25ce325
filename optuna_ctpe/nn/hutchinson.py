"""Per-layer Hessian traces by Hutchinson's estimator, every layer from one Hessian-vector product.

Hutchinson's estimator ``E[vᵀHv] = Tr(H)`` over Rademacher probes ``v``: one Hessian-vector
product (autograd double backward) of the whole network gives an estimate for *all* layers, the
block ``v_l · (Hv)_l``. Its expectation is ``Tr(H_ll)``, because the cross terms
``v_l · H_lm v_m`` (``m ≠ l``) have mean zero; they do add variance, so each layer reports a
standard error and the estimator stops once every layer is precise enough. Running one estimator
per layer with the other layers frozen (what a whole-model tool such as PyHessian needs) costs one
run per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from optuna_ctpe._validation import check_integer
from optuna_ctpe.nn._batches import to_device
from optuna_ctpe.nn.traces import check_second_order
from optuna_ctpe.nn.traces import checked_loss
from optuna_ctpe.nn.traces import LayerTrace
from optuna_ctpe.nn.traces import Layers
from optuna_ctpe.nn.traces import LossFn
from optuna_ctpe.nn.traces import progress_bar
from optuna_ctpe.nn.traces import RunningStats
from optuna_ctpe.nn.traces import setup
from optuna_ctpe.nn.traces import stop_after_round
from optuna_ctpe.nn.traces import traced
from optuna_ctpe.nn.traces import twice_differentiable


__all__ = ["hutchinson_traces", "hutchinson_traces_from_criterion"]


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
            types, or None for every supported layer
            (:func:`optuna_ctpe.nn.layers.model_layers`: Conv, ConvTranspose, Linear, Conv1D and
            ``nn.MultiheadAttention`` projections, named as :mod:`optuna_ctpe.nn.layers` says).
        max_probes: Most probes (Hessian-vector products); at least 2.
        min_probes: Fewest probes before the relative-error stop may trigger; at least 2
            (a value above ``max_probes`` just means that all ``max_probes`` run).
        rtol: Stop when every layer's ``stderr / |trace|`` is below it; 0 runs ``max_probes``.
        seed: Seed of the CPU ``torch.Generator`` drawing the probes, so the probes (and, on
            CPU, the result) are the same on every call and every device.
        progress: Show a tqdm progress bar on stderr.
        device: Device the batches are moved to; None uses the device of the traced weights
            (the probes always live there).

    Returns:
        Layer name -> :class:`~optuna_ctpe.nn.traces.LayerTrace`, in module order.

    Raises:
        ValueError: On a bad numeric argument, empty ``batches``, an unknown layer name, a
            selected module without a weight, a non-scalar or non-finite loss, or a loss that
            does not depend on the weights.
        RuntimeError: If the loss is not twice differentiable (an op without a second
            derivative), naming the op and what to use instead.
        TypeError: If ``layers`` or the loss has the wrong type.
    """
    run = setup(model, batches, layers, max_probes, min_probes, rtol, seed, device)
    weights = run.weights
    generator = torch.Generator().manual_seed(seed)
    stats = RunningStats(len(run.names))
    n_batches = len(run.batches)
    with traced(model, weights), progress_bar("Hutchinson", max_probes, progress) as update:
        grads: list[torch.Tensor] | None = None
        for k in range(max_probes):
            b = k % n_batches
            if grads is None or n_batches > 1:
                grads = None  # free the previous batch's graph before building the next
                grads = _first_gradient(model, loss_fn, run.batches[b], b, weights, run.device)
            probes = [rademacher(w, generator) for w in weights]
            with twice_differentiable():
                stats.add(block_quadratic_forms(grads, weights, probes).unsqueeze(0))
            if stop_after_round(stats, k, n_batches, min_probes, rtol, update):
                break
    return stats.result(run.names, weights)


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
    if n_batches is not None:
        check_integer(n_batches, "n_batches", minimum=1, extra="or None")
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


def _first_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    index: int,
    weights: list[torch.Tensor],
    device: torch.device,
) -> list[torch.Tensor]:
    """``∇_W loss`` with its graph kept (``create_graph``) for Hessian-vector products."""
    loss = checked_loss(loss_fn(model, to_device(batch, device)), index)
    grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
    check_second_order([g for g in grads if g is not None])
    # A weight the loss does not use has a zero gradient and a zero Hessian block.
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]


def block_quadratic_forms(
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


def rademacher(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A ±1 probe shaped like ``weight``, drawn on the CPU generator and moved to its device."""
    v = torch.randint(0, 2, weight.shape, generator=generator, dtype=weight.dtype)
    return v.mul_(2).sub_(1).to(weight.device)
