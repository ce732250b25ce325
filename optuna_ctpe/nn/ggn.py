"""Per-layer traces of the generalised Gauss-Newton matrix, never negative, one VJP per probe.

The loss Hessian splits, through the model's outputs ``z``, into ``Jᵀ H_z J`` (the generalised
Gauss-Newton matrix ``G``, positive semi-definite when the loss is convex in ``z``) plus the
model's own curvature weighted by the loss gradient, which is small near a minimum and is what
makes Hutchinson estimates of ``H`` negative. The estimator factors the small output-space
Hessian once per batch, ``H_z = S Sᵀ``, and draws ``u`` in its range: ``g = Jᵀ S u`` is one
vector-Jacobian product (a backward pass, no double backward), and

    E_u ‖g_l‖² = Tr(J_lᵀ S Sᵀ J_l) = Tr(G_ll)

for every layer ``l`` at once. Each estimate is a squared norm, so no trace is ever negative, and
unlike joint Hutchinson probes there are no cross-layer terms: layer ``l``'s estimate depends on
no other layer's weights.

In a piecewise-linear network (ReLU or ReLU6, max-pooling, eval-mode batch norm: the usual CNN)
the outputs are piecewise linear in each layer's weight alone, so the model's own curvature has
no diagonal block and ``Tr(G_ll) = Tr(H_ll)`` exactly: there the GGN estimates HAWQ-V2's
Hessian traces without bias and with far less noise. With smooth activations (GELU, softmax
attention, layer norm) the two differ; :mod:`optuna_ctpe.nn.split` estimates the Hessian then.

What a user must provide: a ``loss_fn(model, batch)`` that calls ``model(...)`` exactly once and
depends on the weights only through that call's output (``criterion(model(x), y)``: cross-entropy,
mean squared error and other losses convex in the outputs). A weight penalty inside ``loss_fn``
is not part of the GGN, and a loss linear in the outputs has a zero GGN: for ``1 - e·e₀`` on a
model that normalises its own output ``e``, write the equal ``‖e - e₀‖² / 2``, else use
``estimator="hutchinson"``.

How large the outputs may be: a loss that is a mean or sum over samples (the usual criterion)
has an output-space Hessian made of one block per sample, recovered from as many
Hessian-vector products as a sample has output numbers, verified, and factored block by block
(:mod:`optuna_ctpe.nn._output_hessian`). Then a sample may have at most :data:`MAX_OUTPUTS`
output numbers the loss is curved in, and a batch's blocks at most :data:`MAX_BLOCK_NUMBERS`
numbers: a 384-wide embedding on batches of 100 samples, or 1,000 classes on batches of 16. A
loss that couples the samples (a batch contrastive loss, a loss normalised over the batch), or
outputs without a shared batch dimension, fall back to the dense Hessian, for at most
:data:`MAX_OUTPUTS` numbers per batch; beyond that the estimator raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Iterator
import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from optuna_ctpe.nn._batches import map_tensors
from optuna_ctpe.nn._batches import to_device
from optuna_ctpe.nn._output_hessian import MAX_BLOCK_NUMBERS
from optuna_ctpe.nn._output_hessian import MAX_OUTPUTS
from optuna_ctpe.nn._output_hessian import output_hessian_factor
from optuna_ctpe.nn._output_hessian import OutputHessianFactor
from optuna_ctpe.nn.traces import checked_loss
from optuna_ctpe.nn.traces import LayerTrace
from optuna_ctpe.nn.traces import Layers
from optuna_ctpe.nn.traces import LossFn
from optuna_ctpe.nn.traces import progress_bar
from optuna_ctpe.nn.traces import RunningStats
from optuna_ctpe.nn.traces import setup
from optuna_ctpe.nn.traces import stop_after_round
from optuna_ctpe.nn.traces import traced


__all__ = ["MAX_BLOCK_NUMBERS", "MAX_OUTPUTS", "ggn_misfit", "ggn_traces"]


def ggn_traces(
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
    """Per-layer traces of the generalised Gauss-Newton matrix, all layers per probe.

    The arguments and the batch schedule (probe ``k`` on batch ``k mod len(batches)``, the stop
    after complete rounds) are those of :func:`~optuna_ctpe.nn.hutchinson.hutchinson_traces`;
    a probe is one vector-Jacobian product instead of one Hessian-vector product. The module
    docstring says what ``loss_fn`` must be.

    Args:
        model: The network; it is left unchanged.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` that calls ``model`` once and
            depends on the weights only through its output (a tensor, or tuples, lists and
            dicts of tensors), twice differentiable in that output.
        batches: Batches passed to ``loss_fn``.
        layers: As in :func:`~optuna_ctpe.nn.hutchinson.hutchinson_traces`.
        max_probes: Most probes; at least 2.
        min_probes: Fewest probes before the relative-error stop may trigger; at least 2.
        rtol: Stop when every layer's ``stderr / trace`` is below it; 0 runs ``max_probes``.
        seed: Seed of the CPU generator drawing the probes.
        progress: Show a tqdm progress bar on stderr.
        device: As in :func:`~optuna_ctpe.nn.hutchinson.hutchinson_traces`.

    Returns:
        Layer name -> :class:`~optuna_ctpe.nn.traces.LayerTrace`, in module order; every
        trace is >= 0.

    Raises:
        ValueError: As :func:`~optuna_ctpe.nn.hutchinson.hutchinson_traces`; if ``loss_fn``
            does not call ``model`` exactly once, its outputs are too large (the module
            docstring says how large they may be), or the loss has no curvature in them on any
            batch (a zero GGN).

    Example:
        .. code-block:: python

            import torch
            from torch import nn
            from optuna_ctpe.nn.ggn import ggn_traces

            model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
            batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))

            def loss_fn(net, b):
                return nn.functional.cross_entropy(net(b[0]), b[1])

            traces = ggn_traces(model, loss_fn, [batch], max_probes=50, rtol=0)
            {name: t.trace for name, t in traces.items()}  # {"0": ..., "2": ...}, all >= 0
    """
    run = setup(model, batches, layers, max_probes, min_probes, rtol, seed, device)
    generator = torch.Generator().manual_seed(seed)
    stats = RunningStats(len(run.names))
    n_batches = len(run.batches)
    factors: dict[int, OutputHessianFactor] = {}  # batch -> S, deterministic: computed once
    curved = False
    with traced(model, run.weights), progress_bar("GGN", max_probes, progress) as update:
        outputs: list[torch.Tensor] | None = None
        for k in range(max_probes):
            b = k % n_batches
            if outputs is None or n_batches > 1:
                outputs = None  # free the previous batch's graph before building the next
                batch = to_device(run.batches[b], run.device)
                outputs, leaves, loss = split_at_outputs(model, loss_fn, batch, b)
                if b not in factors:
                    factors[b] = output_hessian_factor(loss, leaves, b)
            factor = factors[b]
            curved = curved or factor.rank > 0
            stats.add(squared_vjp_norms(outputs, run.weights, factor, generator).unsqueeze(0))
            if stop_after_round(stats, k, n_batches, min_probes, rtol, update):
                break
    if not curved:
        raise ValueError(
            "the loss has no curvature in the model's outputs on any batch, so its "
            "Gauss-Newton matrix is zero (a loss linear in the outputs, e.g. 1 - e·e0 on unit "
            "vectors e, which equals |e - e0|²/2); use estimator='hutchinson'."
        )
    return stats.result(run.names, run.weights)


def ggn_misfit(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    layers: Layers = None,
    device: torch.device | str | None = None,
) -> str | None:
    """Why :func:`ggn_traces` does not fit ``loss_fn``, judged on the first batch; None if it
    fits: the loss calls the model once, is curved in its outputs, is convex there (no negative
    output-space eigenvalue) and its output Hessian can be formed. Costs one forward pass and
    the output-space Hessian-vector products of that batch.

    Args:
        model, loss_fn, batches, layers, device: As in :func:`ggn_traces`.

    Raises:
        ValueError: If ``batches`` is empty or ``layers`` names no supported layer.
    """
    run = setup(model, batches, layers, 2, 2, 0.0, 0, device)
    with traced(model, run.weights), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            batch = to_device(run.batches[0], run.device)
            _, leaves, loss = split_at_outputs(model, loss_fn, batch, 0)
            factor = output_hessian_factor(loss, leaves, 0)
        except ValueError as e:
            return str(e)
    concave = [w for w in caught if "not convex" in str(w.message)]
    if concave:
        return str(concave[0].message)
    if factor.rank == 0:
        return "the loss has no curvature in the model's outputs (a zero Gauss-Newton matrix)"
    return None


@contextlib.contextmanager
def _captured_outputs(model: nn.Module) -> Iterator[list[Any]]:
    """Replace the output of every call of ``model`` by leaves; yield ``[(outputs, leaves)]``."""
    calls: list[Any] = []

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        originals: list[torch.Tensor] = []
        leaves: list[torch.Tensor] = []

        def cut(t: torch.Tensor) -> torch.Tensor:
            if not t.is_floating_point() or not t.requires_grad:
                return t
            leaf = t.detach().requires_grad_(True)
            originals.append(t)
            leaves.append(leaf)
            return leaf

        replaced = map_tensors(cut, output)
        calls.append((originals, leaves))
        return replaced

    handle = model.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def split_at_outputs(
    model: nn.Module, loss_fn: LossFn, batch: Any, index: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The model's outputs (graph to the weights), their leaf copies and the loss of the leaves."""
    with _captured_outputs(model) as calls:
        loss = loss_fn(model, batch)
    if len(calls) != 1:
        raise ValueError(
            f"the GGN estimator needs loss_fn to call the model exactly once, but it called it "
            f"{len(calls)} times on batch {index}."
        )
    outputs, leaves = calls[0]
    if not leaves:
        raise ValueError(f"the model's output on batch {index} does not depend on the weights.")
    return outputs, leaves, checked_loss(loss, index)


def squared_vjp_norms(
    outputs: list[torch.Tensor],
    weights: list[torch.Tensor],
    factor: OutputHessianFactor,
    generator: torch.Generator,
) -> torch.Tensor:
    """``‖(Jᵀ S u)_l‖²`` for every layer ``l``, one Rademacher ``u_n`` per block of ``S``.

    The blocks' draws are independent, so ``E[S u uᵀ Sᵀ] = blockdiag(S_n S_nᵀ)`` and the
    estimate of ``Tr(G_ll)`` stays unbiased.
    """
    if factor.rank == 0:
        return torch.zeros(len(weights), dtype=torch.float64)
    n = factor.blocks.shape[0]
    u = torch.randint(0, 2, (n, factor.rank), generator=generator, dtype=torch.float64)
    direction = torch.einsum("ncr,nr->nc", factor.blocks, 2 * u - 1)  # (samples, numbers)
    covered = [outputs[i] for i in factor.outputs]
    parts = []
    start = 0
    for out in covered:
        count = out.numel() // n
        parts.append(direction[:, start : start + count].reshape(out.shape).to(out))
        start += count
    grads = torch.autograd.grad(
        covered, weights, grad_outputs=parts, retain_graph=True, allow_unused=True
    )
    return torch.stack(
        [
            torch.zeros((), dtype=torch.float64) if g is None else g.double().pow(2).sum().cpu()
            for g in grads
        ]
    )
