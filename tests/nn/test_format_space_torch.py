"""Format spaces on a model: from_model(formats=...), Ω from the weights a format produces,
apply and applied through one FormatQuantizer."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from optuna_ctpe import HessianSearchSpace  # noqa: E402
from optuna_ctpe.nn.formats import FormatQuantizer  # noqa: E402
from optuna_ctpe.nn.formats import formats_in_place  # noqa: E402


FORMATS = ["int3-g32-asym-gptq", "int3-g32-asym-rtn", "int4-pc-sym-rtn", "int8-pc-sym-rtn"]


def _task():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                          nn.Linear(32, 4))  # fmt: skip
    # Correlated inputs, so GPTQ has something to correct.
    mix = torch.randn(64, 64) / 4 + torch.eye(64)
    batches = [(torch.randn(32, 64) @ mix, torch.randint(0, 4, (32,))) for _ in range(3)]

    def loss_fn(net, batch):  # type: ignore[no-untyped-def]
        x, y = batch
        return nn.functional.cross_entropy(net(x), y)

    return model, loss_fn, batches


@pytest.fixture(scope="module")
def built():  # type: ignore[no-untyped-def]
    model, loss_fn, batches = _task()
    space = HessianSearchSpace.from_model(
        model, loss_fn, batches, formats=FORMATS, keep_first_last_bits=None, budget=math.inf,
        estimator="ggn",
    )  # fmt: skip
    return model, loss_fn, batches, space


def test_errors_are_the_output_errors_of_the_weights_the_formats_produce(built) -> None:  # type: ignore[no-untyped-def]
    model, loss_fn, batches, space = built
    quantizer = FormatQuantizer(model, calibration_batches=batches, forward=loss_fn)
    modules = dict(model.named_modules())
    inputs = {"0": torch.cat([x for x, _ in batches])}
    with torch.no_grad():
        inputs["2"] = torch.relu(modules["0"](inputs["0"]))
        inputs["4"] = torch.relu(modules["2"](inputs["2"]))
    for name, layer in space.sensitivities.items():
        weight = modules[name].weight.detach().double()
        x = inputs[name].double()
        for fmt in FORMATS:
            delta = quantizer.get(name, fmt).double() - weight
            # ||Δ X||² rescaled by n / tr(X Xᵀ): ||Δ||² when the inputs are isotropic.
            expected = float((x @ delta.T).pow(2).sum()) * x.shape[1] / float(x.pow(2).sum())
            assert layer.errors[fmt] == pytest.approx(expected, rel=1e-6)


def test_gptq_survives_pruning_on_output_errors_not_on_weight_errors() -> None:
    model, loss_fn, batches = _task()
    kwargs = {"formats": FORMATS, "keep_first_last_bits": None, "budget": math.inf}
    by_output = HessianSearchSpace.from_model(model, loss_fn, batches, estimator="ggn", **kwargs)
    by_weight = HessianSearchSpace.from_model(
        model, loss_fn, batches, estimator="ggn", format_error="weight", **kwargs
    )
    for name in by_output.sensitivities:
        out = by_output.sensitivities[name].errors
        weight = by_weight.sensitivities[name].errors
        # GPTQ trades weight error for output error on the same grid ...
        assert weight["int3-g32-asym-gptq"] > weight["int3-g32-asym-rtn"]
        assert out["int3-g32-asym-gptq"] < out["int3-g32-asym-rtn"]
        # ... so only the output reading keeps it (and drops RTN at the same size).
        assert "int3-g32-asym-gptq" in by_output.choices[f"format:{name}"]
        assert "int3-g32-asym-rtn" not in by_output.choices[f"format:{name}"]
        assert "int3-g32-asym-gptq" not in by_weight.choices[f"format:{name}"]


def test_applied_and_apply_put_each_layer_in_its_format(built) -> None:  # type: ignore[no-untyped-def]
    model, loss_fn, batches, space = built
    # A mixed configuration: the i-th layer at its i-th kept format (cyclically).
    config = space.config_from_params(
        {n: c[i % len(c)] for i, (n, c) in enumerate(space.choices.items())}
    )
    assert len(set(config.formats.values())) > 1
    x = batches[0][0]
    with torch.no_grad():
        reference = FormatQuantizer(model, calibration_batches=batches, forward=loss_fn)
        with formats_in_place(model, config.formats, reference) as net:
            expected = net(x).clone()
        float_out = model(x).clone()
        with space.applied(model, config) as net:
            assert torch.equal(net(x), expected)
        assert torch.equal(model(x), float_out)  # restored on exit
        copy = space.apply(model, config)
        assert torch.equal(copy(x), expected) and torch.equal(model(x), float_out)
    # One quantizer per search: the one from_model measured with, reused.
    assert space.format_quantizer(model) is space.format_quantizer(model)
    assert len(space.format_quantizer(model)) >= len(space.sensitivities)


def test_a_loaded_space_needs_batches_for_gptq(built) -> None:  # type: ignore[no-untyped-def]
    model, loss_fn, batches, space = built
    loaded = HessianSearchSpace.from_json(space.to_json())
    config = loaded.uniform("int3-g32-asym-gptq")
    with pytest.raises(ValueError, match="calibration_batches"):
        loaded.apply(model, config)
    loaded.format_quantizer(model, batches, loss_fn)
    with torch.no_grad():
        out = loaded.apply(model, config)(batches[0][0])
        assert torch.equal(out, space.apply(model, config)(batches[0][0]))


def test_the_bit_width_path_refuses_a_format_configuration(built, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("safetensors")
    from optuna_ctpe.deploy.artifact import save_packed
    from optuna_ctpe.nn.apply import apply_config

    model, _, _, space = built
    with pytest.raises(ValueError, match="apply_formats"):
        apply_config(space.spec, model, space.uniform("int4-pc-sym-rtn"))
    # The bit-width writer would store the legacy format: it refuses, the space's own routes.
    with pytest.raises(ValueError, match="apply_formats"):
        save_packed(space.spec, model, space.uniform("int4-pc-sym-rtn"), tmp_path / "x")


def test_a_bit_width_space_is_unchanged_by_the_formats_code() -> None:
    model, loss_fn, batches = _task()
    space = HessianSearchSpace.from_model(model, loss_fn, batches, bits=(2, 4, 8), estimator="ggn")
    assert not space.formats
    assert all(n.startswith("bits:") for n in space.choices)
    assert all(isinstance(c, int) for cs in space.choices.values() for c in cs)
    assert HessianSearchSpace.from_json(space.to_json()).choices == space.choices


def test_save_packed_writes_a_format_configuration_that_loads_as_apply_makes_it(  # type: ignore[no-untyped-def]
    built, tmp_path
) -> None:
    pytest.importorskip("safetensors")
    from optuna_ctpe.deploy.artifact import load_packed

    model, _, batches, space = built
    names = list(space.distributions)
    config = space.config_from_params(
        {name: space.distributions[name].choices[i % 2] for i, name in enumerate(names)}
    )
    assert len(set(config.formats.values())) > 1  # a real mix of formats
    packed = space.save_packed(model, config, tmp_path / "net.safetensors")
    # The space's account is the file's; the tensors add under a byte of padding per packed
    # tensor (codes and zero points of each of the 3 layers).
    assert packed.accounted_bytes == space.size(config) / 8
    assert 0 <= packed.payload_bytes - packed.accounted_bytes < 2 * 3
    loaded = load_packed(tmp_path / "net.safetensors", model)
    applied = space.apply(model, config)
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), applied(x))
    for name, tensor in applied.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_save_packed_refuses_a_pruned_format_configuration(built, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, _, _, space = built
    config = space.config_from_params(
        {name: d.choices[0] for name, d in space.distributions.items()}
    )
    pruned = type(config)(config.bits, {"0": 0.5}, config.formats)
    with pytest.raises(ValueError, match="pruned"):
        space.save_packed(model, pruned, tmp_path / "net.safetensors")
