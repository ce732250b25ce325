"""Quantization-aware fine-tuning (optuna_ctpe.nn.finetune, and the CLI's build_model over it),
also of layers whose weight is not a module's ``weight`` along axis 0: MultiheadAttention's
fused ``in_proj_weight`` and ConvTranspose's axis 1."""

from __future__ import annotations

import warnings

import pytest


torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from optuna_ctpe import HessianSearchSpace  # noqa: E402
from optuna_ctpe.cli.objective import build_model  # noqa: E402
from optuna_ctpe.nn.finetune import finetune_quantized  # noqa: E402
from optuna_ctpe.tasks import Task  # noqa: E402


pytestmark = pytest.mark.torch


class _Net(nn.Module):
    """Attention over 5 tokens of 16 features, then a transposed convolution and a head (the
    first and last layers, ``embed`` and ``head``, keep their fixed 8 bits)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.up = nn.ConvTranspose1d(16, 6, kernel_size=2, stride=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        out, _ = self.attn(x, x, x)
        return self.head(self.up(out.transpose(1, 2)).mean(2))


def _task() -> Task:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 5, 16, generator=g), torch.randint(0, 3, (8,), generator=g))

    def loss_fn(net: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(net(b[0]), b[1])

    def evaluate(net: nn.Module) -> float:
        with torch.no_grad():
            return float((net(batch[0]).argmax(1) == batch[1]).float().mean())

    return Task("attn", _Net().eval(), loss_fn, [batch], [batch], batch[0][:1], evaluate)


def _levels_per_channel(weight: torch.Tensor, axis: int) -> int:
    rows = weight.detach().movedim(axis, 0).reshape(weight.shape[axis], -1)
    return max(len(torch.unique(row)) for row in rows)


def test_finetuned_model_quantizes_parameter_layers_along_their_output_axis() -> None:
    task = _task()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random init: negative-trace warnings
        space = HessianSearchSpace.from_model(
            task.model, task.loss_fn, task.calibration_batches, widths=(1.0,), max_probes=4
        )
    assert {"attn.in_proj_weight", "up"} <= set(space.sensitivities)
    config = space.uniform(2)
    assert config.bits["attn.in_proj_weight"] == config.bits["up"] == 2
    epochs: list[int] = []
    net = build_model(
        space, task, config, finetune_epochs=2, on_epoch=lambda e, a: epochs.append(e)
    )
    assert epochs == [0, 1]
    # 2-bit symmetric: at most 3 levels per output channel, along the right axis each.
    assert _levels_per_channel(net.attn.in_proj_weight, 0) <= 3
    assert _levels_per_channel(net.up.weight, 1) <= 3
    # The parametrizations are baked in: a plain module with the original parameter names.
    assert set(net.state_dict()) == set(task.model.state_dict())
    assert not any("parametrizations" in name for name, _ in net.named_parameters())
    # Fine-tuning moved the weights away from the plain quantized copy, and left the task's
    # model alone.
    plain = space.apply(task.model, config, task.example_inputs)
    assert not torch.equal(net.attn.in_proj_weight, plain.attn.in_proj_weight)
    assert _levels_per_channel(task.model.attn.in_proj_weight, 0) > 3


def _space(task: Task) -> HessianSearchSpace:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random init: negative-trace warnings
        return HessianSearchSpace.from_model(
            task.model, task.loss_fn, task.calibration_batches, widths=(1.0,), max_probes=4
        )


def test_zero_epochs_only_quantize_as_apply_does() -> None:
    task = _task()
    space = _space(task)
    config = space.uniform(3)
    net = space.prune(task.model, config)
    out = finetune_quantized(net, config.bits, task.loss_fn, task.calibration_batches, epochs=0)
    assert out is net and not out.training
    plain = space.apply(task.model, config)
    assert set(out.state_dict()) == set(plain.state_dict())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in out.state_dict().items())


def test_cli_build_model_is_the_library_function() -> None:
    # The command line adds nothing of its own: the same epochs give the same weights.
    task = _task()
    space = _space(task)
    config = space.uniform(2)
    accuracies: list[float] = []
    cli = build_model(
        space, task, config, finetune_epochs=2, on_epoch=lambda e, a: accuracies.append(a)
    )
    seen: list[float] = []
    library = finetune_quantized(
        space.prune(task.model, config),
        config.bits,
        task.loss_fn,
        task.calibration_batches,
        epochs=2,
        on_epoch=lambda e, net: seen.append(task.evaluate(net)),
    )
    assert accuracies == seen and len(seen) == 2
    assert all(torch.equal(v, library.state_dict()[k]) for k, v in cli.state_dict().items())


def test_stopping_in_on_epoch_still_bakes_the_quantized_weights() -> None:
    task = _task()
    space = _space(task)
    config = space.uniform(2)
    net = space.prune(task.model, config)

    def stop(epoch: int, model: nn.Module) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_quantized(
            net, config.bits, task.loss_fn, task.calibration_batches, epochs=3, on_epoch=stop
        )
    assert not any("parametrizations" in name for name, _ in net.named_parameters())
    assert _levels_per_channel(net.attn.in_proj_weight, 0) <= 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": -1}, "epochs must be .*got -1"),
        ({"epochs": 1.5}, "epochs must be .*got 1.5"),
        ({"epochs": 1, "lr": 0.0}, "lr must be .*got 0.0"),
        ({"epochs": 1, "batches": []}, "batches must hold at least one batch"),
        ({"epochs": 1, "bits": {"nope": 4}}, "nope"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], match: str) -> None:
    task = _task()
    arguments: dict[str, object] = {
        "bits": {"embed": 8},
        "loss_fn": task.loss_fn,
        "batches": task.calibration_batches,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        finetune_quantized(task.model, **arguments)  # type: ignore[arg-type]
