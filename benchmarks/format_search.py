"""Searching over weight formats on the digits CNN: the full method vs uniform formats vs TPE.

For each seed the digits CNN is trained (``digits_task(seed)``) and a format space is measured
on it (``HessianSearchSpace.from_model(formats=FORMATS)``; first and last layers fixed at
8 bits, as by default). At each size target, given as stored bits per weight of the searched
layers (codes, scales and zero points; fixed layers and float tensors priced as they are),
the validation accuracy of the best configuration within the target is reported for:

* ``uniform pc-sym-rtn`` / ``uniform g32-asym-rtn`` / ``uniform g32-asym-gptq``: the largest
  bit-width of that family whose uniform configuration fits;
* ``ctpe (full)``: the method as a user runs it: ``relaxed_for_size``, every uniform format that
  fits measured and the best kept (``keeping``) and enqueued, the ILP's warm starts enqueued,
  ``ClusterTPESampler`` with the space's priors, ``--trials`` trials in all;
* ``tpe``: Optuna's ``TPESampler`` on the same formats, unpruned, nothing enqueued.

A trial over the target scores its accuracy minus 1 (infeasible); the best feasible accuracy
found is reported. The group size is 32 (the digits CNN's rows have 9 to 512 inputs, so
groups of 128 would mostly be whole rows).

Run::

    python benchmarks/format_search.py --seeds 0 1 2 --targets 2.5 3.25 --trials 60

Writes ``results/format_search.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import numpy as np
import optuna
import torch

from _common import markdown_table
from _common import report_header
from _common import RESULTS_DIR
from optuna_ctpe import ClusterTPESampler
from optuna_ctpe import HessianSearchSpace
from optuna_ctpe.space.size import layer_bits
from optuna_ctpe.tasks.digits import digits_task


BITS = (2, 3, 4, 8)
FAMILIES = {
    "pc-sym-rtn": [f"int{b}-pc-sym-rtn" for b in BITS],
    "g32-asym-rtn": [f"int{b}-g32-asym-rtn" for b in BITS],
    "g32-asym-gptq": [f"int{b}-g32-asym-gptq" for b in BITS],
}
FORMATS = [f for family in FAMILIES.values() for f in family]


def size_target(space: HessianSearchSpace, bits_per_weight: float) -> int:
    """Bits of the model whose searched layers store ``bits_per_weight`` per weight."""
    spec = space.spec
    full = dict.fromkeys(spec.groups, 1.0)
    reference = space.uniform(FORMATS[0])
    searched = spec.searched_layers()
    rest = space.size(reference) - sum(
        layer_bits(spec, n, reference.formats[n], full) for n in searched
    )
    numel = sum(spec.layers[n].n_params for n in searched)
    return int(rest + bits_per_weight * numel)


def run_seed(seed: int, targets: list[float], trials: int) -> dict[tuple[float, str], float]:
    """Best feasible accuracy per (target, method) on the digits CNN of ``seed``."""
    torch.manual_seed(seed)
    task = digits_task(seed=seed)
    space0 = HessianSearchSpace.from_model(
        task.model, task.loss_fn, task.calibration_batches, formats=FORMATS, seed=seed
    )
    cache: dict = {}

    def accuracy(space: HessianSearchSpace, config) -> float:  # type: ignore[no-untyped-def]
        if config not in cache:
            with torch.no_grad(), space.applied(task.model, config) as net:
                cache[config] = float(task.evaluate(net))
        return cache[config]

    out: dict[tuple[float, str], float] = {}
    with torch.no_grad():
        fp32 = float(task.evaluate(task.model))
    for bpw in targets:
        out[(bpw, "fp32 (reference)")] = fp32
        target = size_target(space0, bpw)
        for family, names in FAMILIES.items():
            fits = [f for f in names if space0.size(space0.uniform(f)) <= target]
            out[(bpw, f"uniform {family}")] = (
                accuracy(space0, space0.uniform(fits[-1])) if fits else math.nan
            )
        for method in ("ctpe (full)", "tpe"):
            if method == "tpe":
                space = space0.with_budget(math.inf)
                sampler = optuna.samplers.TPESampler(seed=seed)
            else:
                space = space0.relaxed_for_size(size_bits=target)
                uniforms = space.uniform_formats(size_bits=target)
                best = max(uniforms, key=lambda f: accuracy(space, space.uniform(f)))
                space = space.keeping([best])
                sampler = ClusterTPESampler(seed=seed, prior_weights=space.prior_weights())
            study = optuna.create_study(direction="maximize", sampler=sampler)
            if method != "tpe":
                study.enqueue_trial(space.to_params(space.uniform(best)))
                for params in space.warm_starts(size_bits=target, n=2):
                    study.enqueue_trial(params)

            def objective(
                trial: optuna.Trial, space: HessianSearchSpace = space, target: int = target
            ) -> float:
                config = space.suggest(trial)
                feasible = space.size(config) <= target
                trial.set_user_attr("feasible", feasible)
                return accuracy(space, config) - (0.0 if feasible else 1.0)

            study.optimize(objective, n_trials=trials)
            feasible = [t.value for t in study.trials if t.user_attrs["feasible"]]
            out[(bpw, method)] = max(feasible) if feasible else math.nan
        print(seed, bpw, {k[1]: round(v, 4) for k, v in out.items() if k[0] == bpw}, flush=True)
    return out


def main(argv: list[str]) -> None:
    """Run the seeds, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[2.5, 3.25])
    parser.add_argument("--trials", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    per_seed = [run_seed(s, args.targets, args.trials) for s in args.seeds]
    methods = ["fp32 (reference)", *(f"uniform {f}" for f in FAMILIES), "ctpe (full)", "tpe"]
    rows = []
    for bpw in args.targets:
        for m in methods:
            values = np.array([r[(bpw, m)] for r in per_seed])
            rows.append(
                [f"{bpw}", m, " / ".join(f"{v:.4f}" for v in values), f"{np.nanmean(values):.4f}"]
            )
    header = report_header(
        "Searching over weight formats (digits CNN)",
        ["benchmarks/format_search.py", *argv],
        f"seeds {args.seeds}; {args.trials} trials per search; formats {FORMATS}; "
        f"{time.perf_counter() - start:.0f} s in all.",
    )
    notes = (
        "- Validation accuracy (540 images) of the best configuration within the size "
        "target; targets in stored bits per weight of the searched layers (scales and zero "
        "points included).\n- nan: nothing of that kind fits the target.\n\n"
    )
    table = markdown_table(["bits/weight", "method", "per seed", "mean"], rows)
    report = header + notes + table + "\n"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "format_search.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main(sys.argv[1:])
