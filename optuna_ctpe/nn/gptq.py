"""GPTQ: error-correcting rounding of a layer's weight on calibration inputs.

Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323). For a layer computing
``W X`` on inputs ``X`` (one column per input vector), GPTQ rounds the columns of ``W`` one at a
time and, after each, moves the rounding error onto the columns not yet rounded so that
``‖W X − Q X‖²`` stays small: the Optimal Brain Surgeon update (their Eq. 2-3) with the
inverse Hessian ``H⁻¹`` of ``‖W X − Q X‖²``, ``H = 2 X Xᵀ`` (Section 3), taken in a fixed column
order from the upper Cholesky factor of ``H⁻¹`` (Section 3, "Step 3: Cholesky reformulation") and
applied lazily in blocks of ``block_size`` columns (Section 3, "Step 2: lazy batch-updates").
:func:`gptq_rows` is their Algorithm 1.

What this implementation decides where the paper or its reference code leaves room:

* ``H`` is ``2 X Xᵀ / N`` over all ``N`` calibration input vectors, accumulated batch by batch
  (:class:`InputHessian`: one ``n × n`` float32 sum and a count per layer, whatever the data
  size), from the *full-precision* model in one pass for every layer
  (:func:`collect_hessians`): a search mixes formats freely per trial, so no layer's inputs
  may depend on another layer's format.
* Damping: ``λ = percdamp × mean(diag H)`` added to the diagonal (Section 4, "1% of the average
  diagonal value"); the Cholesky factorisations run in float64, the sweep in float32.
* An input that is 0 on every calibration vector ("dead", ``H_ii = 0``) gets ``H_ii = 1``: its
  column is then rounded to nearest and exchanges no error with the others. (The reference
  code sets such columns to 0; that changes the layer on inputs calibration did not show.)
* Grids: a per-channel grid is fitted once on the whole row before the sweep (as the reference
  code does); a group's grid is fitted when the sweep reaches the group's first column, on the
  group's weights as updated by every column rounded before (the reference code omits the
  current block's pending update there, which makes its grids depend on the block size).
* Activation order (``act_order``, the reference's ``--act-order``): columns are swept by
  decreasing ``H_ii``. With groups, the groups stay the contiguous input ranges of the format
  (what ``MatMulNBits`` and a packed file store, no permutation index) and their grids are
  fitted on the unquantized weight before the sweep: the reference code's ``static_groups``.

Layers: ``nn.Linear``, Hugging Face ``Conv1D`` and ungrouped ``nn.Conv1d``/``nn.Conv2d``, whose
input vectors are the unfolded patches (:func:`torch.nn.functional.unfold`, padding mode and
dilation honoured) matching the weight's ``(out, in × kernel)`` rows. Other layers
(embeddings, which have no input vectors, grouped and 3-D convolutions, transposed
convolutions, ``nn.MultiheadAttention``'s projection parameters) have no ``H`` here:
:func:`gptq_unsupported` says why, and :mod:`optuna_ctpe.nn.formats` rounds them to nearest
on the same grid with a :class:`~optuna_ctpe.space.formats.FormatFallbackWarning`.

Requires the ``torch`` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from optuna_ctpe._validation import check_integer
from optuna_ctpe._validation import check_real
from optuna_ctpe.nn.grids import fit_grid
from optuna_ctpe.nn.grids import fit_rows
from optuna_ctpe.nn.grids import GridFit
from optuna_ctpe.nn.grids import round_to_grid
from optuna_ctpe.nn.layers import eval_mode
from optuna_ctpe.nn.layers import is_hf_conv1d
from optuna_ctpe.nn.layers import LayerWeight
from optuna_ctpe.space.formats import WeightFormat


__all__ = [
    "GPTQSettings",
    "HessianFactor",
    "InputHessian",
    "collect_hessians",
    "gptq_rows",
    "gptq_unsupported",
    "hessian_factor",
    "layer_input_rows",
]


@dataclass(frozen=True)
class GPTQSettings:
    """How GPTQ runs (the same for every layer and format of a search).

    Attributes:
        percdamp: Damping as a fraction of the mean diagonal of ``H``, a number > 0 (0.01 as
            in the paper).
        block_size: Columns per lazy block update, an integer >= 1 (128 as in the paper).
        act_order: Sweep columns by decreasing ``H_ii`` (static groups; see the module
            docstring).
    """

    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = False

    def __post_init__(self) -> None:
        check_real(self.percdamp, "percdamp", minimum=0.0, open_minimum=True)
        check_integer(self.block_size, "block_size", minimum=1)
        if not isinstance(self.act_order, bool):
            raise ValueError(f"act_order must be a bool, got {self.act_order!r}.")


class InputHessian:
    """``H = 2 X Xᵀ / N`` of one layer's input vectors, accumulated batch by batch.

    Args:
        n_inputs: Inputs per vector (the weight's row length).
        device: Where the running sum lives (the layer's device).
    """

    def __init__(self, n_inputs: int, device: torch.device | str = "cpu") -> None:
        n_inputs = check_integer(n_inputs, "n_inputs", minimum=1)
        self.sum = torch.zeros(n_inputs, n_inputs, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the input vectors ``x``, a ``(vectors, n_inputs)`` matrix."""
        x = x.detach().to(self.sum.device, torch.float32)
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    def matrix(self) -> torch.Tensor:
        """``2 X Xᵀ / N`` in float64.

        Raises:
            ValueError: If no input vector was added.
        """
        if self.count == 0:
            raise ValueError("no calibration input reached this layer: H is undefined.")
        return self.sum.double() * (2.0 / self.count)


def gptq_unsupported(layer: LayerWeight) -> str | None:
    """Why GPTQ has no input vectors for ``layer``, or None when it has (see the module
    docstring)."""
    module = layer.module
    if layer.attr != "weight":
        return f"{type(module).__name__}.{layer.attr} is applied inside its module"
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return None
    if isinstance(module, nn.Embedding):
        return "an embedding looks rows up: it has no input vectors"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and not module.transposed:
        return None if module.groups == 1 else "grouped convolutions are not supported"
    return f"{type(module).__name__} layers are not supported"


def layer_input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input vectors of one call of ``module`` on ``x``: a ``(vectors, row length)``
    matrix, in the order of the weight's rows (:func:`~optuna_ctpe.nn.grids.as_rows`)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if is_hf_conv1d(module):
        return x.reshape(-1, module.weight.shape[0])
    # An ungrouped Conv1d/Conv2d: its patches, padded as the module pads.
    conv1d = isinstance(module, nn.Conv1d)
    unbatched = x.dim() == (2 if conv1d else 3)
    if unbatched:
        x = x.unsqueeze(0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    if conv1d:  # a Conv1d is a Conv2d of height 1
        x = x.unsqueeze(2)
        kernel = (1, *module.kernel_size)
        dilation, stride = (1, *module.dilation), (1, *module.stride)
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C·k, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def collect_hessians(
    model: nn.Module,
    layers: Mapping[str, LayerWeight],
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, InputHessian]:
    """``H`` of every layer of ``layers`` GPTQ supports, from one pass over ``batches``.

    Forward pre-hooks add each call's input vectors to the layer's :class:`InputHessian`, so
    memory is one ``n × n`` float32 matrix per layer whatever the number of batches. The model
    runs in eval mode without gradients, and is left in its modes.

    Args:
        model: The full-precision network.
        layers: Layer name -> layer; those :func:`gptq_unsupported` refuses are skipped.
        batches: Calibration batches.
        forward: ``forward(model, batch)`` runs the model on a batch (a task's ``loss_fn``
            will do); None calls ``model(batch[0])`` for a tuple or list, else ``model(batch)``.

    Returns:
        Layer name -> its accumulated ``H``, for the supported layers the batches reached.

    Raises:
        ValueError: If ``batches`` is empty.
    """
    run = forward if forward is not None else _call
    hessians: dict[str, InputHessian] = {}
    handles = []
    try:
        for name, layer in layers.items():
            if gptq_unsupported(layer) is not None:
                continue
            n_inputs = layer.weight[0].numel() if layer.out_axis == 0 else layer.weight.shape[0]
            hessians[name] = InputHessian(n_inputs, layer.weight.device)
            handles.append(layer.module.register_forward_pre_hook(_adder(hessians[name])))
        n_batches = 0
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                run(model, batch)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise ValueError("batches is empty: GPTQ needs at least one calibration batch.")
    # A layer the batches never reach (an unused head) has no H, and no GPTQ.
    return {name: h for name, h in hessians.items() if h.count > 0}


def _call(model: nn.Module, batch: Any) -> Any:
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


def _adder(hessian: InputHessian) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        hessian.add(layer_input_rows(module, args[0]))

    return hook


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs of ``H``, whatever the format: the sweep order and the upper Cholesky
    factor of the damped ``H⁻¹`` in that order. Computed once per layer
    (:func:`hessian_factor`, ``O(n³)``) and shared by every format of the layer.

    Attributes:
        upper: ``(n, n)`` float32, upper triangular.
        perm: The sweep order (a permutation of the inputs), or None for the natural order.
    """

    upper: torch.Tensor
    perm: torch.Tensor | None


def hessian_factor(
    hessian: torch.Tensor, settings: GPTQSettings = GPTQSettings()
) -> HessianFactor:
    """The :class:`HessianFactor` of ``H`` = ``hessian`` under ``settings``.

    Args:
        hessian: ``(n, n)``, symmetric positive semi-definite (:meth:`InputHessian.matrix`).
        settings: Damping and column order (the block size is not read).

    Raises:
        ValueError: If ``hessian`` is not square, or the damped ``H`` is not positive definite
            (raise ``percdamp``).
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be a square matrix, got shape {tuple(hessian.shape)}.")
    with torch.no_grad():
        H = hessian.detach().to(torch.float64).clone()
        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1.0
        perm = None
        if settings.act_order:
            perm = torch.argsort(torch.diagonal(H), descending=True)
            H = H[perm][:, perm]
        # Damping (Section 4), then the upper Cholesky factor of H⁻¹ (Section 3, Step 3).
        H.diagonal().add_(settings.percdamp * torch.diagonal(H).mean())
        chol, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:
            raise ValueError(
                f"the damped H is not positive definite (percdamp={settings.percdamp}); "
                "raise percdamp."
            )
        upper = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float()
        return HessianFactor(upper=upper, perm=perm)


def gptq_rows(
    w: torch.Tensor,
    hessian: torch.Tensor | HessianFactor,
    fmt: WeightFormat,
    settings: GPTQSettings = GPTQSettings(),
) -> tuple[torch.Tensor, GridFit]:
    """GPTQ's Algorithm 1 on the ``(rows, n)`` weight matrix ``w`` with ``H`` = ``hessian``.

    Args:
        w: The weight as rows (:func:`~optuna_ctpe.nn.grids.as_rows`), float32.
        hessian: ``H``, ``(n, n)`` symmetric positive semi-definite
            (:meth:`InputHessian.matrix`), or its :class:`HessianFactor` (computed with the
            same ``settings``), which saves the ``O(n³)`` factorisation.
        fmt: A quantized format (its rounding is not read: this is the GPTQ rounding).
        settings: Damping, block size and column order.

    Returns:
        The quantized rows (float32 values on the grid) and the grid (scales, zero points).

    Raises:
        ValueError: If the shapes disagree, ``fmt`` is a float format, or the damped ``H`` is
            not positive definite (raise ``percdamp``).
    """
    rows, n = w.shape
    matrix = hessian.upper if isinstance(hessian, HessianFactor) else hessian
    if tuple(matrix.shape) != (n, n):
        raise ValueError(
            f"hessian must be {n} x {n} for rows of {n} inputs, got {tuple(matrix.shape)}."
        )
    if not fmt.quantized:
        raise ValueError(f"format {fmt.name!r} has no integer grid to round to.")
    factor = hessian if isinstance(hessian, HessianFactor) else hessian_factor(hessian, settings)
    with torch.no_grad():
        W = w.detach().float().clone()
        group = n if fmt.group_size is None else min(fmt.group_size, n)
        # Per-channel grids, and static groups under act-order, are fitted before the sweep.
        static = fmt.group_size is None or factor.perm is not None
        fit = fit_grid(W, fmt) if static else None
        scale = torch.empty_like(W)
        zero = torch.empty_like(W)
        if fit is not None:
            scale[:], zero[:] = fit.columns(n)
        perm = None if factor.perm is None else factor.perm.to(W.device)
        if perm is not None:
            W, scale, zero = W[:, perm], scale[:, perm], zero[:, perm]
        U = factor.upper.to(W.device)
        Q = torch.empty_like(W)
        B = settings.block_size
        for i1 in range(0, n, B):  # Algorithm 1, outer loop over blocks of B columns
            i2 = min(i1 + B, n)
            W1 = W[:, i1:i2].clone()
            E1 = torch.empty_like(W1)
            U1 = U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = i1 + i
                if fit is None and j % group == 0:
                    # A group's grid, fitted on its weights as updated by every column
                    # rounded before it: those past this block get its pending update now.
                    ahead = W[:, i2 : j + group] - E1[:, :i] @ U[i1:j, i2 : j + group]
                    columns = torch.cat([W1[:, i:], ahead], 1)[:, :group]
                    s, z = fit_rows(columns, fmt)
                    scale[:, j : j + group] = s[:, None]
                    zero[:, j : j + group] = z[:, None]
                q = round_to_grid(W1[:, i], scale[:, j], zero[:, j], fmt)
                Q[:, j] = q
                # E_{:,j} = (W_{:,j} − Q_{:,j}) / [U]_{jj}, then
                # W_{:,j:i2} −= E_{:,j} · U_{j,j:i2} (Algorithm 1, inner loop).
                err = (W1[:, i] - q) / U1[i, i]
                W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
                E1[:, i] = err
            # The lazy batch update of every later column: W_{:,i2:} −= E · U_{i1:i2, i2:}.
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
        if perm is not None:
            inverse = torch.argsort(perm)
            Q, scale, zero = Q[:, inverse], scale[:, inverse], zero[:, inverse]
        if fit is None:
            fit = GridFit(
                scale=scale[:, ::group].clone(), zero=zero[:, ::group].clone(), group_size=group
            )
        return Q, fit
