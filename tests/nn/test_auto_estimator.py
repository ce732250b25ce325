"""``estimator="auto"``: the GGN where the loss fits it, Hutchinson's otherwise."""

from __future__ import annotations

import logging

import pytest


torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from optuna_ctpe.nn.ggn import ggn_misfit  # noqa: E402
from optuna_ctpe.nn.sensitivity import ESTIMATOR_NAMES  # noqa: E402
from optuna_ctpe.nn.sensitivity import estimator  # noqa: E402
from optuna_ctpe.nn.sensitivity import resolve_estimator  # noqa: E402
from optuna_ctpe.search_space import HessianSearchSpace  # noqa: E402


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, generator=g), torch.randint(0, 4, (16,), generator=g))]


def _cross_entropy(net: nn.Module, batch: tuple) -> torch.Tensor:
    return nn.functional.cross_entropy(net(batch[0]), batch[1])


def _twice(net: nn.Module, batch: tuple) -> torch.Tensor:
    return _cross_entropy(net, batch) + net(batch[0]).pow(2).mean()


class _Normalised(nn.Module):
    """A model that normalises its own output, as a sentence encoder does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x), dim=-1)


def _linear(net: nn.Module, batch: tuple) -> torch.Tensor:  # 1 - e·e0: linear in the output e
    return (1 - net(batch[0])[:, 0]).mean()


def _concave(net: nn.Module, batch: tuple) -> torch.Tensor:
    return -net(batch[0]).pow(2).mean()


def test_auto_takes_the_ggn_for_a_loss_convex_in_the_outputs(caplog) -> None:  # type: ignore[no-untyped-def]
    model, batches = _model(), _batches()
    assert ggn_misfit(model, _cross_entropy, batches) is None
    with caplog.at_level(logging.INFO, logger="optuna_ctpe.nn.sensitivity"):
        assert resolve_estimator("auto", model, _cross_entropy, batches) == "ggn"
    assert "using 'ggn'" in caplog.text


@pytest.mark.parametrize(
    "loss_fn, reason",
    [
        (_twice, "exactly once"),
        (_linear, "no curvature"),
        (_concave, "not convex"),
    ],
)
def test_auto_falls_back_to_hutchinson_and_says_why(loss_fn, reason, caplog) -> None:  # type: ignore[no-untyped-def]
    model, batches = (_Normalised() if loss_fn is _linear else _model()), _batches()
    assert reason in ggn_misfit(model, loss_fn, batches)
    with caplog.at_level(logging.INFO, logger="optuna_ctpe.nn.sensitivity"):
        assert resolve_estimator("auto", model, loss_fn, batches) == "hutchinson"
    assert reason in caplog.text


def test_the_check_leaves_the_model_as_it_was() -> None:
    model, batches = _model(), _batches()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    ggn_misfit(model, _cross_entropy, batches)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_named_estimators_resolve_to_themselves_and_bad_names_are_refused() -> None:
    model, batches = _model(), _batches()
    for name in ESTIMATOR_NAMES[1:]:
        assert resolve_estimator(name, model, _twice, batches) == name
    with pytest.raises(ValueError, match="estimator must be one of.*'auto'.*got 'hessian'"):
        resolve_estimator("hessian", model, _cross_entropy, batches)
    with pytest.raises(ValueError, match="resolve it with resolve_estimator"):
        estimator("auto")


def test_one_registry_of_estimator_names() -> None:
    # The torch-free registry (what the CLI's parser and from_model's signature read) names
    # exactly the estimators there are, "auto" first.
    import inspect
    import typing

    from optuna_ctpe import nn as ctpe_nn
    from optuna_ctpe import search_space
    from optuna_ctpe.cli.root import build_parser
    from optuna_ctpe.nn.sensitivity import ESTIMATORS

    assert ESTIMATOR_NAMES is ctpe_nn.ESTIMATOR_NAMES
    assert ESTIMATOR_NAMES == ("auto", *ESTIMATORS)
    assert typing.get_args(ctpe_nn.EstimatorName) == ESTIMATOR_NAMES
    parameter = inspect.signature(HessianSearchSpace.from_model).parameters["estimator"]
    assert parameter.annotation == "EstimatorName" and parameter.default == "auto"
    assert search_space.EstimatorName is ctpe_nn.EstimatorName
    commands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    option = next(a for a in commands["sensitivity"]._actions if "--estimator" in a.option_strings)
    assert tuple(option.choices) == ESTIMATOR_NAMES


def test_from_model_defaults_to_auto() -> None:
    model, batches = _model(), _batches()
    kwargs = {"bits": (2, 4, 8), "keep_first_last_bits": None, "max_probes": 20, "rtol": 0.0}
    default = HessianSearchSpace.from_model(model, _cross_entropy, batches, **kwargs)
    ggn = HessianSearchSpace.from_model(model, _cross_entropy, batches, estimator="ggn", **kwargs)
    hutchinson = HessianSearchSpace.from_model(
        model, _cross_entropy, batches, estimator="hutchinson", **kwargs
    )
    assert default.sensitivities == ggn.sensitivities
    assert default.sensitivities != hutchinson.sensitivities
    fallback = HessianSearchSpace.from_model(model, _twice, batches, **kwargs)
    assert (
        fallback.sensitivities
        == HessianSearchSpace.from_model(
            model, _twice, batches, estimator="hutchinson", **kwargs
        ).sensitivities
    )
