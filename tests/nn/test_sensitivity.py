"""Tests of optuna_ctpe.nn.sensitivity: Hutchinson and empirical-Fisher per-layer traces."""

from __future__ import annotations

import json
import math

import pytest


torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from optuna_ctpe.nn.hutchinson import rademacher  # noqa: E402
from optuna_ctpe.nn.sensitivity import choice_sensitivity  # noqa: E402
from optuna_ctpe.nn.sensitivity import empirical_fisher_traces  # noqa: E402
from optuna_ctpe.nn.sensitivity import hutchinson_traces  # noqa: E402
from optuna_ctpe.nn.sensitivity import hutchinson_traces_from_criterion  # noqa: E402
from optuna_ctpe.nn.sensitivity import LayerTrace  # noqa: E402


pytestmark = pytest.mark.torch

CE = nn.CrossEntropyLoss()


def ce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return CE(model(batch[0]), batch[1])


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def make_batch(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def exact_hessian(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], names: list[str]):
    """Full Hessian of the loss over the weights of ``names`` (flattened, concatenated)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    shapes = [params[f"{n}.weight"].shape for n in names]
    sizes = [s.numel() for s in shapes]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        p = dict(params)
        for n, chunk, shape in zip(names, flat.split(sizes), shapes):
            p[f"{n}.weight"] = chunk.view(shape)
        return ce_loss(lambda x: functional_call(model, p, (x,)), batch)

    flat = torch.cat([params[f"{n}.weight"].flatten() for n in names])
    return torch.autograd.functional.hessian(loss, flat), sizes


def test_traces_agree_with_exact_hessian() -> None:
    model, batch = make_mlp(), make_batch()
    traces = hutchinson_traces(model, ce_loss, [batch], max_probes=400, rtol=0.0)
    h, sizes = exact_hessian(model, batch, ["0", "2"])
    blocks = torch.diagonal(h).split(sizes)
    assert list(traces) == ["0", "2"]
    for (name, t), block in zip(traces.items(), blocks):
        exact = float(block.sum())
        assert t.n_probes == 400 and t.n_params == block.numel()
        assert 0 < t.stderr < 0.2 * abs(exact)
        assert abs(t.trace - exact) < 4 * t.stderr, (name, t, exact)
        assert t.mean_trace == pytest.approx(t.trace / t.n_params)


def test_final_linear_layer_matches_closed_form() -> None:
    """tr(H_W) = mean_i ‖h_i‖² Σ_k p_ik (1 − p_ik) for mean-reduced CE after a linear layer."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 5))
    x, y = torch.randn(64, 6), torch.randint(0, 5, (64,))
    with torch.no_grad():
        h = model[1](model[0](x))
        p = model(x).softmax(1)
    closed = float((h.pow(2).sum(1) * (p * (1 - p)).sum(1)).mean())
    exact, _ = exact_hessian(model, (x, y), ["2"])
    assert float(exact.trace()) == pytest.approx(closed, rel=1e-4)  # the formula itself
    t = hutchinson_traces(model, ce_loss, [(x, y)], layers=["2"], max_probes=300, rtol=0.0)["2"]
    assert abs(t.trace - closed) < 4 * t.stderr, (t, closed)


def test_one_hvp_gives_every_layer_on_the_same_probes() -> None:
    """Each estimate is v_l·(Hv)_l of one joint HVP; restricted to one layer it is v_l·H_ll v_l."""
    model, batch = make_mlp(), make_batch()
    names = ["0", "2"]
    traces = hutchinson_traces(
        model, ce_loss, [batch], max_probes=3, min_probes=2, rtol=0.0, seed=7
    )
    h, sizes = exact_hessian(model, batch, names)
    gen = torch.Generator().manual_seed(7)
    weights = [model[0].weight, model[2].weight]
    joint, own = [], []
    for _ in range(3):
        v = torch.cat([rademacher(w, gen).flatten() for w in weights])
        hv = h @ v
        joint.append([float(a @ b) for a, b in zip(v.split(sizes), hv.split(sizes))])
        blocks = [h[: sizes[0], : sizes[0]], h[sizes[0] :, sizes[0] :]]
        own.append([float(a @ blk @ a) for a, blk in zip(v.split(sizes), blocks)])
    for i, name in enumerate(names):
        expected = sum(row[i] for row in joint) / 3
        assert traces[name].trace == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # The joint estimates carry cross terms the per-layer ones do not: they differ per probe.
    assert any(abs(j[0] - o[0]) > 1e-4 for j, o in zip(joint, own))
    # Per-layer computation (other layers not probed) reproduces the block quadratic form.
    gen = torch.Generator().manual_seed(7)
    single = hutchinson_traces(
        model, ce_loss, [batch], layers=["2"], max_probes=2, min_probes=2, rtol=0.0, seed=7
    )["2"]
    block = h[sizes[0] :, sizes[0] :]
    expected = sum(
        float(v @ block @ v) for v in (rademacher(weights[1], gen).flatten() for _ in range(2))
    )
    assert single.trace == pytest.approx(expected / 2, rel=1e-5, abs=1e-6)


def test_batches_are_visited_round_robin() -> None:
    model = make_mlp()
    batches = [make_batch(16, seed=1), make_batch(16, seed=2)]
    traces = hutchinson_traces(model, ce_loss, batches, layers=["0"], max_probes=4, rtol=0.0)
    hs = [exact_hessian(model, b, ["0"])[0] for b in batches]
    gen = torch.Generator().manual_seed(0)
    est = [
        float(v @ hs[k % 2] @ v)
        for k in range(4)
        for v in [rademacher(model[0].weight, gen).flatten()]
    ]
    assert traces["0"].trace == pytest.approx(sum(est) / 4, rel=1e-5)
    assert traces["0"].n_probes == 4


def test_adaptive_stop_and_reproducibility() -> None:
    model, batch = make_mlp(), make_batch()
    a = hutchinson_traces(model, ce_loss, [batch], max_probes=500, min_probes=10, rtol=0.3)
    b = hutchinson_traces(model, ce_loss, [batch], max_probes=500, min_probes=10, rtol=0.3)
    assert a == b
    n = a["0"].n_probes
    assert 10 <= n < 500
    assert all(t.relative_stderr < 0.3 and t.n_probes == n for t in a.values())
    c = hutchinson_traces(model, ce_loss, [batch], max_probes=500, min_probes=10, rtol=0.3, seed=1)
    assert c != a


def test_layer_selection() -> None:
    model, batch = make_mlp(), make_batch()
    by_type = hutchinson_traces(
        model, ce_loss, [batch], layers=(nn.Linear,), max_probes=2, min_probes=2
    )
    default = hutchinson_traces(model, ce_loss, [batch], max_probes=2, min_probes=2)
    assert list(by_type) == list(default) == ["0", "2"]
    by_name = hutchinson_traces(model, ce_loss, [batch], layers=["2"], max_probes=2, min_probes=2)
    assert list(by_name) == ["2"]


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(m.training) for m in model.modules()],
        [(p.requires_grad, p.grad) for p in model.parameters()],
    )


@pytest.mark.parametrize("estimator", [hutchinson_traces, empirical_fisher_traces])
def test_model_is_left_unchanged(estimator) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4)
    )
    model.train()
    model[3].eval()
    model[0].weight.requires_grad_(False)  # frozen layers are traced, and stay frozen
    model[4].weight.grad = torch.ones_like(model[4].weight)
    before = _snapshot(model)
    estimator(model, ce_loss, [make_batch()], max_probes=5, min_probes=2)
    after = _snapshot(model)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])  # incl. BN statistics
    assert before[1] == after[1]
    assert [r for r, _ in before[2]] == [r for r, _ in after[2]]
    assert all(g0 is g1 for (_, g0), (_, g1) in zip(before[2], after[2]))


def test_model_is_restored_after_an_error() -> None:
    model = make_mlp()
    model.train()
    model[0].weight.requires_grad_(False)

    def bad_loss(net, batch):
        return ce_loss(net, batch) * float("nan")

    with pytest.raises(ValueError, match="non-finite loss"):
        hutchinson_traces(model, bad_loss, [make_batch()])
    assert model.training and not model[0].weight.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": ["0", "nope"]}, r"lacks: \['nope'\]"),
        ({"layers": ["1"]}, r"without a weight parameter: \['1'\]"),
        ({"layers": []}, "non-empty sequence"),
        ({"layers": "0"}, "sequence of module names"),
        ({"max_probes": 1}, "max_probes must be an integer >= 2, got 1"),
        ({"max_probes": 2.5}, "max_probes"),
        ({"min_probes": 1}, "min_probes must be an integer >= 2, got 1"),
        ({"min_probes": 2.5}, "min_probes"),
        ({"rtol": -0.1}, "rtol must be a finite number >= 0, got -0.1"),
        ({"rtol": float("nan")}, "rtol"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    model = make_mlp()
    with pytest.raises((ValueError, TypeError), match=match):
        hutchinson_traces(model, ce_loss, [make_batch()], **kwargs)


def test_bad_losses_and_batches() -> None:
    model, batch = make_mlp(), make_batch()
    with pytest.raises(ValueError, match="batches is empty"):
        hutchinson_traces(model, ce_loss, [])
    with pytest.raises(ValueError, match="non-finite loss"):
        hutchinson_traces(model, lambda m, b: ce_loss(m, b) + float("inf"), [batch])
    with pytest.raises(ValueError, match="scalar"):
        hutchinson_traces(model, lambda m, b: m(b[0]), [batch])
    with pytest.raises(TypeError, match="must return a tensor"):
        hutchinson_traces(model, lambda m, b: 1.0, [batch])
    with pytest.raises(ValueError, match="does not depend"):
        hutchinson_traces(model, lambda m, b: ce_loss(m, b).detach(), [batch])
    with pytest.raises(ValueError, match="non-finite"):
        empirical_fisher_traces(model, lambda m, b: ce_loss(m, b) * float("nan"), [batch])


def test_empirical_fisher_matches_per_sample_gradients() -> None:
    model, (x, y) = make_mlp(), make_batch(20)
    fisher = empirical_fisher_traces(
        model, ce_loss, [(x[:12], y[:12]), (x[12:], y[12:])], rtol=0.0
    )
    norms = []
    for i in range(20):
        grads = torch.autograd.grad(
            ce_loss(model, (x[i : i + 1], y[i : i + 1])), [model[0].weight, model[2].weight]
        )
        norms.append([float(g.pow(2).sum()) for g in grads])
    norms_t = torch.tensor(norms, dtype=torch.float64)
    for i, name in enumerate(["0", "2"]):
        t = fisher[name]
        assert t.n_probes == 20
        assert t.trace == pytest.approx(float(norms_t[:, i].mean()), rel=1e-5)
        assert t.stderr == pytest.approx(float(norms_t[:, i].std() / math.sqrt(20)), rel=1e-4)
    # max_probes caps the number of samples; the loop fallback agrees with vmap.
    capped = empirical_fisher_traces(
        model, ce_loss, [(x, y)], max_probes=7, min_probes=2, rtol=0.0
    )
    assert capped["0"].n_probes == 7
    assert capped["0"].trace == pytest.approx(float(norms_t[:7, 0].mean()), rel=1e-5)

    def unvmappable(m, b):
        return CE(m(b[0]), torch.full((len(b[1]),), int(b[1][0].item())))

    with pytest.warns(UserWarning, match="per-sample loop"):
        looped = empirical_fisher_traces(model, unvmappable, [(x, y)], rtol=0.0)
    assert looped["2"].trace == pytest.approx(fisher["2"].trace, rel=1e-5)


def test_from_criterion_equals_loss_fn_form() -> None:
    model, batch = make_mlp(), make_batch()
    a = hutchinson_traces_from_criterion(model, CE, [batch, batch], n_batches=1, max_probes=5)
    b = hutchinson_traces(model, ce_loss, [batch], max_probes=5)
    assert a == b
    with pytest.raises(ValueError, match=r"\(inputs, targets\) pair"):
        hutchinson_traces_from_criterion(model, CE, [batch[0]])
    with pytest.raises(ValueError, match="n_batches"):
        hutchinson_traces_from_criterion(model, CE, [batch], n_batches=0)


def test_layer_trace_json_roundtrip_and_properties() -> None:
    t = LayerTrace("conv", trace=-2.0, stderr=0.5, n_params=4, n_probes=10)
    assert LayerTrace.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert t.mean_trace == -0.5 and t.relative_stderr == 0.25
    assert LayerTrace("z", 0.0, 0.0, 1, 2).relative_stderr == 0.0
    assert LayerTrace("z", 0.0, 1.0, 1, 2).relative_stderr == math.inf
    with pytest.raises(ValueError, match="exactly the keys"):
        LayerTrace.from_dict({"name": "x"})


def test_choice_sensitivity() -> None:
    assert choice_sensitivity(0.5, 4.0) == 2.0
    with pytest.raises(
        ValueError, match="delta_w_sq_norm must be a finite non-negative number, got -1"
    ):
        choice_sensitivity(0.5, -1.0)
    with pytest.raises(ValueError, match="mean_trace must be a finite number, got nan"):
        choice_sensitivity(float("nan"), 1.0)


def test_progress_reports_to_stderr(capsys) -> None:
    hutchinson_traces(
        make_mlp(), ce_loss, [make_batch()], max_probes=3, min_probes=2, progress=True
    )
    assert "Hutchinson" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    model, batch = make_mlp(), make_batch()
    cpu = hutchinson_traces(model, ce_loss, [batch], max_probes=20, rtol=0.0)
    gpu = hutchinson_traces(model.cuda(), ce_loss, [batch], max_probes=20, rtol=0.0)
    for name in cpu:
        assert gpu[name].trace == pytest.approx(cpu[name].trace, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_every_layer(arch) -> None:
    models = pytest.importorskip("torchvision").models
    torch.manual_seed(0)
    model = getattr(models, arch)(weights=None, num_classes=10)
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([1, 7]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    traces = hutchinson_traces(model, ce_loss, [batch], max_probes=2, min_probes=2, rtol=0.0)
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert list(traces) == expected
    assert all(
        math.isfinite(t.trace) and math.isfinite(t.stderr) and t.n_probes == 2
        for t in traces.values()
    )
    assert any(t.trace != 0 for t in traces.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training
