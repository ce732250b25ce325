"""Per-layer traces of the empirical Fisher, ``mean_i ‖∇_W ℓ_i‖²``, from per-sample gradients.

A cheaper, always non-negative alternative to the Hessian trace: a Gauss-Newton stand-in for the
Hessian near a minimum. Per-sample gradients come from ``torch.func.vmap(grad)`` over
``functional_call``, or, when ``loss_fn`` cannot be vmapped, from a per-sample autograd loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
import warnings

import torch
from torch import nn

from optuna_ctpe.nn._batches import map_any
from optuna_ctpe.nn._batches import map_tensors
from optuna_ctpe.nn._batches import n_samples
from optuna_ctpe.nn._batches import to_device
from optuna_ctpe.nn.traces import checked_loss
from optuna_ctpe.nn.traces import LayerTrace
from optuna_ctpe.nn.traces import Layers
from optuna_ctpe.nn.traces import LossFn
from optuna_ctpe.nn.traces import progress_bar
from optuna_ctpe.nn.traces import RunningStats
from optuna_ctpe.nn.traces import setup
from optuna_ctpe.nn.traces import traced


__all__ = ["empirical_fisher_traces"]


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

    The arguments are those of :func:`optuna_ctpe.nn.hutchinson.hutchinson_traces` (a
    deliberate parallel: the two estimators are interchangeable), read per sample:

    Args:
        model: The network; it is left unchanged.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; on a one-sample batch it must give
            that sample's loss (a mean-reduced loss does).
        batches: Batches of samples: tensors, or tuples/lists/dicts of tensors sharing their
            first (sample) dimension; non-tensor entries are passed unchanged.
        layers: As in :func:`~optuna_ctpe.nn.hutchinson.hutchinson_traces`.
        max_probes: Most samples used; at least 2.
        min_probes: Fewest samples before the relative-error stop may trigger; at least 2.
        rtol: Stop after a batch once every layer's ``stderr / |trace|`` is below it.
        seed: Seed of the random order in which the batches are visited (which matters only
            when the estimate stops before using every sample).
        progress: Show a tqdm progress bar on stderr.
        device: As in :func:`~optuna_ctpe.nn.hutchinson.hutchinson_traces`.

    Returns:
        Layer name -> :class:`~optuna_ctpe.nn.traces.LayerTrace`, in module order.

    Raises:
        ValueError: As :func:`~optuna_ctpe.nn.hutchinson.hutchinson_traces`, and for batches
            whose tensors disagree on the number of samples.
    """
    run = setup(model, batches, layers, max_probes, min_probes, rtol, seed, device)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(run.batches), generator=generator).tolist()
    stats = RunningStats(len(run.names))
    per_sample = _SquaredGradientNorms(model, loss_fn, run.param_names, run.weights)
    with traced(model, run.weights), progress_bar("Fisher", max_probes, progress) as update:
        for b in order:
            batch = to_device(run.batches[b], run.device)
            n = min(n_samples(batch, b), max_probes - stats.n)
            batch = map_tensors(lambda t, n=n: t[:n], batch)
            stats.add(per_sample(batch, b).double().cpu())
            worst = stats.worst_relative_stderr()
            update(worst, n)
            if stats.n >= max_probes or (stats.n >= min_probes and worst < rtol):
                break
    return stats.result(run.names, run.weights)


class _SquaredGradientNorms:
    """Per-sample squared gradient norms of the selected weights, shape (n_samples, n_layers)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        param_names: list[str],
        weights: list[torch.Tensor],
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.module = _LossModule(model, loss_fn)
        self.weights = weights
        # Parameter names, as functional_call swaps them (a tied tensor under one of its names).
        self.keys = param_names
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
                one = map_tensors(lambda t: t.unsqueeze(0), sample)
                return functional_call(self.module, _prefixed(q), (one,))

            g = grad(loss)(p)
            return torch.stack([g[k].pow(2).sum() for k in self.keys])

        in_dims = map_any(lambda x: 0 if isinstance(x, torch.Tensor) else None, batch)
        out = vmap(squared_norms, in_dims=(None, in_dims), chunk_size=8)(params, batch)
        if not torch.isfinite(out).all():
            raise ValueError(f"loss_fn gave a non-finite gradient on batch {index}.")
        return out

    def _loop(self, batch: Any, index: int) -> torch.Tensor:
        rows = []
        for i in range(n_samples(batch, index)):
            one = map_tensors(lambda t, i=i: t[i : i + 1], batch)
            loss = checked_loss(self.loss_fn(self.model, one), index)
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
