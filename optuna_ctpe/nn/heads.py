"""Transformers under torch-pruning: attention heads as width units (the query/key/value
projections of a model's attention modules and their head counts, for torch-pruning's whole-head
pruning), the tensors of a model's output (:func:`output_tensors`), the layers torch-pruning
cannot prune (:func:`check_prunable`), and the layers a serving runtime fuses, which must share
one weight format (:func:`fused_layer_sets`).

Pruning the output channels of a query/key/value projection one by one would regroup the
surviving channels into heads of mixed origin: a different function, not a narrower one. So
an attention module whose heads are known is pruned by whole heads (torch-pruning's
``num_heads`` with ``prune_num_heads=True, prune_head_dims=False``), and one whose heads are not
known (grouped-query attention, an unrecognised layout) keeps its projections' outputs whole.

Recognised by duck typing, without importing ``transformers``: a module with ``nn.Linear``
children ``query``/``key``/``value`` (BERT, ViT) or ``q_proj``/``k_proj``/``v_proj`` (Llama,
OPT, ...) and a head count in ``num_attention_heads``, ``num_heads`` or
``config.num_attention_heads``. A fused ``qkv`` projection (timm) is never pruned: its module
reshapes by its own stored head count, which pruning would leave stale.

Requires the ``torch`` extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optuna_ctpe.nn.layers import is_hf_conv1d
from optuna_ctpe.nn.layers import model_layers


__all__ = [
    "AttentionHeads",
    "attention_heads",
    "check_prunable",
    "fused_layer_sets",
    "output_tensors",
]

_PROJECTIONS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
_HEAD_COUNTS = ("num_attention_heads", "num_heads")
# Sibling projections that vLLM and TensorRT-LLM load as one fused matrix: attention's query,
# key and value, and a gated MLP's gate and up projections (Llama, Mistral, Qwen, Gemma).
_FUSED = (*_PROJECTIONS, ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class AttentionHeads:
    """The projections of the attention modules of a model.

    Attributes:
        num_heads: Query/key/value projection -> its number of heads, for every attention
            module whose heads can be pruned whole (torch-pruning's ``num_heads``).
        unprunable: Projections of attention modules whose heads are not known (grouped-query
            attention, no head count): their output channels must not be pruned.
        siblings: Each projection of :attr:`num_heads` -> the query, key and value projections
            of its attention module.
    """

    num_heads: dict[nn.Module, int]
    unprunable: list[nn.Module]
    siblings: dict[nn.Module, tuple[nn.Module, ...]]

    def head_dim(self, module: nn.Module) -> int:
        """Channels per head of a projection in :attr:`num_heads`."""
        return int(module.out_features) // self.num_heads[module]


def attention_heads(model: nn.Module) -> AttentionHeads:
    """The attention projections of ``model`` and their head counts (see the module docstring).

    Args:
        model: The network.
    """
    num_heads: dict[nn.Module, int] = {}
    unprunable: list[nn.Module] = []
    siblings: dict[nn.Module, tuple[nn.Module, ...]] = {}
    for module in model.modules():
        if isinstance(getattr(module, "qkv", None), nn.Linear):
            unprunable.append(module.qkv)
        for names in _PROJECTIONS:
            projections = [getattr(module, n, None) for n in names]
            if not all(isinstance(p, nn.Linear) for p in projections):
                continue
            heads = _head_count(module)
            widths = {p.out_features for p in projections}
            if heads and len(widths) == 1 and widths.pop() % heads == 0:
                num_heads.update(dict.fromkeys(projections, heads))
                siblings.update(dict.fromkeys(projections, tuple(projections)))
            else:
                unprunable.extend(projections)
    return AttentionHeads(num_heads, unprunable, siblings)


def fused_layer_sets(model: nn.Module) -> list[tuple[str, ...]]:
    """The sets of layers of ``model`` that serving runtimes fuse into one matrix, which must
    therefore share one weight format (ties for
    :meth:`~optuna_ctpe.HessianSearchSpace.tied`), in module order.

    Recognised by duck typing, as :func:`attention_heads` recognises attention (no import of
    ``transformers``): a module whose ``nn.Linear`` children ``query``/``key``/``value`` (BERT,
    ViT), ``q_proj``/``k_proj``/``v_proj`` (Llama, Mistral, Qwen, OPT; grouped-query attention
    included, whose key and value are narrower) or ``gate_proj``/``up_proj`` (a Llama-style
    gated MLP) are all present gives one set. GPT-2's ``c_attn`` is already one fused layer and
    gives none. Only layers this package quantizes (:func:`~optuna_ctpe.nn.layers.model_layers`,
    embeddings excluded) are named, by their layer names.

    Example:
        .. code-block:: python

            from transformers import LlamaConfig, LlamaForCausalLM
            from optuna_ctpe.nn.heads import fused_layer_sets

            config = LlamaConfig(
                vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2,
            )
            fused_layer_sets(LlamaForCausalLM(config))
            # [('model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj',
            #   'model.layers.0.self_attn.v_proj'),
            #  ('model.layers.0.mlp.gate_proj', 'model.layers.0.mlp.up_proj')]

    Args:
        model: The network.
    """
    known = {
        id(layer.module): name
        for name, layer in model_layers(model).items()
        if isinstance(layer.module, nn.Linear) and layer.attr == "weight"
    }
    out: list[tuple[str, ...]] = []
    for module in model.modules():
        for names in _FUSED:
            children = [getattr(module, n, None) for n in names]
            if all(isinstance(c, nn.Linear) and id(c) in known for c in children):
                out.append(tuple(known[id(c)] for c in children))
    return out


def _head_count(module: nn.Module) -> int | None:
    """The number of heads an attention module declares, or None."""
    for attr in _HEAD_COUNTS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(getattr(module, "config", None), "num_attention_heads", None)
    return value if isinstance(value, int) and value > 0 else None


def check_prunable(model: nn.Module) -> None:
    """Refuse a model with layers torch-pruning 1.6 cannot prune (GPT-2's ``Conv1D``)."""
    conv1d = [n for n, m in model.named_modules() if is_hf_conv1d(m)]
    if conv1d:
        raise ValueError(
            f"torch-pruning cannot prune the transformers Conv1D layers {conv1d[:3]}"
            f"{' ...' if len(conv1d) > 3 else ''}; search bit-widths only (widths=(1.0,))."
        )


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output, for torch-pruning's tracing.

    A Hugging Face model returns a ``ModelOutput`` (a dict) that may hold a key-value cache
    object, which torch-pruning cannot walk; only tensors carry the graph.
    """
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for x in output for t in output_tensors(x)]
    return []
