"""Transformers end to end on tiny random-init models (CPU): Hugging Face BERT (SDPA and eager
attention), GPT-2 (``Conv1D`` layers, tied LM head), Llama, ``nn.TransformerEncoder`` and
``nn.MultiheadAttention``, timm and torchvision ViTs; second-order autograd through attention and
the clear error for a loss that is not twice differentiable."""

from __future__ import annotations

import copy
import math
from typing import Any
import warnings

import pytest


torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402
from torch.nn.attention import sdpa_kernel  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

from optuna_ctpe import HessianSearchSpace  # noqa: E402
from optuna_ctpe.nn.quantize import bops  # noqa: E402
from optuna_ctpe.nn.quantize import model_size  # noqa: E402
from optuna_ctpe.nn.quantize import quantize_model  # noqa: E402
from optuna_ctpe.nn.sensitivity import hutchinson_traces  # noqa: E402
from _quiet import quiet  # noqa: E402
from _tiny_hf import tiny_bert  # noqa: E402
from _tiny_hf import tiny_llama  # noqa: E402
from _tiny_hf import token_ids  # noqa: E402
from _tiny_hf import VOCAB  # noqa: E402


pytestmark = pytest.mark.torch


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _lm_loss(net: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return net(input_ids=ids, labels=ids).loss


def _torchvision_vit() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=16,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=3,
    )


def _timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3
    )


class _Encoder(nn.Module):
    """A token classifier on ``nn.TransformerEncoder`` (fused ``in_proj_weight`` in MHA)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.embed = nn.Linear(8, 16)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


class _Attention(nn.Module):
    """Bare ``nn.MultiheadAttention`` (need_weights on: the non-SDPA path) and a head; with
    ``kdim``, keys and values are the first ``kdim`` features (separate projection weights)."""

    def __init__(self, kdim: int | None) -> None:
        super().__init__()
        self.kdim = kdim
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = x if self.kdim is None else x[..., : self.kdim]
        out, _ = self.attn(x, kv, kv)
        return self.head(out.mean(1))


def _ce(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(net(batch[0]), batch[1])


def _sdpa_flags() -> tuple[bool, ...]:
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled())


def _check_space(space: HessianSearchSpace, model: nn.Module, loss) -> None:  # type: ignore[no-untyped-def]
    """Finite traces; apply, size and warm starts agree with the torch side."""
    assert all(math.isfinite(s.mean_trace) for s in space.sensitivities.values())
    assert any(s.mean_trace > 0 for s in space.sensitivities.values())
    config = space.uniform(4)
    assert space.size(config) == model_size(model, dict(config.bits), scales=True).total_bits
    assert space.fp32_bits == model_size(model).total_bits
    net = space.apply(model, config)
    assert net is not model
    with torch.no_grad():
        assert math.isfinite(float(loss(net)))
    ratio = (space.size(space.uniform(8)) + 1) / space.fp32_bits
    starts = space.warm_starts(size_ratio=min(1.0, ratio), n=2)
    assert starts
    assert all(space.size(space.config_from_params(p)) <= ratio * space.fp32_bits for p in starts)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("estimator", ["hutchinson", "fisher"])
def test_bert_classifier(attn: str, estimator: str) -> None:
    model = tiny_bert(attn=attn, n_heads=2)
    ids, labels = token_ids(), torch.tensor([0, 1, 2, 0])

    def loss_fn(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return net(input_ids=batch[0], labels=batch[1]).loss

    before = _sdpa_flags()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="per-sample gradients could not be vmapped")
        space = quiet(
            HessianSearchSpace.from_model,
            model,
            loss_fn,
            [(ids, labels)],
            widths=(1.0,),
            estimator=estimator,
            max_probes=6,
        )
    assert _sdpa_flags() == before
    names = list(space.sensitivities)
    assert names[0] == "bert.encoder.layer.0.attention.self.query" and names[-1] == "classifier"
    assert len(names) == 2 * 6 + 2  # q, k, v, output, intermediate, output per layer; pooler
    _check_space(space, model, lambda net: loss_fn(net, (ids, labels)))


def test_bert_model_restores_the_users_attention_kernels() -> None:
    model, ids = tiny_bert(attn="sdpa", head=False, n_heads=2), token_ids()

    def loss_fn(net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return net(input_ids=batch).last_hidden_state.pow(2).mean()

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        inside = _sdpa_flags()
        space = quiet(
            HessianSearchSpace.from_model, model, loss_fn, [ids], widths=(1.0,), max_probes=4
        )
        assert _sdpa_flags() == inside  # the user's choice, math off, is back
    assert inside[2] is False
    _check_space(space, model, lambda net: loss_fn(net, ids))


@pytest.mark.parametrize("include_embeddings", [False, True])
def test_gpt2_conv1d_and_tied_head(include_embeddings: bool) -> None:
    model, ids = _gpt2(), token_ids()
    assert model.lm_head.weight is model.transformer.wte.weight
    space = quiet(
        HessianSearchSpace.from_model,
        model,
        _lm_loss,
        [ids],
        widths=(1.0,),
        max_probes=4,
        include_embeddings=include_embeddings,
    )
    names = list(space.sensitivities)
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.1.mlp.c_proj" in names
    assert "lm_head" not in names  # the tied head is the embedding: one layer, measured once
    assert ("transformer.wte" in names) is include_embeddings
    assert space.sensitivities["transformer.h.0.attn.c_attn"].n_params == 32 * 96
    assert sum(t.name == "transformer.wte.weight" for t in space.tensors) == 1
    _check_space(space, model, lambda net: _lm_loss(net, ids))


def test_gpt2_conv1d_is_quantized_per_output_column() -> None:
    model = _gpt2()
    q = quantize_model(model, {"transformer.h.0.attn.c_attn": 2})
    w = q.transformer.h[0].attn.c_attn.weight.detach()  # (in, out): outputs along dim 1
    assert all(len(torch.unique(w[:, j])) <= 3 for j in range(w.shape[1]))
    assert max(len(torch.unique(w[i])) for i in range(w.shape[0])) > 3
    assert bops(model, {"transformer.h.0.attn.c_attn": 4}, token_ids()) > 0


def test_tied_weights_take_one_bit_width() -> None:
    model = _gpt2()
    q = quantize_model(model, {"transformer.wte": 4, "lm_head": 4})
    assert q.lm_head.weight is q.transformer.wte.weight
    size = model_size(model, {"transformer.wte": 4, "lm_head": 4})
    assert size.total_bits == model_size(model, {"transformer.wte": 4}).total_bits
    with pytest.raises(ValueError, match=r"share one \(tied\) weight tensor"):
        quantize_model(model, {"transformer.wte": 4, "lm_head": 8})
    with pytest.raises(ValueError, match=r"share one \(tied\) weight tensor"):
        model_size(model, {"transformer.wte": 4, "lm_head": 8})


def test_embeddings_are_quantized_per_row() -> None:
    model = _gpt2()
    q = quantize_model(model, {"transformer.wte": 2})
    w = q.transformer.wte.weight.detach()
    assert all(len(torch.unique(row)) <= 3 for row in w)


def test_llama() -> None:
    model, ids = tiny_llama(), token_ids()
    space = quiet(
        HessianSearchSpace.from_model, model, _lm_loss, [ids], widths=(1.0,), max_probes=4
    )
    names = list(space.sensitivities)
    assert "model.layers.0.self_attn.k_proj" in names and names[-1] == "lm_head"
    assert "model.embed_tokens" not in names
    _check_space(space, model, lambda net: _lm_loss(net, ids))


def _tokens(seed: int = 0, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 5, dim, generator=g), torch.randint(0, 3, (4,), generator=g)


@pytest.mark.parametrize("estimator", ["hutchinson", "fisher"])
def test_transformer_encoder(estimator: str) -> None:
    torch.manual_seed(0)
    model, batch = _Encoder(), _tokens()
    space = quiet(
        HessianSearchSpace.from_model,
        model,
        _ce,
        [batch],
        widths=(1.0,),
        estimator=estimator,
        max_probes=6,
    )
    names = list(space.sensitivities)
    assert names[:3] == [
        "embed",
        "encoder.layers.0.self_attn.in_proj_weight",
        "encoder.layers.0.self_attn.out_proj",
    ]
    assert space.sensitivities[names[1]].n_params == 3 * 16 * 16
    _check_space(space, model, lambda net: _ce(net, batch))


@pytest.mark.parametrize("kdim", [None, 12])
def test_multihead_attention_projection_weights(kdim: int | None) -> None:
    torch.manual_seed(0)
    model, batch = _Attention(kdim), _tokens(dim=16)
    traces = hutchinson_traces(model, _ce, [batch], max_probes=4)
    params = (
        ["in_proj_weight"] if kdim is None else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    )
    assert list(traces) == [f"attn.{p}" for p in params] + ["attn.out_proj", "head"]
    bits = dict.fromkeys(traces, 2)
    q = quantize_model(model, bits)
    for p in params:
        w = getattr(q.attn, p).detach()
        assert all(len(torch.unique(row)) <= 3 for row in w)
    assert torch.equal(q.attn.out_proj.bias, model.attn.out_proj.bias)
    assert model_size(model, bits).total_bits < model_size(model).total_bits
    macs = bops(model, bits, batch[0], activation_bits=8) // (2 * 8)
    kv = 16 if kdim is None else kdim
    assert macs == 5 * (16 * 16 + 2 * kv * 16 + 16 * 16) + 16 * 3
    space = quiet(HessianSearchSpace.from_model, model, _ce, [batch], widths=(1.0,), max_probes=4)
    _check_space(space, model, lambda net: _ce(net, batch))


def test_vision_transformers() -> None:
    vit = _torchvision_vit()
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = (images, torch.tensor([0, 1, 2, 0]))
    space = quiet(HessianSearchSpace.from_model, vit, _ce, [batch], widths=(1.0,), max_probes=4)
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in space.sensitivities
    _check_space(space, vit, lambda net: _ce(net, batch))


def test_timm_vit() -> None:
    vit = _timm_vit()
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = (images, torch.tensor([0, 1, 2, 0]))
    space = quiet(HessianSearchSpace.from_model, vit, _ce, [batch], widths=(1.0,), max_probes=4)
    assert "blocks.0.attn.qkv" in space.sensitivities  # the fused qkv Linear
    _check_space(space, vit, lambda net: _ce(net, batch))


class _FlashAttention(nn.Module):
    """Attention through the fused CPU flash kernel called directly: no second derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
        return self.head(out.squeeze(1).mean(1))


def test_a_loss_not_twice_differentiable_is_explained() -> None:
    torch.manual_seed(0)
    net, batch = _FlashAttention(), _tokens()
    op = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
    with pytest.raises(RuntimeError, match=f"not twice differentiable.*{op}.*estimator='fisher'"):
        HessianSearchSpace.from_model(
            net, _ce, [batch], widths=(1.0,), max_probes=4, estimator="hutchinson"
        )
    # First derivatives suffice for the empirical Fisher.
    space = HessianSearchSpace.from_model(
        net, _ce, [batch], widths=(1.0,), max_probes=4, estimator="fisher"
    )
    assert all(math.isfinite(s.mean_trace) for s in space.sensitivities.values())


def _bert_heads(attn: str) -> nn.Module:
    return tiny_bert(attn=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_widths_prune_whole_heads_and_mlp_hidden_sizes(attn: str) -> None:
    model, ids, labels = _bert_heads(attn), token_ids(), torch.tensor([0, 1, 2, 0])
    inputs = {"input_ids": ids}

    def loss_fn(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return net(input_ids=batch[0], labels=batch[1]).loss

    space = quiet(
        HessianSearchSpace.from_model,
        model,
        loss_fn,
        [(ids, labels)],
        widths=(0.5, 1.0),
        example_inputs=inputs,
        max_probes=4,
    )
    heads = "bert.encoder.layer.0.attention.self.query"
    mlp = "bert.encoder.layer.0.intermediate.dense"
    assert space.groups[heads].n_channels == 4  # a head group counts heads
    assert space.groups[mlp].n_channels == 64
    assert all(g.perturbations[0.5] > 0 for g in space.groups.values())
    config = space.uniform(4, 0.5)
    net = space.apply(model, config, inputs)
    assert space.size(config) == model_size(net, dict(config.bits), scales=True).total_bits
    # Whole heads kept: the pruned query rows are two of the original 8-row head blocks.
    full = space.uniform(4)
    only_heads = type(full)(dict(full.bits), {**dict(full.widths), heads: 0.5})
    pruned = space.prune(model, only_heads, inputs)
    old = model.bert.encoder.layer[0].attention.self.query.weight
    new = pruned.bert.encoder.layer[0].attention.self.query.weight
    blocks = [new[i : i + 8] for i in range(0, new.shape[0], 8)]
    assert len(blocks) == 2
    assert all(any(torch.equal(b, old[h * 8 : (h + 1) * 8]) for h in range(4)) for b in blocks)
    # ... so the pruned model is the original with those heads' values zeroed.
    kept = [h for h in range(4) if any(torch.equal(b, old[h * 8 : (h + 1) * 8]) for b in blocks)]
    reference = copy.deepcopy(model)
    value = reference.bert.encoder.layer[0].attention.self.value
    with torch.no_grad():
        for h in set(range(4)) - set(kept):
            value.weight[h * 8 : (h + 1) * 8] = 0
            value.bias[h * 8 : (h + 1) * 8] = 0
        assert torch.allclose(reference(**inputs).logits, pruned(**inputs).logits, atol=1e-6)


def _widths_space(model: nn.Module, loss, batch, example_inputs) -> HessianSearchSpace:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trace of layer.*is negative")
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return HessianSearchSpace.from_model(
            model, loss, [batch], widths=(0.5, 1.0), example_inputs=example_inputs, max_probes=4
        )


def _check_half_width(space: HessianSearchSpace, model: nn.Module, loss, example_inputs) -> None:  # type: ignore[no-untyped-def]
    config = space.uniform(4, 0.5)
    net = space.apply(model, config, example_inputs)
    assert space.size(config) == model_size(net, dict(config.bits), scales=True).total_bits
    with torch.no_grad():
        assert math.isfinite(float(loss(net)))


def test_widths_of_transformer_encoder_llama_and_timm() -> None:
    torch.manual_seed(0)
    encoder, (x, y) = _Encoder(), _tokens()
    space = _widths_space(encoder, _ce, (x, y), x)
    # The hidden size (MultiheadAttention pruned by torch-pruning) and each MLP hidden size.
    assert set(space.groups) == {"embed", "encoder.layers.0.linear1", "encoder.layers.1.linear1"}
    _check_half_width(space, encoder, lambda net: _ce(net, (x, y)), x)

    llama, ids = tiny_llama(), token_ids()
    space = _widths_space(llama, _lm_loss, ids, {"input_ids": ids})
    # Grouped-query attention (2 key/value heads for 4 query heads): projections kept whole.
    assert {"model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"} <= set(space.groups)
    assert not any("q_proj" in g or "k_proj" in g or "v_proj" in g for g in space.groups)
    _check_half_width(space, llama, lambda net: _lm_loss(net, ids), {"input_ids": ids})

    vit = _timm_vit()
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    space = _widths_space(vit, _ce, (images, labels), images)
    # The fused qkv is kept whole; the class token and position embedding follow the hidden size.
    assert set(space.groups) == {"patch_embed.proj", "blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}
    _check_half_width(space, vit, lambda net: _ce(net, (images, labels)), images)


def test_a_width_group_the_pruner_breaks_is_named_in_a_warning() -> None:
    vit = _torchvision_vit()
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    with pytest.warns(UserWarning, match=r"width group 'conv_proj' .*could not be pruned"):
        space = _widths_space(vit, _ce, (images, labels), images)
    assert set(space.groups) == {
        "encoder.layers.encoder_layer_0.mlp.0",
        "encoder.layers.encoder_layer_1.mlp.0",
    }
    _check_half_width(space, vit, lambda net: _ce(net, (images, labels)), images)


def test_gpt2_widths_are_refused_clearly() -> None:
    model, ids = _gpt2(), token_ids()
    with pytest.raises(
        ValueError, match=r"cannot prune the transformers Conv1D layers.*widths=\(1\.0,\)"
    ):
        _widths_space(model, _lm_loss, ids, {"input_ids": ids})


class _OnceDifferentiableSquare(torch.autograd.Function):
    """``x²`` with a backward marked ``@once_differentiable``, as fused extension kernels are."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _OnceDifferentiableNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(_OnceDifferentiableSquare.apply(self.a(x)))


def test_a_once_differentiable_function_is_explained_not_silently_dropped() -> None:
    # Without the check, layer a's Hessian-vector products silently miss the curvature behind
    # the function (autograd only raises when a product reaches it, and a's never does).
    torch.manual_seed(0)
    net = _OnceDifferentiableNet()
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    with pytest.raises(RuntimeError, match="not twice differentiable.*@once_differentiable"):
        HessianSearchSpace.from_model(
            net, _ce, [batch], widths=(1.0,), keep_first_last_bits=None, max_probes=2,
            estimator="hutchinson",
        )  # fmt: skip
    space = HessianSearchSpace.from_model(
        net, _ce, [batch], widths=(1.0,), keep_first_last_bits=None, estimator="fisher"
    )
    assert set(space.sensitivities) == {"a", "b"}
