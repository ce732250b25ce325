"""Per-layer Hessian traces as Gauss-Newton plus residual, each part by its best estimator.

Through the model's outputs ``z`` the loss Hessian splits exactly into ``H = G + R``:
``G = Jᵀ H_z J``, the generalised Gauss-Newton matrix, and ``R = Σ_k (∂ℓ/∂z_k) ∇²_W z_k``, the
model's own curvature weighted by the loss gradient. Joint Hutchinson probes of ``H`` carry the
cross-layer and off-diagonal terms of both; here ``Tr(G_ll)`` comes from the GGN estimator (one
vector-Jacobian product, no cross-layer terms, :mod:`optuna_ctpe.nn.ggn`) and ``Tr(R_ll)`` from a
joint Hutchinson probe of ``R`` alone: a Hessian-vector product of ``Jᵀ g_z`` with the output
gradient ``g_z`` held fixed, which costs what a Hessian-vector product of the loss costs. Both
parts are unbiased, so their sum is an unbiased estimate of ``Tr(H_ll)``; ``R`` is small near a
minimum, and so is the noise it adds. The GGN part acts as a control variate for Hutchinson's.
In a piecewise-linear network (ReLU CNNs) ``R`` has no diagonal block, so the residual part
only adds noise there and :func:`~optuna_ctpe.nn.ggn.ggn_traces` alone is the better
estimator; this one is for smooth networks, where the GGN is biased.

``loss_fn`` must be as :mod:`optuna_ctpe.nn.ggn` requires (one call of the model, the weights
reached only through its output, outputs no larger than the GGN takes); unlike the GGN, a loss
linear in the outputs is fine (``G = 0``, ``H = R``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from optuna_ctpe.nn._batches import to_device
from optuna_ctpe.nn._output_hessian import output_hessian_factor
from optuna_ctpe.nn._output_hessian import OutputHessianFactor
from optuna_ctpe.nn.ggn import split_at_outputs
from optuna_ctpe.nn.ggn import squared_vjp_norms
from optuna_ctpe.nn.hutchinson import block_quadratic_forms
from optuna_ctpe.nn.hutchinson import rademacher
from optuna_ctpe.nn.traces import check_second_order
from optuna_ctpe.nn.traces import LayerTrace
from optuna_ctpe.nn.traces import Layers
from optuna_ctpe.nn.traces import LossFn
from optuna_ctpe.nn.traces import progress_bar
from optuna_ctpe.nn.traces import RunningStats
from optuna_ctpe.nn.traces import setup
from optuna_ctpe.nn.traces import stop_after_round
from optuna_ctpe.nn.traces import traced
from optuna_ctpe.nn.traces import twice_differentiable


__all__ = ["split_traces"]


def split_traces(
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
    """Per-layer Hessian traces, ``Tr(G_ll) + Tr(R_ll)``, each part estimated on its own.

    A probe is one GGN probe and one Hutchinson probe of the residual (about 1.3 Hessian-vector
    products); its estimate is their sum, and the standard error is that of the sum. The
    arguments and the batch schedule are those of
    :func:`~optuna_ctpe.nn.hutchinson.hutchinson_traces`; ``loss_fn`` must be as the module
    docstring says.

    Args:
        model: The network; it is left unchanged.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` that calls ``model`` once and
            depends on the weights only through its output.
        batches: Batches passed to ``loss_fn``.
        layers: As in :func:`~optuna_ctpe.nn.hutchinson.hutchinson_traces`.
        max_probes: Most probes; at least 2.
        min_probes: Fewest probes before the relative-error stop may trigger; at least 2.
        rtol: Stop when every layer's ``stderr / |trace|`` is below it; 0 runs ``max_probes``.
        seed: Seed of the CPU generator drawing both parts' probes.
        progress: Show a tqdm progress bar on stderr.
        device: As in :func:`~optuna_ctpe.nn.hutchinson.hutchinson_traces`.

    Returns:
        Layer name -> :class:`~optuna_ctpe.nn.traces.LayerTrace`, in module order.

    Raises:
        ValueError: As :func:`~optuna_ctpe.nn.ggn.ggn_traces`, except for a loss linear in the
            outputs, which is allowed.
        RuntimeError: If the model is not twice differentiable, as Hutchinson's estimator.

    Example:
        .. code-block:: python

            import torch
            from torch import nn
            from optuna_ctpe.nn.split import split_traces

            model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
            batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))

            def loss_fn(net, b):
                return nn.functional.cross_entropy(net(b[0]), b[1])

            traces = split_traces(model, loss_fn, [batch], max_probes=50, rtol=0)
    """
    run = setup(model, batches, layers, max_probes, min_probes, rtol, seed, device)
    weights = run.weights
    generator = torch.Generator().manual_seed(seed)
    stats = RunningStats(len(run.names))
    n_batches = len(run.batches)
    factors: dict[int, OutputHessianFactor] = {}
    with traced(model, weights), progress_bar("GGN + residual", max_probes, progress) as update:
        outputs: list[torch.Tensor] | None = None
        residual_grads: list[torch.Tensor] = []
        for k in range(max_probes):
            b = k % n_batches
            if outputs is None or n_batches > 1:
                outputs = None  # free the previous batch's graph before building the next
                batch = to_device(run.batches[b], run.device)
                outputs, leaves, loss = split_at_outputs(model, loss_fn, batch, b)
                residual_grads = _residual_gradient(outputs, leaves, loss, weights)
                if b not in factors:
                    factors[b] = output_hessian_factor(loss, leaves, b)
            gauss_newton = squared_vjp_norms(outputs, weights, factors[b], generator)
            probes = [rademacher(w, generator) for w in weights]
            with twice_differentiable():
                residual = block_quadratic_forms(residual_grads, weights, probes)
            stats.add((gauss_newton + residual.cpu()).unsqueeze(0))
            if stop_after_round(stats, k, n_batches, min_probes, rtol, update):
                break
    return stats.result(run.names, weights)


def _residual_gradient(
    outputs: list[torch.Tensor],
    leaves: list[torch.Tensor],
    loss: torch.Tensor,
    weights: list[torch.Tensor],
) -> list[torch.Tensor]:
    """``Jᵀ g_z`` with ``g_z = ∂loss/∂z`` held constant, its graph kept: its Hessian-vector
    products are ``R v``, the curvature of the model alone (the GGN's is left out)."""
    g_z = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
    used = [(z, g) for z, g in zip(outputs, g_z) if g is not None]
    grads = torch.autograd.grad(
        [z for z, _ in used],
        weights,
        grad_outputs=[g.detach() for _, g in used],
        create_graph=True,
        allow_unused=True,
    )
    check_second_order([g for g in grads if g is not None])
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]
