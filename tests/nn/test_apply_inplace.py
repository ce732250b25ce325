"""``HessianSearchSpace.applied``: the model quantized in place, bit for bit ``apply``'s copy,
and restored exactly on exit; the weight cache; the command line's models per thread."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from optuna_ctpe import HessianSearchSpace
from optuna_ctpe.cli.objective import _WorkingCopies
from optuna_ctpe.cli.objective import Objective
from optuna_ctpe.cli.settings import Settings
from optuna_ctpe.nn.apply import quantized_in_place
from optuna_ctpe.nn.apply import WeightCache
from optuna_ctpe.nn.layers import model_layers
from optuna_ctpe.space.records import LayerSensitivity
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.tasks import Task
from optuna_ctpe.tasks.digits import DigitsCNN


BITS = (2, 3, 4, 8)


class Conv1D(nn.Module):
    """GPT-2's linear layer as transformers defines it: weight (in, out), matched by name."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Attention(nn.Module):
    """MultiheadAttention (a fused in_proj_weight), a Conv1D and two tied Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = Conv1D(16, 16)
        self.up = nn.Linear(16, 16)
        self.down = nn.Linear(16, 16)
        self.down.weight = self.up.weight  # tied: one layer, quantized once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.down(torch.relu(self.up(self.mlp(x))))


class Transposed(nn.Module):
    """ConvTranspose layers (output channels on axis 1), one grouped, and a Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.t1 = nn.ConvTranspose2d(3, 6, 3, stride=2)
        self.t2 = nn.ConvTranspose2d(6, 4, 3, groups=2)
        self.c = nn.Conv1d(4, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.t2(torch.relu(self.t1(x)))
        return self.c(y.flatten(2))


def _space(model: nn.Module) -> HessianSearchSpace:
    """A bits-only space over every layer of ``model`` (the traces do not matter here)."""
    layers = [
        LayerSensitivity(name, 1.0, layer.weight.numel(), {b: 1.0 / b for b in BITS})
        for name, layer in model_layers(model).items()
    ]
    return HessianSearchSpace(layers, bits=BITS, widths=(1.0,), budget=1e9)


def _configs(space: HessianSearchSpace, n: int = 4) -> list[QuantConfig]:
    rng = np.random.default_rng(0)
    names = list(space.sensitivities)
    return [space.uniform(3)] + [
        QuantConfig({name: int(rng.choice(BITS)) for name in names}) for _ in range(n)
    ]


def _cases() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return [
        ("digits-cnn", DigitsCNN().eval(), torch.randn(5, 1, 8, 8)),
        ("attention", Attention().eval(), torch.randn(2, 7, 16)),
        ("transposed", Transposed().eval(), torch.randn(2, 3, 5, 5)),
    ]


def _snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Every state tensor: a clone of its values and its storage address."""
    return {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict(keep_vars=True).items()}


def _assert_restored(model: nn.Module, before: dict[str, tuple[torch.Tensor, int]]) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for key, (values, address) in before.items():
        assert after[key].data_ptr() == address, key  # the original tensor, not a copy of it
        assert torch.equal(after[key].detach(), values), key


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("cached", [False, True])
def test_outputs_equal_apply_and_model_is_restored(case, cached: bool) -> None:  # type: ignore[no-untyped-def]
    _, model, x = case
    space = _space(model)
    cache = WeightCache() if cached else None
    before = _snapshot(model)
    with torch.no_grad():
        for _ in range(2):  # the second round is served by the cache
            for config in _configs(space):
                expected = space.apply(model, config)(x)
                with space.applied(model, config, cache=cache) as net:
                    assert net is model
                    assert torch.equal(net(x), expected)
                _assert_restored(model, before)
    if cached:
        assert len(cache) > 0


def test_weights_are_quantized_inside_the_block() -> None:
    """Fails if the block does not quantize, or if the exit skips the restore."""
    _, model, x = _cases()[1]
    space = _space(model)
    config = space.uniform(2)
    before = _snapshot(model)
    with torch.no_grad():
        full = model(x)
        with space.applied(model, config):
            assert not torch.equal(model(x), full)
            changed = [
                k for k, (v, _) in before.items() if not torch.equal(model.state_dict()[k], v)
            ]
        # Every layer, and the tied tensor under both its names.
        layers = {layer.param_name for layer in model_layers(model).values()}
        assert set(changed) == layers | {"down.weight"}
        assert torch.equal(model(x), full)
    _assert_restored(model, before)
    # The tied pair is one parameter: both modules still share it.
    assert model.down.weight is model.up.weight


@pytest.mark.parametrize("cached", [False, True])
def test_restored_after_an_exception(cached: bool) -> None:
    _, model, x = _cases()[0]
    space = _space(model)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="inside"):
        with space.applied(model, space.uniform(2), cache=WeightCache() if cached else None):
            raise RuntimeError("inside the block")
    _assert_restored(model, before)


def test_a_bad_layer_restores_the_layers_already_swapped() -> None:
    _, model, _ = _cases()[0]
    before = _snapshot(model)
    names = list(model_layers(model))
    with pytest.raises(ValueError, match="bits names layers the model lacks"):
        with quantized_in_place(model, {names[0]: 4, "nowhere": 4}):
            pass
    _assert_restored(model, before)


def test_tied_layers_need_one_bit_width() -> None:
    model = Attention()
    with pytest.raises(ValueError, match="tied"):
        with quantized_in_place(model, {"up": 4, "down": 8}):
            pass


def test_the_cache_never_serves_a_stale_weight() -> None:
    _, model, x = _cases()[0]
    space = _space(model)
    cache = WeightCache()
    config = space.uniform(4)
    with space.applied(model, config, cache=cache):
        pass
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # an optimiser step, say
        expected = space.apply(model, config)(x)
        with space.applied(model, config, cache=cache) as net:
            assert torch.equal(net(x), expected)
        model.load_state_dict({k: v * 0.5 for k, v in model.state_dict().items()})
        expected = space.apply(model, config)(x)
        with space.applied(model, config, cache=cache) as net:
            assert torch.equal(net(x), expected)
            # A write to a quantized weight inside the block spoils its cached tensor.
            next(iter(model_layers(model).values())).weight.add_(1.0)
        expected = space.apply(model, config)(x)
        with space.applied(model, config, cache=cache) as net:
            assert torch.equal(net(x), expected)


def test_the_cache_keeps_at_most_max_bytes() -> None:
    _, model, _ = _cases()[0]
    space = _space(model)
    largest = max(layer.weight.numel() * 4 for layer in model_layers(model).values())
    cache = WeightCache(max_bytes=largest)
    for b in BITS:
        with space.applied(model, space.uniform(b), cache=cache):
            pass
        assert 0 < cache.nbytes <= largest
    with pytest.raises(ValueError, match="max_bytes"):
        WeightCache(max_bytes=-1)


def test_a_width_below_one_falls_back_to_a_pruned_copy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 3),
    ).eval()  # fmt: skip
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trace of layer.*is negative")
        space = HessianSearchSpace.from_model(
            model,
            lambda net, batch: nn.functional.cross_entropy(net(batch[0]), batch[1]),
            [(x, y)],
            widths=(0.5, 1.0),
            example_inputs=x[:1],
            max_probes=4,
            keep_first_last_bits=None,
        )
    assert space.groups
    config = space.uniform(4, 0.5)
    before = _snapshot(model)
    with torch.no_grad():
        with space.applied(model, config, x[:1]) as net:
            assert net is not model
            assert torch.equal(net(x), space.apply(model, config, x[:1])(x))
        with pytest.raises(ValueError, match="example_inputs is required"):
            with space.applied(model, config):
                pass
    _assert_restored(model, before)


def test_a_config_that_does_not_fit_is_refused_before_the_block() -> None:
    _, model, _ = _cases()[0]
    space = _space(model)
    with pytest.raises(ValueError, match="config.bits must name exactly"):
        space.applied(model, QuantConfig({"conv1": 4}))


def test_working_copies_one_per_thread_made_once_and_never_the_task_model() -> None:
    model = nn.Linear(3, 3)
    copies = _WorkingCopies(model)
    net, cache = copies.get()
    assert net is not model and torch.equal(net.weight, model.weight)
    assert isinstance(cache, WeightCache)
    assert copies.get() == (net, cache)  # the same copy for every trial of this thread
    per_thread: list[nn.Module] = []

    def trial() -> None:
        per_thread.append(copies.get()[0])

    threads = [threading.Thread(target=trial) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len({id(n) for n in [net, *per_thread]}) == 4
    assert not any(n is model for n in per_thread)


def test_the_objective_scores_like_apply_and_never_touches_the_task_model() -> None:
    _, model, x = _cases()[0]
    space = _space(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[nn.Module] = []

    def evaluate(net: nn.Module) -> float:
        seen.append(net)
        with torch.no_grad():
            return float(net(x).sum())

    settings = Settings(
        task="t:t",
        seed=0,
        objective="budget",
        size_budget=1.0,
        bits=BITS,
        widths=(1.0,),
        hessian_pruning=False,
        finetune_epochs=0,
    )
    task = Task("t", model, lambda n, b: n(b).sum(), [x], [x], x[:1], evaluate)
    objective = Objective(space, task, settings, "random")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    study.optimize(objective, n_trials=4)
    assert all(net is not model for net in seen)
    for trial in study.trials:
        config = space.config_from_params(trial.params)
        expected = evaluate(space.apply(model, config))
        assert trial.user_attrs["accuracy"] == expected
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
