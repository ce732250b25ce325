"""torchao per-layer configurations (optuna_ctpe.deploy.torchao): which layer gets which
torchao configuration, quantized copies that run on the CPU (and on CUDA when there is one),
outputs close to the fake-quantized model at 8 bits, and clear errors."""

from __future__ import annotations

import warnings

import pytest


torch = pytest.importorskip("torch")
torchao = pytest.importorskip("torchao", reason="the torchao export needs the deploy extra")

from torch import nn  # noqa: E402
from torchao.quantization import Int4WeightOnlyConfig  # noqa: E402
from torchao.quantization import Int8WeightOnlyConfig  # noqa: E402
from torchao.quantization import IntxWeightOnlyConfig  # noqa: E402

from optuna_ctpe import HessianSearchSpace  # noqa: E402
from optuna_ctpe.deploy.torchao import quantize_with_torchao  # noqa: E402
from optuna_ctpe.deploy.torchao import torchao_config  # noqa: E402
from optuna_ctpe.space.records import QuantConfig  # noqa: E402
from optuna_ctpe.tasks import Task  # noqa: E402
from optuna_ctpe.tasks.digits import digits_task  # noqa: E402
from _quiet import quiet  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]

#: torchao's int8 weights vs ours at 8 bits, relative to the largest output: both are
#: symmetric per output channel, with a different grid (torchao: [-128, 127]).
RTOL_8BIT = 1e-2
CONVS = ("conv1", "conv2", "conv3")


@pytest.fixture(scope="module")
def task() -> Task:
    return digits_task(seed=0)


@pytest.fixture(scope="module")
def space(task: Task) -> HessianSearchSpace:
    return quiet(
        HessianSearchSpace.from_model,
        task.model,
        task.loss_fn,
        task.calibration_batches,
        bits=(2, 3, 4, 6, 8, 12),
        widths=(0.75, 1.0),
        example_inputs=task.example_inputs,
        keep_first_last_bits=None,
        max_probes=10,
    )


def _quantize(space: HessianSearchSpace, task: Task, config: QuantConfig) -> nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no torchao weight-only path")
        return quantize_with_torchao(space, task.model, config, task.example_inputs)


def test_config_maps_linear_layers_by_bits_and_names_the_rest(
    task: Task, space: HessianSearchSpace
) -> None:
    config = QuantConfig(
        {"conv1": 4, "conv2": 4, "conv3": 4, "fc1": 3, "fc2": 8}, {g: 1.0 for g in space.groups}
    )
    with pytest.warns(UserWarning, match=r"'conv1' \(Conv2d, 4 bits\).*only nn.Linear"):
        mapping = torchao_config(task.model, config)
    assert list(mapping.fqn_to_config) == ["fc1", "fc2"]
    fc1, fc2 = mapping.fqn_to_config["fc1"], mapping.fqn_to_config["fc2"]
    assert isinstance(fc1, IntxWeightOnlyConfig) and fc1.weight_dtype == torch.int3
    assert isinstance(fc2, Int8WeightOnlyConfig)
    # Above 8 bits torchao has nothing: the layer is named too.
    wide = QuantConfig({**dict(config.bits), "fc2": 12}, dict(config.widths))
    with pytest.warns(UserWarning, match=r"'fc2' \(Linear, 12 bits\)"):
        assert list(torchao_config(task.model, wide).fqn_to_config) == ["fc1"]


def test_int4_group_size_divides_the_pruned_inputs(
    task: Task, space: HessianSearchSpace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the choice is checked here, on the CPU: as if torch's int4 kernel were there.
    import optuna_ctpe.deploy.torchao as deploy_torchao

    monkeypatch.setattr(deploy_torchao, "_has_int4_kernel", lambda device, dtype: True)
    config = QuantConfig(
        {"conv1": 4, "conv2": 4, "conv3": 4, "fc1": 3, "fc2": 4},
        dict.fromkeys(space.groups, 0.75),
    )
    net = space.prune(task.model, config, task.example_inputs)
    with pytest.warns(UserWarning, match="only nn.Linear"):
        mapping = torchao_config(net, config).fqn_to_config
    # fc1 reads 24 x 16 = 384 inputs (groups of 128); fc2 reads 48, which no group size
    # divides: torchao would skip it silently, so it gets the per-channel int4 instead.
    assert isinstance(mapping["fc1"], Int4WeightOnlyConfig) and mapping["fc1"].group_size == 128
    assert isinstance(mapping["fc2"], IntxWeightOnlyConfig)
    assert mapping["fc2"].weight_dtype == torch.int4


def test_pruned_copy_runs_with_torchao_linear_and_fake_quantized_convolutions(
    task: Task, space: HessianSearchSpace
) -> None:
    config = QuantConfig(
        {"conv1": 2, "conv2": 3, "conv3": 6, "fc1": 4, "fc2": 8},
        dict.fromkeys(space.groups, 0.75),
    )
    with pytest.warns(UserWarning, match=r"layers 'conv1'.*'conv3' .* keep fake-quantized"):
        net = quantize_with_torchao(space, task.model, config, task.example_inputs)
    assert type(net.fc1.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(net.fc2.weight).__name__ == "Int8Tensor"
    assert net.fc1.weight.shape == (48, 24 * 16)  # pruned to 0.75 of 64 and 32 channels
    fake = space.apply(task.model, config, task.example_inputs)
    for name in CONVS:  # the convolutions hold exactly the fake-quantized weights
        assert torch.equal(getattr(net, name).weight, getattr(fake, name).weight)
    x, y = task.validation_batches[0]
    with torch.no_grad():
        out = net(x)
    assert out.shape == (540, 10) and bool(torch.isfinite(out).all())
    assert task.evaluate(net) > 0.5
    # The model itself is neither pruned nor quantized.
    assert type(task.model.fc1.weight) is nn.Parameter and task.model.fc1.weight.shape == (64, 512)


def test_outputs_match_fake_quantization_at_8_bits_and_drift_below(
    task: Task, space: HessianSearchSpace
) -> None:
    x, _ = task.validation_batches[0]
    with torch.no_grad():
        reference = task.model(x)
        errors = {}
        for bits in (8, 4, 2):
            config = space.uniform(bits)
            out = _quantize(space, task, config)(x)
            if bits == 8:
                fake = space.apply(task.model, config)(x)
                assert float((out - fake).abs().max() / fake.abs().max()) <= RTOL_8BIT
            errors[bits] = float((out - reference).abs().max())
    assert errors[8] < errors[4] < errors[2]


def test_tiny_bert_quantizes_every_linear(tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("transformers")
    from _tiny_hf import tiny_bert

    model = tiny_bert().eval()
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids}

    def loss_fn(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return net(input_ids=batch[0], labels=batch[1]).loss

    space = quiet(
        HessianSearchSpace.from_model,
        model,
        loss_fn,
        [(ids, torch.tensor([0, 1, 2, 0]))],
        bits=(2, 4, 8),
        widths=(0.5, 1.0),
        example_inputs=inputs,
        keep_first_last_bits=None,
        max_probes=4,
    )
    config = QuantConfig(
        {name: (2, 4, 8)[i % 3] for i, name in enumerate(space.sensitivities)},
        dict.fromkeys(space.groups, 0.5),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer is a Linear: nothing to warn about
        net = quantize_with_torchao(space, model, config, inputs)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == len(config.bits) == 14
    assert all(type(m.weight) is not nn.Parameter for m in linears)
    with torch.no_grad():
        logits = net(input_ids=ids).logits
        fake = space.apply(model, config, inputs)(input_ids=ids).logits
    assert logits.shape == fake.shape == (4, 3)
    assert bool(torch.isfinite(logits).all())


def test_bad_arguments_are_named(task: Task, space: HessianSearchSpace) -> None:
    config = space.uniform(8)
    with pytest.raises(ValueError, match="config must be a QuantConfig"):
        torchao_config(task.model, {"fc1": 8})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"names layers the model lacks: \['nope'\]"):
        torchao_config(task.model, QuantConfig({"nope": 8}))
    with pytest.raises(ValueError, match="dtype must be one of"):
        torchao_config(task.model, config, dtype=torch.int8)
    with pytest.raises(ValueError, match="device must be a torch device, got 'gpu0'"):
        torchao_config(task.model, config, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            quantize_with_torchao(space, task.model, config, device="cuda")
    with pytest.raises(ValueError, match="config.bits must name exactly the layers"):
        quantize_with_torchao(space, task.model, QuantConfig({"fc1": 8}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_uses_the_int4_kernel_in_bfloat16(task: Task, space: HessianSearchSpace) -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the tinygemm int4 kernel needs compute capability 8.0")
    config = space.uniform(4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no torchao weight-only path")
        mapping = torchao_config(task.model, config, device="cuda", dtype=torch.bfloat16)
        net = quantize_with_torchao(space, task.model, config, device="cuda", dtype=torch.bfloat16)
    # fc1's 512 inputs and fc2's 64 divide a tinygemm group size.
    assert all(isinstance(c, Int4WeightOnlyConfig) for c in mapping.fqn_to_config.values())
    x, _ = task.validation_batches[0]
    with torch.no_grad():
        out = net(x.to("cuda", torch.bfloat16)).float().cpu()
        fake = space.apply(task.model, config)(x)
    assert float((out - fake).abs().max() / fake.abs().max()) <= 0.2
