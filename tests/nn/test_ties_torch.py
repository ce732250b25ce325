"""Ties with torch (issue 16, item 6): the fused layer sets of tiny random-init Hugging Face
models, ``from_model(ties=...)``, and exports that refuse a configuration breaking a tie."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest


torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from optuna_ctpe import HessianSearchSpace  # noqa: E402
from optuna_ctpe.nn import fused_layer_sets  # noqa: E402
from optuna_ctpe.space.records import QuantConfig  # noqa: E402
from _quiet import quiet  # noqa: E402
from _tiny_hf import tiny_llama  # noqa: E402
from _tiny_hf import token_ids  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]

VOCAB = 64


def test_fused_sets_of_bert() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
    )
    prefix = "encoder.layer.0.attention.self."
    assert fused_layer_sets(transformers.BertModel(config)) == [
        (prefix + "query", prefix + "key", prefix + "value")
    ]


def test_fused_sets_of_llama() -> None:
    sets = fused_layer_sets(tiny_llama())
    expected = []
    for i in range(2):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        expected += [
            (attn + "q_proj", attn + "k_proj", attn + "v_proj"),
            (mlp + "gate_proj", mlp + "up_proj"),
        ]
    assert sets == expected


def test_gpt2_and_plain_models_have_no_fused_sets() -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=16
    )
    # c_attn is already one fused layer.
    assert fused_layer_sets(transformers.GPT2LMHeadModel(config)) == []
    assert fused_layer_sets(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))) == []


def _lm_loss(net: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return net(input_ids=ids, labels=ids).loss


def test_from_model_ties_the_fused_sets_of_llama() -> None:
    model, ids = tiny_llama(), token_ids(batch=2)
    space = quiet(
        HessianSearchSpace.from_model,
        model,
        _lm_loss,
        [ids],
        widths=(1.0,),
        max_probes=4,
        estimator="fisher",
        ties="fused",
    )
    attn0 = "model.layers.0.self_attn."
    # The first layer (q_proj of layer 0) is fixed at 8 bits, so its tie is fixed whole.
    for n in ("q_proj", "k_proj", "v_proj"):
        assert space.fixed_bits[attn0 + n] == 8
    attn1, mlp = "model.layers.1.self_attn.", "model.layers.{}.mlp."
    assert space.ties == (
        (mlp.format(0) + "gate_proj", mlp.format(0) + "up_proj"),
        (attn1 + "q_proj", attn1 + "k_proj", attn1 + "v_proj"),
        (mlp.format(1) + "gate_proj", mlp.format(1) + "up_proj"),
    )
    assert not any(f"bits:{tie[1]}" in space.distributions for tie in space.ties)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        config = space.suggest(study.ask())
        for tie in space.ties:
            assert len({config.bits[n] for n in tie}) == 1
    with pytest.raises(ValueError, match='ties must be a sequence of ties or "fused"'):
        HessianSearchSpace.from_model(model, _lm_loss, [ids], widths=(1.0,), ties="qkv")


class _Net(nn.Module):
    """Two parallel branches "a" and "b" of the same shape between two other layers."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.last = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        return self.last(torch.relu(self.a(h)) + torch.relu(self.b(h)))


@pytest.fixture(scope="module")
def net_and_batch() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    return _Net().eval(), (x, torch.randint(0, 4, (16,)))


def _ce(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(net(batch[0]), batch[1])


def _configs(space: HessianSearchSpace) -> tuple[QuantConfig, QuantConfig]:
    """A configuration that ties "a" and "b", and one that does not."""
    choices = dict(space.uniform(space.spec.grid[-1]).layer_choices())
    small = space.spec.grid[0]
    tied = space.config_from_params({"bits:a" if not space.formats else "format:a": small})
    broken = {**choices, "a": small}
    if space.formats:
        return tied, QuantConfig({}, formats=broken)
    return tied, QuantConfig(broken)


@pytest.mark.parametrize("formats", [None, ("int4-pc-sym-rtn", "int8-pc-sym-rtn")])
def test_export_refuses_a_configuration_breaking_a_tie(  # type: ignore[no-untyped-def]
    net_and_batch, formats, tmp_path: Path
) -> None:
    net, batch = net_and_batch
    space = quiet(
        HessianSearchSpace.from_model,
        net,
        _ce,
        [batch],
        bits=(4, 8),
        widths=(1.0,),
        max_probes=4,
        estimator="fisher",
        formats=formats,
        budget=float("inf"),
        ties=[("b", "a")],
    )
    assert space.ties == (("a", "b"),)
    tied, broken = _configs(space)
    assert tied.layer_choices()["a"] == tied.layer_choices()["b"] == space.spec.grid[0]
    packed = space.save_packed(net, tied, tmp_path / "tied.safetensors")
    assert packed.path.exists()
    for call in (
        lambda: space.save_packed(net, broken, tmp_path / "broken.safetensors"),
        lambda: space.apply(net, broken),
    ):
        with pytest.raises(ValueError, match=r"breaks the tie \['a', 'b'\]"):
            call()
    assert not (tmp_path / "broken.safetensors").exists()
    if formats is None:
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
        from optuna_ctpe.deploy.onnx import export_onnx

        with pytest.raises(ValueError, match=r"breaks the tie \['a', 'b'\]"):
            export_onnx(space, net, broken, tmp_path / "broken.onnx", batch[0])
        export_onnx(space, net, tied, tmp_path / "tied.onnx", batch[0])
        assert (tmp_path / "tied.onnx").exists()
