"""Structured width pruning of PyTorch models, one width ratio per channel-dependency group.

Channels of different layers are coupled: a residual addition ties the output channels of every
convolution that feeds it, a depthwise convolution ties its input to its output channels, and a
batch norm follows its convolution. Pruning one layer alone would break the network, so widths
are chosen per *dependency group*, as found by torch-pruning's ``DependencyGraph``
(`DepGraph <https://arxiv.org/abs/2301.12900>`_): every group is pruned as a unit and any choice of
ratios gives a valid network.

* :func:`width_groups` lists the groups of a model, each named after its root layer.
* :func:`prune_widths` returns a pruned copy that keeps
  :func:`~optuna_ctpe.space.records.kept_channels` (``max(1, round(width * n_channels))``)
  channels of each group, ranked by torch-pruning's L1 group magnitude.
* :func:`width_perturbation` gives ``‖ΔW‖²``, the squared norm of the weights a width removes,
  the width analogue of the quantization error in HAWQ-V2's sensitivity ``Ω = Tr̄(H)·‖ΔW‖²``.

Groups are rooted at every torch layer type of :data:`optuna_ctpe.nn.layers.WEIGHTED_LAYER_TYPES`
(Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear). Attention modules whose heads are known are
pruned by whole heads, and the projections of others are kept whole
(:mod:`optuna_ctpe.nn.heads`).

Requires the ``torch`` extra (torch and torch-pruning 1.6.x).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
import torch_pruning as tp
from torch_pruning.pruner import function as _fn

from optuna_ctpe._validation import check_integer
from optuna_ctpe._validation import check_ratio
from optuna_ctpe.nn.heads import attention_heads
from optuna_ctpe.nn.heads import AttentionHeads
from optuna_ctpe.nn.heads import check_prunable
from optuna_ctpe.nn.heads import output_tensors
from optuna_ctpe.nn.layers import eval_mode
from optuna_ctpe.nn.layers import out_channels
from optuna_ctpe.nn.layers import WEIGHTED_LAYER_TYPES
from optuna_ctpe.space.records import kept_channels


__all__ = ["GroupMember", "WidthGroup", "prune_widths", "width_groups", "width_perturbation"]

# Root layers of the groups: one width parameter per group of output channels of these types.
_ROOT_TYPES = WEIGHTED_LAYER_TYPES
# How torch-pruning's ``MagnitudeImportance`` scores a member, keyed by its pruning function.
_SCORED_ROLES = {
    _fn.prune_conv_out_channels: "out",
    _fn.prune_linear_out_channels: "out",
    _fn.prune_conv_in_channels: "in",
    _fn.prune_linear_in_channels: "in",
    _fn.prune_batchnorm_out_channels: "norm",
    _fn.prune_layernorm_out_channels: "norm",
}


@dataclass(frozen=True)
class GroupMember:
    """One layer's share of a dependency group, as torch-pruning records it.

    Attributes:
        layer: Module name.
        kind: ``"out"`` if the group prunes the module's output channels, ``"in"`` for input
            channels.
        role: How torch-pruning's magnitude importance scores the member: ``"out"`` or ``"in"``
            (Conv/Linear weight rows or columns), ``"norm"`` (affine norm scale) or ``None``
            (not scored, e.g. a depthwise convolution, which is still pruned).
        indices: Channel indices of the module that the group covers.
        root_indices: For each of ``indices``, the group channel (root output channel) it
            follows; None where torch-pruning could not map it.
    """

    layer: str
    kind: str
    role: str | None
    indices: tuple[int, ...]
    root_indices: tuple[int | None, ...]


@dataclass(frozen=True)
class WidthGroup:
    """A set of channels that must be pruned together.

    Attributes:
        name: Name of the root layer (the first Conv/Linear of the group in module order); the
            key of the group in :func:`prune_widths`.
        n_channels: Number of channels (output channels of the root) at full width.
        layers: Names of every module whose parameters the group prunes, in model order.
        members: How the group touches each module (used by :func:`width_perturbation`).
        head_dim: Channels per unit: 1, or the head size of an attention group, whose units
            (``n_channels``, the kept counts) are whole heads (:mod:`optuna_ctpe.nn.heads`).
    """

    name: str
    n_channels: int
    layers: tuple[str, ...]
    members: tuple[GroupMember, ...]
    head_dim: int = 1

    def kept_channels(self, width: float) -> int:
        """Channels kept at ``width``: ``max(1, round(width * n_channels))``.

        Args:
            width: Width ratio in (0, 1].
        """
        return kept_channels(self.n_channels, _check_width(width, self.name))


def width_groups(
    model: nn.Module, example_inputs: Any, *, ignored_layers: Sequence[str] | None = None
) -> list[WidthGroup]:
    """The channel-dependency groups of ``model``, one width parameter each.

    The graph is traced on a deep copy in eval mode, so ``model`` (including batch-norm
    statistics) is left untouched.

    Args:
        model: The network.
        example_inputs: Inputs for one forward pass: a tensor, a tuple of positional inputs or
            a dict of keyword inputs.
        ignored_layers: Names of layers whose output channels are never pruned. None ignores the
            last Conv/Linear layer of ``model`` (the classifier, whose outputs are the
            classes); an explicit sequence replaces that default.

    Returns:
        The groups in graph order. Groups are named after their root layer.

    Raises:
        ValueError: If an ignored layer name is not a module of ``model``, the model has no
            Conv/Linear layer, or it has layers torch-pruning cannot prune (GPT-2's Conv1D).
    """
    check_prunable(model)
    work = copy.deepcopy(model)
    heads = attention_heads(work)
    ignored = _ignored(work, ignored_layers) + heads.unprunable
    work.eval()  # batch norm in train mode would fail on a batch of one sample
    with torch.enable_grad():  # the graph is traced through autograd
        graph = tp.DependencyGraph().build_dependency(
            work, example_inputs=example_inputs, output_transform=output_tensors
        )
    names = {m: n for n, m in work.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(_ROOT_TYPES)):
        root = group[0].dep.target.module
        members = []
        for item in group:
            dep = item.dep
            name = names.get(dep.target.module)
            if name is None:  # functional ops (add, concat, ...) carry no parameters
                continue
            members.append(
                GroupMember(
                    layer=name,
                    kind="out" if graph.is_out_channel_pruning_fn(dep.handler) else "in",
                    role=_role(dep.target.module, dep.handler),
                    indices=tuple(int(i) for i in item.idxs),
                    root_indices=tuple(None if r is None else int(r) for r in item.root_idxs),
                )
            )
        layers = sorted({m.layer for m in members}, key=order.__getitem__)
        name = _group_name(graph, group, names, order)
        named = dict(work.named_modules())[name]
        head_dim = heads.head_dim(named) if named in heads.num_heads else 1
        groups.append(
            WidthGroup(
                name=name,
                n_channels=int(graph.get_out_channels(root)) // head_dim,
                layers=tuple(layers),
                members=tuple(members),
                head_dim=head_dim,
            )
        )
    return groups


def prune_widths(
    model: nn.Module,
    example_inputs: Any,
    widths: Mapping[str, float],
    *,
    round_to: int | None = None,
    ignored_layers: Sequence[str] | None = None,
) -> nn.Module:
    """A width-pruned deep copy of ``model``; ``model`` itself is not modified.

    Each group keeps its ``max(1, round(width * n_channels))`` most important channels, ranked
    by torch-pruning's group L1 magnitude (``MagnitudeImportance(p=1)``: the L1 norms of every
    coupled weight slice, averaged over the group). Groups not in ``widths`` keep full width.
    The kept channel counts are checked after pruning.

    Args:
        model: The network.
        example_inputs: Inputs for one forward pass (see :func:`width_groups`).
        widths: Group name (:attr:`WidthGroup.name`) -> width ratio in (0, 1]; 1.0 leaves the
            group untouched. Torch-pruning's ratio is ``1 - width``.
        round_to: If given, torch-pruning rounds each pruned group's kept channels down to a
            multiple of it (hardware-friendly widths); the counts then differ from
            ``round(width * n_channels)``.
        ignored_layers: As in :func:`width_groups`; must match the value used there.

    Returns:
        The pruned copy, in the same train/eval modes as ``model``.

    Raises:
        ValueError: On an unknown group name, a width outside (0, 1], or a bad ``round_to``.
        RuntimeError: If torch-pruning kept a different number of channels than requested.
    """
    if not isinstance(widths, Mapping):
        raise TypeError(f"widths must be a mapping of group names to ratios, got {widths!r}.")
    if round_to is not None:
        round_to = check_integer(round_to, "round_to", minimum=1, extra="or None")
    checked = {name: _check_width(w, name) for name, w in widths.items()}
    check_prunable(model)
    work = copy.deepcopy(model)
    heads = attention_heads(work)
    ignored = _ignored(work, ignored_layers) + heads.unprunable
    modules = dict(work.named_modules())
    ratios, head_ratios, expected = _pruning_ratios(modules, checked, heads)
    # Eval mode: the tracing forward pass must not update the copy's batch-norm statistics.
    with eval_mode(work), torch.enable_grad():  # the graph is traced through autograd
        pruner = tp.pruner.BasePruner(
            work,
            example_inputs,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.0,  # the default (0.5) would prune every group not listed
            pruning_ratio_dict=ratios,
            ignored_layers=ignored,
            round_to=round_to,
            root_module_types=list(_ROOT_TYPES),
            output_transform=output_tensors,
            num_heads=heads.num_heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio_dict=head_ratios,
        )
        _check_group_names(pruner.DG, modules, ignored, checked)
        if ratios:
            pruner.step()
    for name, kept in expected.items():
        got = int(pruner.DG.get_out_channels(modules[name]))
        if got % round_to != 0 if round_to else got != kept:
            raise RuntimeError(
                f"torch-pruning kept {got} channels of group {name!r}, expected "
                f"{kept if not round_to else f'a multiple of {round_to}'}."
            )
    return work


def _pruning_ratios(
    modules: Mapping[str, nn.Module], widths: Mapping[str, float], heads: AttentionHeads
) -> tuple[dict[nn.Module, float], dict[nn.Module, float], dict[str, int]]:
    """Torch-pruning's ratio of each root module to prune, its head-pruning ratio of each
    attention projection, and the channels each root should keep."""
    ratios: dict[nn.Module, float] = {}
    head_ratios: dict[nn.Module, float] = {}
    expected: dict[str, int] = {}
    for name, width in widths.items():
        root = modules.get(name)
        if width == 1.0 or not isinstance(root, _ROOT_TYPES):
            continue  # unknown names are reported once the groups are known
        head_dim = heads.head_dim(root) if root in heads.num_heads else 1
        n = out_channels(root) // head_dim
        kept = kept_channels(n, width)
        expected[name] = kept * head_dim
        # torch-pruning keeps int(n * (1 - ratio)) channels (a floor, subject to float error);
        # aiming half a channel above the target makes that floor exactly the target.
        ratios[root] = 1.0 - (kept + 0.5) / n
        if head_dim > 1:
            # ... and removes ceil(ratio * n) heads of the group: half a head below the target.
            head_ratios.update(dict.fromkeys(heads.siblings[root], (n - kept - 0.5) / n))
    return ratios, head_ratios, expected


def _check_group_names(
    graph: tp.DependencyGraph,
    modules: Mapping[str, nn.Module],
    ignored: list[nn.Module],
    widths: Mapping[str, float],
) -> None:
    """Refuse names in ``widths`` that are not width groups of ``graph``, listing the groups."""
    names = {m: n for n, m in modules.items()}
    order = {n: i for i, n in enumerate(modules)}
    known = {
        _group_name(graph, group, names, order)
        for group in graph.get_all_groups(
            ignored_layers=ignored, root_module_types=list(_ROOT_TYPES)
        )
    }
    unknown = sorted(set(widths) - known)
    if unknown:
        raise ValueError(
            f"widths names unknown width groups {unknown}; the groups are {sorted(known)}."
        )


def width_perturbation(model: nn.Module, group: WidthGroup, width: float) -> float:
    """``‖ΔW‖²`` of pruning ``group`` to ``width``: the squared norm of the removed weights.

    The channels are ranked exactly as :func:`prune_widths` ranks them (torch-pruning's group L1
    magnitude); the removed channels' slices of every Conv/Linear weight in the group (output
    rows of the pruned layers, input columns of their consumers, depthwise filters) are summed.
    Norm-layer scales and biases are not weights and are left out.

    Args:
        model: The network ``group`` was computed on (unpruned).
        group: A group from :func:`width_groups`.
        width: Width ratio in (0, 1]; 1.0 gives 0.

    Returns:
        The squared Frobenius norm of the removed weights.

    Raises:
        ValueError: On a width outside (0, 1], a group member the model lacks, a grouped
            (non-depthwise) convolution or group norm in the group, whose channel coupling this
            function does not reproduce, or an attention-head group.
    """
    if not isinstance(group, WidthGroup):
        raise TypeError(f"group must be a WidthGroup from width_groups(), got {group!r}.")
    if group.head_dim > 1:
        raise ValueError(
            f"group {group.name!r} prunes whole attention heads, which width_perturbation does "
            "not rank; HessianSearchSpace.from_model measures it by pruning."
        )
    kept = group.kept_channels(width)
    n = group.n_channels
    if kept >= n:
        return 0.0
    modules = dict(model.named_modules())
    _check_supported_members(modules, group)
    with torch.no_grad():
        importance = _group_importance(modules, group)
        removed = set(torch.topk(importance, k=n - kept, largest=False).indices.tolist())
        return _removed_squared_norm(modules, group, removed)


def _check_supported_members(modules: Mapping[str, nn.Module], group: WidthGroup) -> None:
    for m in group.members:
        module = modules.get(m.layer)
        if module is None:
            raise ValueError(f"group {group.name!r} names layer {m.layer!r}, which model lacks.")
        if isinstance(module, nn.GroupNorm) or (
            isinstance(module, nn.modules.conv._ConvNd)
            and 1 < module.groups != module.out_channels
        ):
            raise ValueError(
                f"layer {m.layer!r} of group {group.name!r} is a grouped convolution or group "
                "norm; width_perturbation supports plain and depthwise convolutions only."
            )


def _removed_squared_norm(
    modules: Mapping[str, nn.Module], group: WidthGroup, removed: set[int]
) -> float:
    """The squared norm of the weight entries that removing the group channels ``removed`` cuts."""
    # Removed indices per (layer, weight dimension); a layer whose input and output are both in
    # the group (a residual branch) loses rows and columns that overlap, so the removed entries
    # are gathered as one mask per layer.
    removed_idx: dict[str, dict[int, set[int]]] = {}
    for m in group.members:
        module = modules[m.layer]
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        dims = removed_idx.setdefault(m.layer, {})
        dims.setdefault(_weight_dim(module, m.kind), set()).update(
            i for i, r in zip(m.indices, m.root_indices) if r in removed
        )
    total = 0.0
    for layer, dims in removed_idx.items():
        weight = modules[layer].weight.detach()
        mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        for dim, idxs in dims.items():
            if idxs:
                mask.index_fill_(dim, torch.tensor(sorted(idxs), device=weight.device), True)
        total += float(weight[mask].double().pow(2).sum())
    return total


def _group_importance(modules: Mapping[str, nn.Module], group: WidthGroup) -> torch.Tensor:
    """Torch-pruning 1.6's ``MagnitudeImportance(p=1)`` of each group channel, up to a scale.

    Mirrors ``GroupMagnitudeImportance.__call__`` and ``_reduce`` (sum of member L1 norms
    scattered to the root channels, float32); the mean reduction and mean normalizer only
    rescale, which does not change the ranking.
    """
    total = torch.zeros(group.n_channels, dtype=torch.float32)
    for m in group.members:
        if m.role is None or any(r is None for r in m.root_indices):
            continue
        module = modules[m.layer]
        idxs = list(m.indices)
        weight = module.weight.data
        transposed = getattr(module, "transposed", False)
        if m.role == "out":
            w = weight.transpose(1, 0) if transposed else weight
            local = w[idxs].flatten(1).abs().sum(1)
        elif m.role == "in":
            w = weight.flatten(1) if transposed else weight.transpose(0, 1).flatten(1)
            local = w.abs().sum(1)
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups not in (
                1,
                module.in_channels,
            ):
                local = local.repeat(module.groups)
            local = local[idxs]
        else:
            if weight is None:  # non-affine norm: not scored
                continue
            local = weight[idxs].abs()
        total.scatter_add_(0, torch.tensor(m.root_indices), local.float().cpu())
    return total


def _weight_dim(module: nn.Module, kind: str) -> int:
    """The weight dimension that holds ``kind`` ("out"/"in") channels of a Conv/Linear."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups == module.out_channels and module.groups > 1:
            return 0  # depthwise: one filter per channel, input and output alike
        out_dim = 1 if module.transposed else 0
        return out_dim if kind == "out" else 1 - out_dim
    return 0 if kind == "out" else 1


def _role(module: nn.Module, handler: Any) -> str | None:
    for fn, role in _SCORED_ROLES.items():
        if handler == fn:
            if role == "norm" and getattr(module, "weight", None) is None:
                return None
            return role
    return None


def _ignored(model: nn.Module, ignored_layers: Sequence[str] | None) -> list[nn.Module]:
    """The modules of ``ignored_layers``; by default the last Conv/Linear (the classifier)."""
    modules = dict(model.named_modules())
    if ignored_layers is None:
        roots = [m for m in modules.values() if isinstance(m, _ROOT_TYPES)]
        if not roots:
            raise ValueError("the model has no Conv or Linear layer to prune.")
        return [roots[-1]]
    if isinstance(ignored_layers, str):
        raise TypeError(
            f"ignored_layers must be a sequence of names, got the string {ignored_layers!r}."
        )
    unknown = [n for n in ignored_layers if n not in modules]
    if unknown:
        raise ValueError(f"ignored_layers names modules the model lacks: {unknown}.")
    return [modules[n] for n in ignored_layers]


def _group_name(
    graph: tp.DependencyGraph,
    group: Any,
    names: Mapping[nn.Module, str],
    order: Mapping[str, int],
) -> str:
    """The first Conv/Linear (in module order) whose output channels the group prunes.

    Torch-pruning's own root depends on its graph traversal (a residual group's root can be the
    second convolution feeding the addition); module order gives the name a reader expects, and
    any output-pruned member identifies the group in ``pruning_ratio_dict``.
    """
    candidates = [
        names[item.dep.target.module]
        for item in group
        if isinstance(item.dep.target.module, _ROOT_TYPES)
        and graph.is_out_channel_pruning_fn(item.dep.handler)
        and item.dep.target.module in names
    ]
    return min(candidates, key=order.__getitem__)


def _check_width(width: Any, name: str) -> float:
    return check_ratio(width, f"the width of group {name!r}")
