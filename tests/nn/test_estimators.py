"""Trace estimators against exact block traces of a tiny model (torch.autograd.functional)."""

from __future__ import annotations

import pytest


torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.autograd.functional import hessian  # noqa: E402
from torch.autograd.functional import jacobian  # noqa: E402
from torch.func import functional_call  # noqa: E402

from optuna_ctpe.nn import _output_hessian  # noqa: E402
from optuna_ctpe.nn._output_hessian import output_hessian_factor  # noqa: E402
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


def _criterion(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(z, y)


def _loss(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return _criterion(net(batch[0]), batch[1])


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": model.get_submodule(n).weight.detach() for n in NAMES}


def _call(model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, weights, (x,), strict=False)


def _block(model: nn.Module, key: str, x: torch.Tensor):  # type: ignore[no-untyped-def]
    """The model's output on ``x`` as a function of the weight ``key`` alone."""
    w0 = _weights(model)
    return w0[key], lambda w: _call(model, {**w0, key: w}, x)


def _exact_hessian_traces(model: nn.Module, batches: list, criterion=_criterion) -> dict:  # type: ignore[no-untyped-def]
    """Block traces of the Hessian of ``criterion(model(x), y)`` averaged over ``batches``."""
    out = dict.fromkeys(NAMES, 0.0)
    for x, y in batches:
        for n in NAMES:
            w, forward = _block(model, f"{n}.weight", x)
            h = hessian(lambda w, f=forward, y=y: criterion(f(w), y), w)
            out[n] += float(h.reshape(w.numel(), -1).trace()) / len(batches)
    return out


def _exact_ggn_traces(model: nn.Module, batches: list, criterion=_criterion) -> dict:  # type: ignore[no-untyped-def]
    """Block traces of ``Jᵀ H_z J``, from explicit Jacobians and the (dense) output Hessian."""
    out = dict.fromkeys(NAMES, 0.0)
    for x, y in batches:
        z = model(x).detach()
        h_z = hessian(lambda o, y=y: criterion(o, y), z)
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


def _block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*(b @ b.T for b in blocks))


def test_block_and_dense_factors_both_give_the_output_hessian() -> None:
    # Cross-entropy's Hessian in the logits: one 4 x 4 block of rank 3 per sample (softmax
    # Hessians annihilate the all-ones vector); a (1, 24) leaf has no sample dimension, so the
    # same loss is factored densely.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=g)
    exact = hessian(lambda o: _criterion(o, y), z).reshape(24, 24)
    per_sample = z.clone().requires_grad_(True)
    blocks = output_hessian_factor(_criterion(per_sample, y), [per_sample], 0)
    whole = z.reshape(1, 24).clone().requires_grad_(True)
    dense = output_hessian_factor(_criterion(whole.view(6, 4), y), [whole], 0)
    assert blocks.blocks.shape == (6, 4, 3)
    assert dense.blocks.shape == (1, 24, 18)
    torch.testing.assert_close(_block_diagonal(blocks.blocks), exact, atol=1e-10, rtol=0)
    torch.testing.assert_close(_block_diagonal(dense.blocks), exact, atol=1e-10, rtol=0)


def test_block_factor_spans_outputs_sample_by_sample_and_skips_unread_ones(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Two read outputs (2 and 3 numbers per sample) and one never read (50 per sample): the
    # blocks are 5 x 5, sample-major, and the unread output neither counts nor is covered.
    monkeypatch.setattr(_output_hessian, "MAX_OUTPUTS", 10)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (z[:, :2], z[:, 2:], z.repeat(1, 10))]
    factor = output_hessian_factor(_criterion(torch.cat(leaves[:2], 1), y), leaves, 0)
    assert factor.outputs == (0, 1)
    assert factor.blocks.shape == (6, 5, 4)
    exact = hessian(lambda o: _criterion(o, y), z).reshape(30, 30)
    torch.testing.assert_close(_block_diagonal(factor.blocks), exact, atol=1e-10, rtol=0)


@pytest.mark.parametrize("criterion", [_criterion, nn.functional.mse_loss])
def test_float32_rounding_does_not_look_like_coupled_samples(criterion) -> None:  # type: ignore[no-untyped-def]
    # The block check compares two float32 Hessian-vector products; its tolerance must sit
    # above their rounding on real sizes (64 samples of 300 numbers).
    g = torch.Generator().manual_seed(2)
    z = (10 * torch.randn(64, 300, generator=g)).requires_grad_(True)
    target = torch.randint(0, 300, (64,), generator=g)
    if criterion is nn.functional.mse_loss:
        target = torch.randn(64, 300, generator=g)
    factor = output_hessian_factor(criterion(z, target), [z], 0)
    assert factor.blocks.shape[:2] == (64, 300)


class _Parts(nn.Module):
    """``net``'s output in two parts, and a large third output the loss never reads."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = self.net(x)
        return z[:, :2], z[:, 2:], z.repeat(1, 50)


def test_ggn_takes_batches_beyond_the_dense_limit(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # 24 output numbers, at most 10 dense: the per-sample blocks (4 numbers) take them.
    monkeypatch.setattr(_output_hessian, "MAX_OUTPUTS", 10)
    model, batches = _model(), _batches(2)
    estimate = ggn_traces(model, _loss, batches, max_probes=600, rtol=0)
    _within(estimate, _exact_ggn_traces(model, batches))

    # The same model with its output in parts: the same factor, draws and products, so the
    # same estimates; the unread output (200 numbers per sample) is not factored.
    def parts_loss(net: nn.Module, batch: tuple) -> torch.Tensor:
        return _criterion(torch.cat(net(batch[0])[:2], 1), batch[1])

    parts = ggn_traces(_Parts(model), parts_loss, batches, max_probes=600, rtol=0)
    for n in NAMES:
        assert parts[f"net.{n}"].trace == pytest.approx(estimate[n].trace, rel=1e-9)


def _summed_over_samples(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (z.sum(0) ** 2).sum()


def _softmax_over_samples(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(z.T, y[: z.shape[1]] % z.shape[0])


COUPLED = [_summed_over_samples, _softmax_over_samples]


@pytest.mark.parametrize("criterion", COUPLED)
def test_ggn_detects_a_loss_coupling_the_samples_and_forms_it_densely(criterion) -> None:  # type: ignore[no-untyped-def]
    model, batches = _model(), _batches(2)
    x, y = batches[0]
    z = model(x).detach().requires_grad_(True)
    factor = output_hessian_factor(criterion(z, y), [z], 0)
    assert factor.blocks.shape[:2] == (1, 24)
    exact = hessian(lambda o: criterion(o, y), z.detach()).reshape(24, 24)
    torch.testing.assert_close(_block_diagonal(factor.blocks), exact, atol=1e-10, rtol=0)

    def loss(net: nn.Module, batch: tuple) -> torch.Tensor:
        return criterion(net(batch[0]), batch[1])

    estimate = ggn_traces(model, loss, batches, max_probes=400, rtol=0)
    _within(estimate, _exact_ggn_traces(model, batches, criterion))


@pytest.mark.parametrize("criterion", COUPLED)
def test_ggn_refuses_coupled_samples_beyond_the_dense_limit(monkeypatch, criterion) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(_output_hessian, "MAX_OUTPUTS", 10)

    def loss(net: nn.Module, batch: tuple) -> torch.Tensor:
        return criterion(net(batch[0]), batch[1])

    message = r"couples the samples of batch 0 .* its 24 output numbers .* \(at most 10\)"
    with pytest.raises(ValueError, match=message):
        ggn_traces(_model(), loss, _batches(), max_probes=3)


@pytest.mark.parametrize(
    ("shape", "max_blocks", "message"),
    [
        ((1, 24), 10**6, r"share no sample dimension .* 24 output numbers"),
        ((6, 4), 50, r"blocks are too large \(6 samples of 4 numbers: .* 50 in all blocks\)"),
    ],
)
def test_output_hessian_refuses_what_fits_neither_way(
    monkeypatch, shape, max_blocks, message
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(_output_hessian, "MAX_OUTPUTS", 10)
    monkeypatch.setattr(_output_hessian, "MAX_BLOCK_NUMBERS", max_blocks)
    z = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        output_hessian_factor(_criterion(z.view(6, 4), torch.zeros(6, dtype=torch.long)), [z], 0)


class _Normalize(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(z, dim=-1)


def _squared_distance(e: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((e - reference) ** 2).sum(-1).mean()


def test_ggn_is_the_hessian_of_a_distillation_loss_at_its_own_embeddings() -> None:
    # A stand-in for the MiniLM task: unit-length embeddings, scored against the model's own
    # (zero residual), so the Hessian's other term, weighted by the residual, vanishes.
    model = nn.Sequential(*_model(), _Normalize())
    x = _batches(1)[0][0]
    with torch.no_grad():
        own = [(x, model(x))]
        other = [(x, nn.Sequential(*_model(seed=1), _Normalize())(x))]
    hess = _exact_hessian_traces(model, own, _squared_distance)
    ggn = _exact_ggn_traces(model, own, _squared_distance)
    for n in NAMES:
        assert ggn[n] > 0
        assert hess[n] == pytest.approx(ggn[n], rel=1e-6)
    # Against another model's embeddings the residual is not zero, and the two differ.
    hess, far = (
        f(model, other, _squared_distance) for f in (_exact_hessian_traces, _exact_ggn_traces)
    )
    assert any(abs(hess[n] - far[n]) > 0.01 * far[n] for n in NAMES)

    def loss(net: nn.Module, batch: tuple) -> torch.Tensor:
        return _squared_distance(net(batch[0]), batch[1])

    _within(ggn_traces(model, loss, own, max_probes=400, rtol=0), ggn)
