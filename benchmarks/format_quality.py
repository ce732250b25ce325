"""Weight formats on the pretrained MiniLM: quality of uniform formats, their one-time
quantization cost and the per-trial cost of applying mixed formats.

For the MiniLM task (:func:`optuna_ctpe.tasks.minilm.minilm_task`: all-MiniLM-L6-v2, its 36
Linear layers quantized, embeddings float), every Linear layer is put in one format at a time:

* per-channel symmetric round to nearest (``int{b}-pc-sym-rtn``, today's only format);
* per-channel asymmetric RTN (``int{b}-pc-asym-rtn``);
* group-128 asymmetric RTN (``int{b}-g128-asym-rtn``);
* GPTQ, per-channel symmetric (``int{b}-pc-sym-gptq``);
* GPTQ, group-128 asymmetric (``int{b}-g128-asym-gptq``), and the same with act-order;

at 3 and 4 bits. The score is the task's embedding fidelity: the mean cosine between the
quantized and the FP32 model's embeddings of the 128 held-out validation sentences; GPTQ's
Hessians come from the 64 calibration sentences (the task's split, no sentence shared).
Effective bits are the stored bits of all 36 weights (codes, scales, zero points;
:func:`optuna_ctpe.space.formats.format_bits`) over their weight count.

Costs (seconds, one torch thread): collecting every layer's Hessian in one calibration pass,
then quantizing all 36 layers in each format (GPTQ's factorisations are shared across formats
of a layer, so the first GPTQ format of a layer pays them); and per trial, for random
configurations drawing every layer's format from the formats above, entering and leaving
:func:`optuna_ctpe.nn.formats.formats_in_place` with a warm
:class:`~optuna_ctpe.nn.formats.FormatQuantizer`, against today's
:func:`optuna_ctpe.nn.apply.quantized_in_place` with a warm
:class:`~optuna_ctpe.nn.apply.WeightCache` on random bit-widths, and against one evaluation.
It also checks that the legacy format scores exactly what today's bit-width path scores.

With ``--resnet18`` it also times GPTQ's one-time cost on torchvision's resnet18 (random weights,
64 random 3x32x32 images: only the time matters; convolutions through their unfolded inputs).

Run ``nice python benchmarks/format_quality.py [--resnet18]`` from the repository root (the
``minilm`` extra installed); it writes ``benchmarks/results/format_quality.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from _common import markdown_table
from _common import report_header
from _common import RESULTS_DIR
import numpy as np
import torch

from optuna_ctpe.nn.apply import quantized_in_place
from optuna_ctpe.nn.apply import WeightCache
from optuna_ctpe.nn.formats import FormatQuantizer
from optuna_ctpe.nn.formats import formats_in_place
from optuna_ctpe.nn.gptq import GPTQSettings
from optuna_ctpe.nn.grids import as_rows
from optuna_ctpe.nn.layers import model_layers
from optuna_ctpe.space.formats import format_bits
from optuna_ctpe.space.formats import parse_format


KINDS = (
    ("per-channel sym RTN (today)", "pc-sym-rtn", False),
    ("per-channel asym RTN", "pc-asym-rtn", False),
    ("g128 asym RTN", "g128-asym-rtn", False),
    ("GPTQ per-channel sym", "pc-sym-gptq", False),
    ("GPTQ g128 asym", "g128-asym-gptq", False),
    ("GPTQ g128 asym, act-order", "g128-asym-gptq", True),
)
BITS = (4, 3)


def _effective_bits(layers: dict[str, Any], name: str) -> float:
    fmt = parse_format(name)
    total = numel = 0
    for layer in layers.values():
        rows, cols = as_rows(layer.weight, layer.out_axis).shape
        total += format_bits(fmt, rows, cols)
        numel += rows * cols
    return total / numel


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _quantize_all(quantizer: FormatQuantizer, layers: dict[str, Any], name: str) -> float:
    """Seconds to quantize every layer in format ``name``."""
    start = time.perf_counter()
    for layer in layers.values():
        quantizer.get(layer, name)
    return time.perf_counter() - start


def _minilm(trials: int, seed: int) -> tuple[str, str]:
    from optuna_ctpe.tasks.minilm import minilm_task

    task = minilm_task(seed=seed, device="cpu")
    model = task.model
    layers = model_layers(model)
    quantizers = {
        act_order: FormatQuantizer(
            model,
            calibration_batches=task.calibration_batches,
            forward=task.loss_fn,
            settings=GPTQSettings(act_order=act_order),
        )
        for act_order in (False, True)
    }
    hessian_s, _ = _timed(quantizers[False].hessians)
    rows = []
    for bits in BITS:
        for label, kind, act_order in KINDS:
            name = f"int{bits}-{kind}"
            quantizer = quantizers[act_order]
            seconds = _quantize_all(quantizer, layers, name)
            with formats_in_place(model, dict.fromkeys(layers, name), quantizer) as net:
                score = task.evaluate(net)
            if kind == "pc-sym-rtn":
                with quantized_in_place(model, dict.fromkeys(layers, bits)) as net:
                    if task.evaluate(net) != score:
                        raise AssertionError("the legacy format scores differently from bits")
            rows.append(
                [
                    str(bits),
                    label,
                    f"`{name}`",
                    f"{_effective_bits(layers, name):.3f}",
                    f"{score:.4f}",
                    f"{seconds:.1f}",
                ]
            )
    quality = markdown_table(
        ["bits", "format", "name", "effective bits", "mean cosine to FP32", "quantize s"], rows
    )
    # Per trial: random mixes of the formats above (warm stores), against today's bit-widths.
    names = [f"int{b}-{kind}" for b in BITS for _, kind, act_order in KINDS if not act_order]
    rng = np.random.default_rng(seed)
    cache = WeightCache()
    for b in BITS:
        with quantized_in_place(model, dict.fromkeys(layers, b), cache=cache):
            pass
    times: dict[str, list[float]] = {"formats": [], "bits": [], "evaluate": []}
    for _ in range(trials):
        config = {n: str(rng.choice(names)) for n in layers}
        bits_config = {n: int(rng.choice(BITS)) for n in layers}
        for key, cm in (
            ("formats", lambda: formats_in_place(model, config, quantizers[False])),  # noqa: B023
            ("bits", lambda: quantized_in_place(model, bits_config, cache=cache)),  # noqa: B023
        ):
            manager = cm()
            t0 = time.perf_counter()
            net = manager.__enter__()
            t1 = time.perf_counter()
            if key == "formats":
                t, _ = _timed(lambda: task.evaluate(net))  # noqa: B023
                times["evaluate"].append(t)
            t2 = time.perf_counter()
            manager.__exit__(None, None, None)
            times[key].append(t1 - t0 + time.perf_counter() - t2)
    med = {k: statistics.median(v) for k, v in times.items()}
    e = med["evaluate"]
    trial = markdown_table(
        ["per trial (median)", "ms", "/ evaluate"],
        [
            ["evaluate (128 sentences)", f"{e * 1e3:.1f}", "1"],
            [
                "formats_in_place, warm FormatQuantizer (10 formats mixed)",
                f"{med['formats'] * 1e3:.2f}",
                f"{med['formats'] / e:.3f}",
            ],
            [
                "quantized_in_place, warm WeightCache (bits 3/4, today)",
                f"{med['bits'] * 1e3:.2f}",
                f"{med['bits'] / e:.3f}",
            ],
        ],
    )
    cost = (
        f"One-time cost on MiniLM: the Hessians of all 36 layers in one calibration pass took "
        f"{hessian_s:.1f} s; the 'quantize s' column is the time to quantize all 36 layers in "
        "that format (the first GPTQ format of a quantizer also pays the per-layer Cholesky "
        f"factorisations). Store after all formats: {quantizers[False].nbytes / 2**20:.0f} MiB "
        f"(+ {quantizers[True].nbytes / 2**20:.0f} MiB act-order)."
    )
    return quality + "\n\n" + cost, trial


def _resnet18(seed: int) -> str:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10).eval()
    images = [torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(seed))]
    quantizer = FormatQuantizer(model, calibration_batches=images)
    layers = model_layers(model)
    hessian_s, _ = _timed(quantizer.hessians)
    rows = [["Hessians (one pass, 21 layers)", f"{hessian_s:.1f}"]]
    for name in ("int4-pc-sym-gptq", "int4-g128-asym-gptq", "int4-g128-asym-rtn"):
        seconds = _quantize_all(quantizer, layers, name)
        rows.append([f"all layers in `{name}`", f"{seconds:.1f}"])
    return markdown_table(["resnet18, one-time step", "s"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="random mixed configurations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resnet18", action="store_true", help="also time GPTQ on resnet18")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    quality, trial = _minilm(args.trials, args.seed)
    header = report_header(
        "Weight formats: quality, one-time quantization cost, per-trial cost",
        ["benchmarks/format_quality.py", *(argv if argv is not None else sys.argv[1:])],
        f"torch {torch.__version__}, 1 thread, CPU, MiniLM task seed {args.seed} (64 "
        f"calibration / 128 validation sentences), {args.trials} random mixed configurations",
    )
    parts = [header, "## Uniform formats on MiniLM (all 36 Linear layers)", quality]
    parts += ["## Per-trial cost on MiniLM", trial]
    if args.resnet18:
        parts += ["## GPTQ one-time cost on resnet18 (64 images 3x32x32)", _resnet18(args.seed)]
    parts += [
        f"Machine load (1-minute average) at the start: {load_before:.1f}, at the end: "
        f"{os.getloadavg()[0]:.1f}, on {os.cpu_count()} CPUs. Times scale with it; the ratios "
        "within one run (per trial / evaluate) do not."
    ]
    text = "\n\n".join(parts) + "\n"
    print(text)
    (RESULTS_DIR / "format_quality.md").write_text(text)


if __name__ == "__main__":
    main()
