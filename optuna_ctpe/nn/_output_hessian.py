"""The loss Hessian in the model's outputs, ``H_z``, and its positive-part factor ``S``.

The GGN estimator (:mod:`optuna_ctpe.nn.ggn`) needs ``S`` with ``S Sᵀ`` the positive part of
``H_z``. Only the outputs the loss is curved in count (an output the loss never reads, or reads
linearly, has zero rows and columns in ``H_z``); call their ``m`` numbers the outputs.

**Per-sample blocks.** A loss that is a mean or sum over samples has a block-diagonal ``H_z``:
one ``C × C`` block per sample along the leading (batch) dimension that every output shares.
All ``N`` blocks come from ``C`` Hessian-vector products, probing with the unit vector ``e_c``
of the per-sample numbers replicated over the ``N`` samples, which returns column ``c`` of every
block at once: Curtis-Powell-Reid colouring of a block-diagonal matrix, whose ``N`` blocks'
columns ``c`` share a colour because no row meets two of them. Applying colouring to
``H_z`` per batch, and checking its assumption, is this package's own construction. A loss
may couple the samples (a batch contrastive loss, a loss normalised over the batch), so one
more product on a random vector ``v`` checks the assumption: ``‖H_z v - blockdiag(B) v‖`` must
be at most ``sqrt(eps)`` of the outputs' dtype times ``‖H_z v‖ + ‖blockdiag(B) v‖``. In float32
that is ``3.5e-4``, a thousand times the rounding of the two products (about ``1e-7`` for
cross-entropy, mean squared error and the MiniLM task's loss), and a coupling that small moves
the traces far less than the estimator's own noise. Storing the blocks takes ``N·C²``
numbers, at most :data:`MAX_BLOCK_NUMBERS`, and ``C`` is at most :data:`MAX_OUTPUTS`.

**Dense.** Without a shared batch dimension of at least two samples, with blocks too large, or
with coupled samples, ``H_z`` is formed densely from ``m`` products, for at most
:data:`MAX_OUTPUTS` numbers; otherwise the estimator raises, naming the cause.

Either way ``H_z``'s blocks are symmetrised and eigendecomposed in float64 (batched), and
``S_n = V_n sqrt(Λ_n⁺)`` keeps the eigenvalues above ``1e-10`` of the largest magnitude; one
below ``-1e-6`` of it warns that the loss is not convex in the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
import warnings

import torch


#: Most output numbers per batch whose dense loss Hessian is formed (4,096 numbers: 128 MiB in
#: float64, a batch of 256 samples of 16 classes), and most numbers per sample of a block.
MAX_OUTPUTS = 4096
#: Most numbers of all per-sample blocks of a batch together (``N·C²``): the memory of the
#: largest dense Hessian, 128 MiB in float64, e.g. 113 samples of 384 numbers.
MAX_BLOCK_NUMBERS = MAX_OUTPUTS**2


@dataclass(frozen=True)
class OutputHessianFactor:
    """``S``: ``blockdiag(S_n S_nᵀ)`` is the positive part of the loss Hessian in the outputs.

    Attributes:
        blocks: ``(N, C, r)`` float64 on the CPU. Block ``n`` covers sample ``n`` (index ``n``
            along dimension 0 of every covered output), its ``C`` rows the sample's numbers,
            output after output, each flattened; ``N = 1`` is the dense factor of the whole
            batch. Blocks of rank below ``r`` carry zero columns.
        outputs: Indices, in the model's outputs, of the outputs the rows cover.
    """

    blocks: torch.Tensor
    outputs: tuple[int, ...]

    @property
    def rank(self) -> int:
        """``r``: the Rademacher numbers drawn per sample; 0 when the loss has no curvature."""
        return self.blocks.shape[-1]


def output_hessian_factor(
    loss: torch.Tensor, leaves: list[torch.Tensor], index: int
) -> OutputHessianFactor:
    """The factor of the positive part of ``loss``'s Hessian in ``leaves`` (module docstring).

    Args:
        loss: Scalar loss, with its graph to ``leaves``.
        leaves: The model's outputs, as leaves of the loss's graph.
        index: Number of the batch, for messages.

    Raises:
        ValueError: If the Hessian fits neither in per-sample blocks nor densely.
    """
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    # Outputs the loss does not read, or reads linearly, have zero rows and columns in H_z.
    curved = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not curved:
        return OutputHessianFactor(torch.zeros(1, 0, 0, dtype=torch.float64), ())
    used = [leaves[i] for i in curved]
    flat = torch.cat([grads[i].reshape(-1) for i in curved])
    m = flat.numel()
    n = _shared_samples(used)
    cause = f"batch {index}'s outputs share no sample dimension of at least 2 samples"
    if n is not None:
        c = m // n
        if c <= MAX_OUTPUTS and n * c * c <= MAX_BLOCK_NUMBERS:
            blocks, coupled = _blocks(flat, used, n, check=True)
            if not coupled:
                return _positive_factor(blocks, tuple(curved), index)
            cause = (
                f"the loss couples the samples of batch {index} (its Hessian in the outputs is "
            )
            cause += "not block diagonal along dimension 0)"
        else:
            cause = (
                f"batch {index}'s per-sample blocks are too large ({n} samples of {c} numbers: "
                f"at most {MAX_OUTPUTS} numbers per sample and {MAX_BLOCK_NUMBERS} in all blocks)"
            )
    if m > MAX_OUTPUTS:
        raise ValueError(
            f"the GGN estimator cannot form the loss Hessian in the model's outputs: {cause}, "
            f"and its {m} output numbers are too many for the dense Hessian (at most "
            f"{MAX_OUTPUTS}); use smaller batches or estimator='hutchinson'."
        )
    blocks, _ = _blocks(flat, used, 1, check=False)
    return _positive_factor(blocks, tuple(curved), index)


def _shared_samples(leaves: list[torch.Tensor]) -> int | None:
    """The leading dimension every leaf shares, if there is one of at least 2."""
    sizes = {leaf.shape[0] if leaf.dim() else 0 for leaf in leaves}
    n = sizes.pop()
    return n if not sizes and n >= 2 else None


def _blocks(
    flat: torch.Tensor, leaves: list[torch.Tensor], n: int, *, check: bool
) -> tuple[torch.Tensor, bool]:
    """The ``n`` diagonal blocks of ``∂flat/∂leaves`` (float64, ``(n, C, C)``) by colouring, and
    whether a random probe found entries outside them (only with ``check``)."""
    counts = [leaf.numel() // n for leaf in leaves]
    c = sum(counts)
    # Probe k (sample-major, (n, C)) is e_k on every sample; the last, with check, is random.
    probes = torch.eye(c, dtype=torch.float64).unsqueeze(1).expand(c, n, c)
    if check:
        generator = torch.Generator().manual_seed(0)
        v = torch.randn(1, n, c, generator=generator, dtype=torch.float64)
        probes = torch.cat([probes, v])
    columns = _sample_major(_hessian_products(flat, leaves, probes, counts), n)
    blocks = columns[:c].permute(1, 2, 0)  # blocks[s, i, k] = columns[k, s, i]
    blocks = ((blocks + blocks.transpose(1, 2)) / 2).cpu()
    if not check:
        return blocks, False
    exact = columns[c].cpu()
    assumed = torch.einsum("sij,sj->si", blocks, v[0])
    tolerance = math.sqrt(torch.finfo(flat.dtype).eps)
    gap = float(torch.linalg.vector_norm(exact - assumed))
    scale = float(torch.linalg.vector_norm(exact) + torch.linalg.vector_norm(assumed))
    return blocks, gap > tolerance * scale


def _hessian_products(
    flat: torch.Tensor, leaves: list[torch.Tensor], probes: torch.Tensor, counts: list[int]
) -> list[torch.Tensor]:
    """``∂flat/∂leaves`` times each sample-major ``(K, n, C)`` probe: per leaf, ``(K, *shape)``."""
    k, n, _ = probes.shape
    starts = [sum(counts[:i]) for i in range(len(counts))]
    # flat is leaf-major: leaf l's n * counts[l] numbers, sample after sample.
    rows = torch.cat(
        [probes[:, :, s : s + c].reshape(k, n * c) for s, c in zip(starts, counts)], dim=1
    ).to(flat)
    try:
        # The graph is kept: a failed block check falls back to the dense products.
        products = torch.autograd.grad(
            flat,
            leaves,
            grad_outputs=rows,
            retain_graph=True,
            is_grads_batched=True,
            allow_unused=True,
        )
    except RuntimeError:  # a criterion op without a batching rule: one product at a time
        singles = [
            torch.autograd.grad(flat, leaves, row, retain_graph=True, allow_unused=True)
            for row in rows
        ]
        products = tuple(
            None if any(x is None for x in col) else torch.stack(col) for col in zip(*singles)
        )
    return [
        leaf.new_zeros(k, *leaf.shape) if p is None else p for p, leaf in zip(products, leaves)
    ]


def _sample_major(per_leaf: list[torch.Tensor], n: int) -> torch.Tensor:
    """Per-leaf ``(K, *shape)`` tensors as one float64 ``(K, n, C)``: sample, then its numbers."""
    return torch.cat([t.reshape(t.shape[0], n, -1) for t in per_leaf], dim=2).double()


def _positive_factor(
    blocks: torch.Tensor, outputs: tuple[int, ...], index: int
) -> OutputHessianFactor:
    """``S_n = V_n sqrt(Λ_n⁺)`` of every symmetric block, trimmed to the largest kept rank."""
    values, vectors = torch.linalg.eigh(blocks)
    top = float(values.abs().max()) if values.numel() else 0.0
    lowest = float(values.min()) if values.numel() else 0.0
    if lowest < -1e-6 * top:
        warnings.warn(
            f"the loss is not convex in the model's outputs on batch {index} (Hessian eigenvalue "
            f"{lowest:.3g}); the GGN keeps only its positive curvature.",
            stacklevel=5,
        )
    keep = values > 1e-10 * top
    factor = vectors * torch.where(keep, values.clamp_min(0).sqrt(), 0).unsqueeze(1)
    # eigh sorts the eigenvalues ascending, so every block's kept ones are its last columns.
    rank = int(keep.sum(1).max()) if keep.numel() else 0
    return OutputHessianFactor(factor[:, :, factor.shape[2] - rank :], outputs)
