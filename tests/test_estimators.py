"""Trace estimators against exact block traces of a tiny model (torch.autograd.functional)."""

from __future__ import annotations

import pytest


torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.autograd.functional import hessian  # noqa: E402
from torch.autograd.functional import jacobian  # noqa: E402
from torch.func import functional_call  # noqa: E402

from optuna_ctpe.nn import ggn as ggn_module  # noqa: E402
from optuna_ctpe.nn.ggn import ggn_traces  # noqa: E402
from optuna_ctpe.nn.hutchinson import hutchinson_traces  # noqa: E402
from optuna_ctpe.nn.sensitivity import ESTIMATORS  # noqa: E402
from optuna_ctpe.nn.split import split_traces  # noqa: E402


NAMES = ("0", "2")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()


def _batches(n_batches: int = 1, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(6, 3, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (6,), generator=g),
        )
        for _ in range(n_batches)
    ]


def _loss(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(net(batch[0]), batch[1])


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": model.get_submodule(n).weight.detach() for n in NAMES}


def _call(model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, weights, (x,), strict=False)


def _block(model: nn.Module, key: str, x: torch.Tensor):  # type: ignore[no-untyped-def]
    """The model's output on ``x`` as a function of the weight ``key`` alone."""
    w0 = _weights(model)
    return w0[key], lambda w: _call(model, {**w0, key: w}, x)


def _exact_hessian_traces(model: nn.Module, batches: list) -> dict[str, float]:
    """Block traces of the Hessian of the loss averaged over ``batches``."""
    out = dict.fromkeys(NAMES, 0.0)
    for x, y in batches:
        for n in NAMES:
            w, forward = _block(model, f"{n}.weight", x)
            h = hessian(lambda w, f=forward, y=y: nn.functional.cross_entropy(f(w), y), w)
            out[n] += float(h.reshape(w.numel(), -1).trace()) / len(batches)
    return out


def _exact_ggn_traces(model: nn.Module, batches: list) -> dict[str, float]:
    """Block traces of ``Jᵀ H_z J``, from explicit Jacobians and the output-space Hessian."""
    out = dict.fromkeys(NAMES, 0.0)
    for x, y in batches:
        z = model(x).detach()
        h_z = hessian(lambda o, y=y: nn.functional.cross_entropy(o, y), z)
        h_z = h_z.reshape(z.numel(), -1)
        for n in NAMES:
            w, forward = _block(model, f"{n}.weight", x)
            j = jacobian(forward, w).reshape(z.numel(), -1)
            out[n] += float((j.T @ h_z @ j).trace()) / len(batches)
    return out


def _within(estimate: dict, exact: dict, sigmas: float = 4.0) -> None:
    for n in NAMES:
        t = estimate[n]
        assert abs(t.trace - exact[n]) <= sigmas * t.stderr + 1e-9, (n, t, exact[n])


@pytest.mark.parametrize("n_batches", [1, 2])
def test_ggn_trace_matches_the_exact_ggn_trace(n_batches: int) -> None:
    model, batches = _model(), _batches(n_batches)
    exact = _exact_ggn_traces(model, batches)
    estimate = ggn_traces(model, _loss, batches, max_probes=600, rtol=0)
    _within(estimate, exact)
    for n in NAMES:
        assert estimate[n].trace == pytest.approx(exact[n], rel=0.15)
        assert estimate[n].n_probes == 600


def test_hutchinson_trace_matches_the_exact_hessian_trace() -> None:
    model, batches = _model(), _batches(1)
    exact = _exact_hessian_traces(model, batches)
    _within(hutchinson_traces(model, _loss, batches, max_probes=1000, rtol=0), exact)


def test_split_trace_matches_the_exact_hessian_trace() -> None:
    model, batches = _model(), _batches(2)
    exact = _exact_hessian_traces(model, batches)
    estimate = split_traces(model, _loss, batches, max_probes=400, rtol=0)
    _within(estimate, exact)


def test_split_is_less_noisy_than_hutchinson_near_a_minimum() -> None:
    # Fitted to its own argmax labels, the model sits where the residual R = H - G is small, so
    # the GGN part (no cross-layer terms) carries most of the trace.
    model, batches = _model(), _batches(1)
    x = batches[0][0]
    with torch.no_grad():
        model[2].weight.mul_(20)
    fitted = [(x, model(x).argmax(1))]
    split = split_traces(model, _loss, fitted, max_probes=200, rtol=0, seed=1)
    hutch = hutchinson_traces(model, _loss, fitted, max_probes=200, rtol=0, seed=1)
    for n in NAMES:
        assert split[n].stderr < hutch[n].stderr, n


def test_split_takes_a_loss_linear_in_the_outputs() -> None:
    # G = 0, so the estimate is Hutchinson's on R = H; tanh makes H non-zero.
    def linear(net: nn.Module, batch: tuple) -> torch.Tensor:
        return net(batch[0]).sum()

    traces = split_traces(_model(), linear, _batches(), max_probes=10, rtol=0)
    assert any(t.trace != 0 for t in traces.values())


def test_split_is_reproducible_by_seed_and_registered() -> None:
    model, batches = _model(), _batches(2)
    one = split_traces(model, _loss, batches, max_probes=10, rtol=0, seed=3)
    assert one == split_traces(model, _loss, batches, max_probes=10, rtol=0, seed=3)
    assert one != split_traces(model, _loss, batches, max_probes=10, rtol=0, seed=4)
    assert ESTIMATORS["split"] is split_traces


def test_ggn_blocks_equal_hessian_blocks_in_a_piecewise_linear_network() -> None:
    # With ReLU the outputs are piecewise linear in each layer's weight alone, so the model's
    # own curvature has no diagonal block: Tr(H_ll) = Tr(G_ll), trained or not.
    model, batches = _model(), _batches(2)
    model[1] = nn.ReLU()
    hess, ggn = _exact_hessian_traces(model, batches), _exact_ggn_traces(model, batches)
    for n in NAMES:
        assert hess[n] == pytest.approx(ggn[n], rel=1e-9, abs=1e-12)


def test_ggn_differs_from_the_hessian_away_from_a_minimum() -> None:
    # An untrained model: the Hessian keeps the model's own curvature, which the GGN drops, so
    # the exact references differ; the GGN estimate follows its own.
    model, batches = _model(), _batches(1)
    hess, ggn = _exact_hessian_traces(model, batches), _exact_ggn_traces(model, batches)
    assert any(abs(hess[n] - ggn[n]) > 0.05 * abs(ggn[n]) for n in NAMES)


@pytest.mark.parametrize("seed", range(5))
def test_ggn_traces_are_never_negative(seed: int) -> None:
    model, batches = _model(seed), _batches(1, seed)
    for t in ggn_traces(model, _loss, batches, max_probes=4, rtol=0, seed=seed).values():
        assert t.trace >= 0
        assert t.stderr >= 0


def test_ggn_traces_are_reproducible_by_seed() -> None:
    model, batches = _model(), _batches(2)
    one = ggn_traces(model, _loss, batches, max_probes=20, rtol=0, seed=3)
    assert one == ggn_traces(model, _loss, batches, max_probes=20, rtol=0, seed=3)
    assert one != ggn_traces(model, _loss, batches, max_probes=20, rtol=0, seed=4)


def test_ggn_leaves_the_model_unchanged() -> None:
    model, batches = _model(), _batches(1)
    model.train()
    model[0].weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ggn_traces(model, _loss, batches, max_probes=5)
    assert model.training
    assert not model[0].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not model._forward_hooks


def test_ggn_is_registered() -> None:
    assert ESTIMATORS["ggn"] is ggn_traces


def test_ggn_refuses_a_loss_that_calls_the_model_twice() -> None:
    def twice(net: nn.Module, batch: tuple) -> torch.Tensor:
        return _loss(net, batch) + net(batch[0]).pow(2).mean()

    with pytest.raises(ValueError, match="exactly once, but it called it 2 times"):
        ggn_traces(_model(), twice, _batches(), max_probes=3)


def test_ggn_refuses_a_loss_linear_in_the_outputs() -> None:
    def linear(net: nn.Module, batch: tuple) -> torch.Tensor:
        return net(batch[0]).sum()

    with pytest.raises(ValueError, match="no curvature"):
        ggn_traces(_model(), linear, _batches(), max_probes=3)


def test_ggn_refuses_outputs_too_large_for_a_dense_hessian(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ggn_module, "MAX_OUTPUTS", 10)
    with pytest.raises(ValueError, match=r"24 output numbers \(at most 10\)"):
        ggn_traces(_model(), _loss, _batches(), max_probes=3)
