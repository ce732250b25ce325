"""Is the first ILP warm start as good as the best 10% of 200 TPE trials at the same size?

Question (issue 10): a user who takes the first warm start as the answer, as HAWQ-V3's users
take the ILP's, gets a model whose validation error is within the range of the best 10% of 200
TPE trials at the same size, or better, at 8x and 16x compression, on resnet18 and the digits
CNN. Bit-widths *and* width ratios (the default grids: 2, 3, 4, 6, 8 bits; ratios 0.5, 0.75, 1),
no fine-tuning.

For each task (``--tasks``: ``digits`` = :func:`optuna_ctpe.tasks.digits.digits_task`,
``resnet18`` = :func:`optuna_ctpe.tasks.vision.resnet18_digits_task`, seed 0) the space is
measured once (``--estimator``, default ``auto``: the GGN for these cross-entropy losses;
widths priced by Ω, not calibrated), and for each compression ``r`` (``--ratios``: budget =
FP32 size / r, the first and last layers fixed at 8 bits, biases, norms and per-channel scales
counted):

* ``first warm start, Ω-ranked``: ``space.relaxed_for_size(...).warm_starts(size_ratio=1/r)[0]``,
  the answer ranked by predicted Ω alone (the package before this benchmark);
* ``first warm start, measured``: the same with ``measure=space.loss_increase(...)``: every ILP
  answer's calibration-loss increase is measured, a joint answer that misses its prediction
  more than twice is corrected and solved again, and the least measured increase leads
  (:func:`optuna_ctpe.space.warm_start.measured_warm_start_configs`);
* ``TPE``: Optuna's ``TPESampler()`` (defaults) on the full grid, ``--trials`` trials for each of
  ``--seeds`` seeds, objective ``error`` within the budget, ``1 + relative overshoot`` beyond it
  (as in ``model_search.py``). Its best 10% are the ``trials / 10`` best trials of a run, all
  within the budget where there are that many; the warm start is in their range when its error
  is at most the worst of them.

Errors are measured on the task's validation set (the metric TPE optimises); the warm starts
see only the calibration batches. TPE does not depend on the sensitivities, so ``--tpe-from``
reuses the TPE runs of an earlier JSON and measures only the warm starts again. Writes
``results/warm_start_quality.{md,json}``::

    python benchmarks/warm_start_quality.py                      # 3 seeds x 200 trials
    python benchmarks/warm_start_quality.py --tpe-from results/warm_start_quality.json
    python benchmarks/warm_start_quality.py --seeds 1 --trials 20 --output warm_start_quick
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path
import sys
import time
from typing import Any
import warnings

from _common import markdown_table
from _common import report_header
from _common import RESULTS_DIR
import numpy as np
import optuna


TASK_SEED = 0
TASKS = {
    "digits": "optuna_ctpe.tasks.digits:digits_task",
    "resnet18": "optuna_ctpe.tasks.vision:resnet18_digits_task",
    "mobilenet_v2": "optuna_ctpe.tasks.vision:mobilenet_v2_digits_task",  # not in the issue
}


def load_task(name: str) -> Any:
    module, factory = TASKS[name].split(":")
    return getattr(importlib.import_module(module), factory)(seed=TASK_SEED)


class Scorer:
    """Validation error of configurations, cached by configuration."""

    def __init__(self, task: Any, space: Any) -> None:
        from optuna_ctpe.nn.apply import WeightCache

        self.task, self.space, self.cache = task, space, WeightCache()
        self.errors: dict[Any, float] = {}

    def error(self, config: Any) -> float:
        key = config.key()
        if key not in self.errors:
            example = self.task.example_inputs
            with self.space.applied(self.task.model, config, example, cache=self.cache) as net:
                self.errors[key] = 1.0 - float(self.task.evaluate(net))
        return self.errors[key]

    def objective(self, config: Any, budget_bits: float) -> float:
        size = self.space.size(config)
        if size > budget_bits:
            return 1.0 + (size - budget_bits) / budget_bits
        return self.error(config)


def tpe_run(space: Any, scorer: Scorer, budget_bits: float, seed: int, n_trials: int) -> list:
    """Objective values of one TPE run over the full grid, in trial order."""
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(
        lambda trial: scorer.objective(space.suggest(trial), budget_bits), n_trials=n_trials
    )
    return [t.value for t in study.trials]


def warm_start(space: Any, scorer: Scorer, ratio: float, measure: Any) -> dict[str, Any]:
    """The first warm start at ``ratio`` of FP32 (Ω-ranked, or measured), with its numbers."""
    start = time.perf_counter()
    params = space.warm_starts(size_ratio=ratio, n=3, measure=measure)[0]
    seconds = time.perf_counter() - start
    config = space.config_from_params(params)
    return {
        "error": scorer.error(config),
        "predicted_increase": space.perturbation(config) / 2,
        "size_ratio": space.size(config) / space.fp32_bits,
        "narrowed_groups": sum(w < 1 for w in config.widths.values()),
        "seconds": seconds,
        "params": params,
    }


def measure_task(name: str, args: argparse.Namespace, earlier: dict | None) -> dict[str, Any]:
    from optuna_ctpe import HessianSearchSpace

    task = load_task(name)
    start = time.perf_counter()
    space = HessianSearchSpace.from_model(
        task.model, task.loss_fn, task.calibration_batches,
        example_inputs=task.example_inputs, estimator=args.estimator,
    )  # fmt: skip
    out: dict[str, Any] = {
        "sensitivity_seconds": time.perf_counter() - start,
        "fp32_error": 1.0 - float(task.evaluate(task.model)),
        "layers": len(space.sensitivities),
        "groups": len(space.groups),
        "ratios": {},
    }
    full = space.with_budget(math.inf)
    scorer = Scorer(task, full)
    for r in args.ratios:
        ratio = 1.0 / r
        budget_bits = ratio * space.fp32_bits
        searched = space.relaxed_for_size(size_ratio=ratio)
        measure = searched.loss_increase(
            task.model, task.loss_fn, task.calibration_batches, task.example_inputs
        )
        cell: dict[str, Any] = {
            "omega_ranked": warm_start(searched, scorer, ratio, None),
            "measured": warm_start(searched, scorer, ratio, measure),
            "tpe": [],
        }
        if earlier is not None:
            cell["tpe"] = earlier[name]["ratios"][str(r)]["tpe"][: args.seeds]
            if len(cell["tpe"]) < args.seeds or len(cell["tpe"][0]) != args.trials:
                raise SystemExit(f"--tpe-from lacks {args.seeds} runs of {args.trials} trials")
        for seed in range(len(cell["tpe"]), args.seeds):
            values = tpe_run(full, scorer, budget_bits, seed, args.trials)
            cell["tpe"].append(values)
            print(f"{name} 1/{r} TPE seed {seed}: best {min(values):.4f}", flush=True)
        out["ratios"][str(r)] = cell
    return out


def best_tenth(values: list[float]) -> tuple[float, int]:
    """The worst of a run's best 10% (within the budget where possible), and how many trials
    of the run are within the budget."""
    feasible = sorted(v for v in values if v < 1.0)
    k = max(1, len(values) // 10)
    if not feasible:
        return math.inf, 0
    return feasible[min(k, len(feasible)) - 1], len(feasible)


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    settings = (
        f"estimator `{args.estimator}`; TPE: {args.seeds} seeds x {args.trials} trials; torch "
        "1 thread on a 2-core machine shared with other runs."
    )
    lines = [report_header("Warm start quality at 8x and 16x", sys.argv, settings)]
    rows = []
    for name, res in results.items():
        for r, cell in res["ratios"].items():
            tenth = [best_tenth(v) for v in cell["tpe"]]
            limits = np.array([t for t, _ in tenth])
            best = np.array([min(v) for v in cell["tpe"]])
            for label in ("omega_ranked", "measured"):
                ws = cell[label]
                inside = int(np.sum(ws["error"] <= limits + 1e-12))
                rows.append(
                    [
                        f"{name} 1/{r}",
                        "Ω-ranked" if label == "omega_ranked" else "measured",
                        f"{ws['error']:.4f}",
                        f"{ws['predicted_increase']:.3g}",
                        f"{ws['size_ratio']:.4f}",
                        str(ws["narrowed_groups"]),
                        f"{np.median(limits):.4f} ({limits.min():.4f}-{limits.max():.4f})",
                        f"{np.median(best):.4f}",
                        f"{inside}/{len(limits)}",
                        f"{ws['seconds']:.1f}",
                    ]
                )
        lines.append(
            f"- {name}: FP32 error {res['fp32_error']:.4f}; {res['layers']} layers, "
            f"{res['groups']} width groups; sensitivities {res['sensitivity_seconds']:.0f} s; "
            "TPE runs within the budget: "
            + ", ".join(
                f"1/{r}: {[best_tenth(v)[1] for v in c['tpe']]} of {args.trials}"
                for r, c in res["ratios"].items()
            )
        )
    lines += [
        "",
        markdown_table(
            [
                "task, size",
                "first warm start",
                "error",
                "predicted Ω/2",
                "size / FP32",
                "narrowed groups",
                "TPE best-10% limit: median (range)",
                "TPE best: median",
                "within best 10%",
                "warm-start seconds",
            ],
            rows,
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="digits,resnet18")
    parser.add_argument("--ratios", default="8,16", help="compressions r: budget = FP32 / r")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--estimator", default="auto")
    parser.add_argument("--output", default="warm_start_quality")
    parser.add_argument(
        "--tpe-from",
        metavar="JSON",
        help="reuse the TPE runs of an earlier run's JSON (same tasks, ratios, trials)",
    )
    args = parser.parse_args()
    args.ratios = [int(r) for r in args.ratios.split(",")]
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    earlier = json.loads(Path(args.tpe_from).read_text()) if args.tpe_from else None
    results = {}
    for name in args.tasks.split(","):
        results[name] = measure_task(name, args, earlier)
        # Written after each task: an interrupted run still leaves what it measured.
        (RESULTS_DIR / f"{args.output}.json").write_text(json.dumps(results, indent=1))
        (RESULTS_DIR / f"{args.output}.md").write_text(report(results, args))
    print(report(results, args))


if __name__ == "__main__":
    main()
