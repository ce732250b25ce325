"""The cost of applying a configuration per trial, against the cost of evaluating it.

For random bits-only configurations (every layer's bit-width drawn uniformly from 2..8) on
torchvision's resnet18 (10 classes, random weights: only the time matters) and on the MiniLM
task (:func:`optuna_ctpe.tasks.minilm.minilm_task`), it times, per trial:

* ``evaluate``: scoring the configured model (resnet18: 64 random 3x32x32 images, and the 360
  scikit-learn digits of a validation split upscaled to 3x32x32; MiniLM: ``task.evaluate``);
* ``apply``: ``space.apply(model, config)``, a quantized deep copy;
* ``applied``: entering and leaving ``with space.applied(model, config)`` (weights quantized in
  place and restored), without a cache, and with a warm
  :class:`~optuna_ctpe.nn.apply.WeightCache` (every (layer, bit-width) quantized once before).

Each ratio is the median apply time over the median evaluation time; the target is <= 0.2. It
also checks that the in-place model's outputs equal the copy's bit for bit, and that the model's
state dict is unchanged after each block.

Run ``python benchmarks/apply_cost.py`` from the repository root (torchvision, scikit-learn and
the ``minilm`` extra installed); it writes ``benchmarks/results/apply_cost.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from _common import markdown_table
from _common import report_header
from _common import RESULTS_DIR
import numpy as np
import torch
import torch.nn.functional as F


BITS = (2, 3, 4, 5, 6, 7, 8)
NOTE = (
    "Medians per trial; in brackets, the time over the evaluation's (target <= 0.2). "
    "`apply` is the quantized deep copy (before); `applied` quantizes the model in place and "
    "restores it (after), without a cache (every weight quantized per trial) or with a warm "
    "`WeightCache` (what a search reaches once each (layer, bit-width) has been drawn once; "
    "cache MiB: the cache holding every bit-width of every layer). Every in-place score equals "
    "the copy's exactly."
)


def _space(model: torch.nn.Module) -> Any:
    """A bits-only space over every supported layer (the traces do not matter here)."""
    from optuna_ctpe import HessianSearchSpace
    from optuna_ctpe.space.records import LayerSensitivity
    from optuna_ctpe.nn.layers import model_layers
    from optuna_ctpe.nn.quantize import quantization_error

    layers = [
        LayerSensitivity(
            name,
            1.0,
            layer.weight.numel(),
            {b: quantization_error(layer.weight, b, layer.out_axis) for b in BITS},
        )
        for name, layer in model_layers(model).items()
    ]
    # A budget large enough that no bit-width is pruned away: every choice stays drawable.
    return HessianSearchSpace(layers, bits=BITS, widths=(1.0,), budget=1e9)


def _configs(space: Any, n: int, seed: int) -> list[Any]:
    from optuna_ctpe.space.records import QuantConfig

    rng = np.random.default_rng(seed)
    names = list(space.sensitivities)
    return [QuantConfig({n_: int(rng.choice(BITS)) for n_ in names}) for _ in range(n)]


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _measure(
    space: Any, model: torch.nn.Module, evaluate: Any, configs: list[Any]
) -> dict[str, float]:
    """Median seconds per trial of evaluate, apply and applied (cold, warm cache)."""
    from optuna_ctpe.nn.apply import WeightCache

    before = {k: v.clone() for k, v in model.state_dict().items()}
    warm = WeightCache()
    for b in BITS:  # every (layer, bit-width) once
        with space.applied(model, space.uniform(b), cache=warm):
            pass
    times: dict[str, list[float]] = {"evaluate": [], "apply": [], "cold": [], "warm": []}
    cache_mib = warm.nbytes / 2**20
    for config in configs:
        t, quantized = _timed(lambda: space.apply(model, config))  # noqa: B023
        times["apply"].append(t)
        t, reference = _timed(lambda: evaluate(quantized))  # noqa: B023
        times["evaluate"].append(t)
        for kind, cache in (("cold", None), ("warm", warm)):
            cm = space.applied(model, config, cache=cache)
            t0 = time.perf_counter()
            net = cm.__enter__()
            t1 = time.perf_counter()
            score = evaluate(net)
            t2 = time.perf_counter()
            cm.__exit__(None, None, None)
            times[kind].append(t1 - t0 + time.perf_counter() - t2)
            if score != reference:
                raise AssertionError(f"applied ({kind}) scored {score}, apply {reference}")
    after = model.state_dict()
    if any(not torch.equal(before[k], after[k]) for k in before):
        raise AssertionError("the model's state dict changed")
    return {**{k: statistics.median(v) for k, v in times.items()}, "cache_mib": cache_mib}


def _outputs(model: torch.nn.Module, batches: list[Any]) -> Any:
    with torch.no_grad():
        # Exact outputs, so that the in-place model is checked bit for bit against the copy.
        return tuple(float(model(x).double().sum()) for x in batches)


def _digits_images() -> list[torch.Tensor]:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[-360:], dtype=torch.float32)[:, None] / 16
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return list(x.contiguous().split(120))


def _resnet18_rows(n: int, seed: int) -> list[list[str]]:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10).eval()
    space = _space(model)
    configs = _configs(space, n, seed)
    rows = []
    g = torch.Generator().manual_seed(seed)
    for label, batches in (
        ("resnet18, 64 images", [torch.randn(64, 3, 32, 32, generator=g)]),
        ("resnet18, 360 digits", _digits_images()),
    ):
        rows.append(_row(label, _measure(space, model, lambda m: _outputs(m, batches), configs)))  # noqa: B023
    return rows


def _minilm_rows(n: int, seed: int) -> list[list[str]]:
    from optuna_ctpe.tasks.minilm import minilm_task

    task = minilm_task(seed=seed, device="cpu")
    space = _space(task.model)
    t = _measure(space, task.model, task.evaluate, _configs(space, n, seed))
    return [_row("MiniLM task (128 sentences)", t)]


def _row(label: str, t: dict[str, float]) -> list[str]:
    e = t["evaluate"]
    return [
        label,
        f"{e * 1e3:.1f}",
        f"{t['apply'] * 1e3:.1f} ({t['apply'] / e:.2f})",
        f"{t['cold'] * 1e3:.1f} ({t['cold'] / e:.2f})",
        f"{t['warm'] * 1e3:.2f} ({t['warm'] / e:.3f})",
        f"{t['cache_mib']:.0f}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="random configurations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = _resnet18_rows(args.trials, args.seed) + _minilm_rows(args.trials, args.seed)
    header = report_header(
        "Apply cost per trial: copy vs in place",
        ["benchmarks/apply_cost.py", *(argv if argv is not None else sys.argv[1:])],
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, "
        f"{args.trials} random bits-only configurations (bits 2..8), seed {args.seed}",
    )
    table = markdown_table(
        [
            "model, evaluation",
            "evaluate ms",
            "apply ms (/ evaluate)",
            "applied ms, no cache",
            "applied ms, warm cache",
            "cache MiB",
        ],
        rows,
    )
    text = f"{header}\n{NOTE}\n\n{table}\n"
    print(text)
    (RESULTS_DIR / "apply_cost.md").write_text(text)


if __name__ == "__main__":
    main()
