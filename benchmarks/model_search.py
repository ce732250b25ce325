"""Mixed-precision search on real models: the full method vs TPE vs the ILP allocation vs uniform.

Question (issue 9): on a pretrained transformer and on a deeper CNN, does the full method (the
Hessian-pruned space with its priors and ILP warm starts, searched by ClusterTPESampler) reach
Optuna's TPESampler's median 200-trial best in at most a quarter of TPE's trials, and does it
beat the HAWQ-V3-style ILP allocation at the same size?

Tasks (``--task``):

* ``resnet18``: torchvision's resnet18 trained briefly on upscaled digits
  (:func:`optuna_ctpe.tasks.vision.resnet18_digits_task`, seed 0); metric: validation accuracy
  (540 images); the first and last layers fixed at 8 bits (package default), 19 layers searched.
* ``minilm``: the pretrained all-MiniLM-L6-v2 (:func:`optuna_ctpe.tasks.minilm.minilm_task`,
  seed 0); metric: embedding fidelity (mean cosine to the FP32 embeddings over 128 validation
  sentences); all 36 Linear layers AND the three embedding tables searched
  (``include_embeddings=True``, ``keep_first_last_bits=None``): the word embeddings hold half of
  the weights, so a budget of 3-4 bits per weight is out of reach with them in float32.

Bit-widths only (``widths=(1.0,)``, default grid 2, 3, 4, 6, 8): the budgets are stated in bits
per weight, and width pruning without fine-tuning is issue 10's open question. For each budget
``B`` = the size of uniform ``b``-bit weights (``--budget-bits``, default 4 and 3; fixed layers
keep 8 bits, biases and norms 32), the objective of a configuration is ``1 - metric`` if its size
is within ``B``, else ``1 + (size - B) / B`` (every infeasible configuration is worse than every
feasible one and still says how far off it is). Configurations are scored with
``space.applied(model, config, cache=WeightCache())``: the model quantized in place, bit for bit
what ``space.apply`` computes (the script checks a few), each (layer, bit-width) quantized once.

Compared, each for ``--seeds`` seeds and ``--trials`` trials (warm starts count as trials):

* ``method``: ``ClusterTPESampler(prior_weights=space.prior_weights())`` on the space pruned at
  the default budget 16, relaxed to contain a configuration of size <= B, with the space's three
  ILP warm starts enqueued: the package defaults, what ``optuna-ctpe search`` does;
* ``tpe``: Optuna's ``TPESampler()`` (defaults) on the full grid;
* ``ilp``: the first ILP warm start over the full grid (least summed Ω within B): one
  deterministic configuration;
* ``uniform``: uniform ``b``-bit weights, the largest uniform precision within B.

Writes ``results/model_search_<task>.md``, ``.png`` and ``.json`` (raw curves)::

    python benchmarks/model_search.py --task resnet18     # 10 seeds x 200 trials, B = 4 and 3
    python benchmarks/model_search.py --task minilm
    python benchmarks/model_search.py --task resnet18 --seeds 2 --trials 30 --tag _quick
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from typing import Any
import warnings

from _common import fmt
from _common import fmt_p
from _common import mann_whitney
from _common import markdown_table
from _common import median_curve
from _common import new_axes
from _common import report_header
from _common import RESULTS_DIR
from _common import save_figure
from _common import trials_to_reach
import numpy as np
import optuna


TASK_SEED = 0
N_WARM = 3
SAMPLERS = ("method", "tpe")
#: Task -> (factory, ``from_model`` keyword arguments besides the task's own, metric name).
TASKS: dict[str, tuple[str, dict[str, Any], str]] = {
    "resnet18": ("optuna_ctpe.tasks.vision:resnet18_digits_task", {}, "accuracy"),
    "minilm": (
        "optuna_ctpe.tasks.minilm:minilm_task",
        {"include_embeddings": True, "keep_first_last_bits": None},
        "fidelity",
    ),
}


def _load_task(name: str) -> Any:
    import importlib

    module, factory = TASKS[name][0].split(":")
    return getattr(importlib.import_module(module), factory)(seed=TASK_SEED)


class Scorer:
    """The task metric of configurations, cached by configuration, scored in place."""

    def __init__(self, task: Any, space: Any) -> None:
        from optuna_ctpe.nn.apply import WeightCache

        self.task, self.space = task, space
        self.cache = WeightCache()
        self.scores: dict[Any, float] = {}

    def metric(self, config: Any) -> float:
        key = config.key()
        if key not in self.scores:
            with self.space.applied(self.task.model, config, cache=self.cache) as net:
                self.scores[key] = float(self.task.evaluate(net))
        return self.scores[key]

    def objective(self, config: Any, budget_bits: int) -> float:
        """``1 - metric`` within the size budget, ``1 + relative overshoot`` beyond it."""
        size = self.space.size(config)
        if size > budget_bits:
            return 1.0 + (size - budget_bits) / budget_bits
        return 1.0 - self.metric(config)


_STATE: dict[str, Any] = {}


def _init_worker(task_name: str, space_json: str) -> None:
    import torch

    from optuna_ctpe.search_space import HessianSearchSpace

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    task = _load_task(task_name)
    space = HessianSearchSpace.from_json(space_json)
    _STATE.update(space=space, scorer=Scorer(task, space))


def _method_space(space: Any, budget_bits: int) -> Any:
    return space.relaxed_for_size(size_bits=budget_bits)


def run_one(spec: tuple[str, int, int, int]) -> tuple[str, int, int, list[float], float]:
    """One study; returns sampler, budget, seed, best-so-far curve and elapsed seconds."""
    label, budget_bits, seed, n_trials = spec
    space, scorer = _STATE["space"], _STATE["scorer"]
    if label == "method":
        from optuna_ctpe import ClusterTPESampler

        searched = _method_space(space, budget_bits)
        sampler: Any = ClusterTPESampler(seed=seed, prior_weights=searched.prior_weights())
    else:
        searched = space.with_budget(math.inf)
        sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(sampler=sampler)
    if label == "method":
        for params in searched.warm_starts(size_bits=budget_bits, n=N_WARM):
            study.enqueue_trial(params)
    start = time.perf_counter()
    study.optimize(
        lambda trial: scorer.objective(searched.suggest(trial), budget_bits), n_trials=n_trials
    )
    curve = np.minimum.accumulate([t.value for t in study.trials]).tolist()
    return label, budget_bits, seed, curve, time.perf_counter() - start


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), required=True)
    parser.add_argument("--seeds", type=int, default=10, help="runs per sampler (seeds 0..n-1)")
    parser.add_argument("--trials", type=int, default=200, help="trials per run")
    parser.add_argument(
        "--budget-bits", type=int, nargs="+", default=[4, 3], help="B = uniform b-bit size"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--estimator",
        default="hutchinson",
        help="the trace estimator of the method's space (from_model's estimator=)",
    )
    parser.add_argument(
        "--resume",
        metavar="JSON",
        help="continue an earlier run's raw results (same task, trials and budgets): its "
        "search space is reused instead of measured, its seeds' curves are kept, and only the "
        "seeds it lacks up to --seeds run",
    )
    parser.add_argument(
        "--tpe-from",
        metavar="JSON",
        help="reuse the TPE curves of an earlier run's raw results (same task, seeds, trials "
        "and budgets: TPE does not depend on the sensitivities) instead of running TPE again",
    )
    parser.add_argument("--tag", default="", help="suffix of the result files")
    return parser.parse_args(argv)


def _plot(
    results: dict[int, dict[str, np.ndarray]],
    refs: dict[int, dict[str, float]],
    path: Any,
    title: str,
) -> None:
    fig, axes = new_axes(figsize=(5.5 * len(results), 4.2), ncols=len(results))
    axes = np.atleast_1d(axes)
    for ax, (b, curves) in zip(axes, sorted(results.items(), reverse=True)):
        for label, c in curves.items():
            x = np.arange(1, c.shape[1] + 1)
            q25, q50, q75 = np.percentile(c, [25, 50, 75], axis=0)
            (line,) = ax.plot(x, q50, label=label)
            ax.fill_between(x, q25, q75, alpha=0.15, color=line.get_color())
        ax.axhline(refs[b]["ilp"], color="black", ls="--", lw=0.9, label="ILP allocation")
        ax.axhline(refs[b]["uniform"], color="grey", ls=":", lw=0.9, label=f"uniform {b}-bit")
        ax.set_yscale("log")
        ax.set_xlabel("trial")
        ax.set_ylabel("best 1 - metric within the budget (median, IQR)")
        ax.set_title(f"{title}\nsize <= uniform {b}-bit", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, axes[0], path)


def _resume(
    args: argparse.Namespace,
    earlier: dict[str, Any],
    budgets: dict[int, int],
    raw: dict[int, dict[str, dict[int, list[float]]]],
    seconds: dict[int, dict[str, list[float]]],
) -> None:
    """Fill ``raw`` with every curve of an earlier run of the same problem."""
    for b, budget_bits in budgets.items():
        if earlier["task"] != args.task or earlier["budgets"].get(str(b)) != budget_bits:
            raise SystemExit(f"{args.resume} is not a run of {args.task} with budget {b}-bit.")
        for label in SAMPLERS:
            curves = earlier["curves"][str(b)][label]
            if len(curves[0]) != args.trials:
                raise SystemExit(f"{args.resume} ran {len(curves[0])} trials, not {args.trials}.")
            raw[b][label] = dict(enumerate(curves[: args.seeds]))
            seconds[b][label] = earlier["seconds"][str(b)][label][: args.seeds]


def _reuse_tpe(
    args: argparse.Namespace,
    budgets: dict[int, int],
    raw: dict[int, dict[str, dict[int, list[float]]]],
    seconds: dict[int, dict[str, list[float]]],
) -> None:
    """Fill ``raw`` with the TPE curves of ``args.tpe_from``, checking that they are comparable."""
    earlier = json.loads(open(args.tpe_from).read())
    for b, budget_bits in budgets.items():
        if earlier["task"] != args.task or earlier["budgets"].get(str(b)) != budget_bits:
            raise SystemExit(f"{args.tpe_from} is not a run of {args.task} with budget {b}-bit.")
        curves = earlier["curves"][str(b)]["tpe"]
        if len(curves) < args.seeds or len(curves[0]) != args.trials:
            raise SystemExit(f"{args.tpe_from} has too few seeds or other trial counts.")
        raw[b]["tpe"] = {seed: curves[seed] for seed in range(args.seeds)}
        seconds[b]["tpe"] = earlier["seconds"][str(b)]["tpe"]


def _budget_rows(
    b: int, curves: dict[str, np.ndarray], ref: dict[str, float], seconds: dict[str, float]
) -> list[list[str]]:
    target = float(median_curve(curves["tpe"])[-1])
    tpe_trials = trials_to_reach(curves["tpe"], target)
    rows = []
    for label, c in curves.items():
        reached = trials_to_reach(c, target)
        final = c[:, -1]
        med = median_curve(c)
        rows.append(
            [
                f"{b}-bit",
                label,
                *(fmt(med[p - 1]) for p in (10, 25, 50, 100) if p <= c.shape[1]),
                fmt(med[-1]),
                fmt(target),
                fmt(reached),
                "—" if reached is None or not tpe_trials else f"{reached / tpe_trials:.2f}",
                "—"
                if label == "tpe"
                else fmt_p(mann_whitney(final, curves["tpe"][:, -1], "less")),
                f"{np.mean(final < ref['ilp']):.0%}",
                fmt_p(mann_whitney(final, np.full_like(final, ref["ilp"]), "less"))
                if label == "method"
                else "—",
                f"{seconds[label]:.0f}",
            ]
        )
    return rows


def main(argv: list[str]) -> None:
    import torch

    from optuna_ctpe.search_space import HessianSearchSpace

    args = parse_args(argv)
    torch.set_num_threads(2)
    _, from_model_kwargs, metric_name = TASKS[args.task]
    t0 = time.perf_counter()
    task = _load_task(args.task)
    task_seconds = time.perf_counter() - t0
    fp32 = task.evaluate(task.model)
    t0 = time.perf_counter()
    earlier = json.loads(open(args.resume).read()) if args.resume else None
    if earlier is not None:
        space = HessianSearchSpace.from_json(earlier["space"])
    else:
        space = HessianSearchSpace.from_model(
            task.model,
            task.loss_fn,
            task.calibration_batches,
            widths=(1.0,),
            example_inputs=task.example_inputs,
            seed=0,
            estimator=args.estimator,
            **from_model_kwargs,
        )
    sens_seconds = time.perf_counter() - t0
    torch.set_num_threads(1)
    full = space.with_budget(math.inf)
    scorer = Scorer(task, space)
    n_weights = sum(s.n_params for s in space.sensitivities.values())

    # The in-place scorer must compute what the package's apply() computes.
    rng = np.random.default_rng(0)
    for _ in range(3):
        params = {
            n: d.choices[rng.integers(len(d.choices))] for n, d in full.distributions.items()
        }
        config = full.config_from_params(params)
        assert task.evaluate(space.apply(task.model, config)) == scorer.metric(config), config

    budgets = {b: space.size(space.uniform(b)) for b in args.budget_bits}
    refs: dict[int, dict[str, float]] = {}
    setup_rows = []
    for b, budget_bits in budgets.items():
        ilp = full.config_from_params(full.warm_starts(size_bits=budget_bits, n=1)[0])
        method_space = _method_space(space, budget_bits)
        refs[b] = {
            "ilp": scorer.objective(ilp, budget_bits),
            "uniform": scorer.objective(space.uniform(b), budget_bits),
        }
        setup_rows.append(
            [
                f"{b}-bit",
                f"{budget_bits / 8 / 2**20:.2f}",
                f"{budget_bits / n_weights:.2f}",
                f"10^{full.log10_size_before:.1f} ({len(full.distributions)})",
                f"10^{method_space.log10_size_after:.1f} ({len(method_space.distributions)}), "
                f"budget {method_space.budget:.3g}",
                f"{1 - refs[b]['uniform']:.4f}",
                f"{1 - refs[b]['ilp']:.4f} ({space.size(ilp) / budget_bits:.3f} B)",
            ]
        )
        print(f"B={b}-bit: uniform {refs[b]['uniform']:.4f}, ilp {refs[b]['ilp']:.4f}", flush=True)

    raw: dict[int, dict[str, dict[int, list[float]]]] = {
        b: {label: {} for label in SAMPLERS} for b in budgets
    }
    seconds: dict[int, dict[str, list[float]]] = {b: {s: [] for s in SAMPLERS} for b in budgets}
    if args.tpe_from:
        _reuse_tpe(args, budgets, raw, seconds)
    if earlier is not None:
        _resume(args, earlier, budgets, raw, seconds)
        sens_seconds = earlier.get("sensitivity_seconds", math.nan)
    specs = [
        (label, budget_bits, seed, args.trials)
        for b, budget_bits in budgets.items()
        for label in SAMPLERS
        for seed in range(args.seeds)
        if seed not in raw[b][label]
    ]
    bits_of = {v: k for k, v in budgets.items()}
    start = time.perf_counter()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(
        args.workers, initializer=_init_worker, initargs=(args.task, space.to_json())
    ) as pool:
        for i, (label, budget_bits, seed, curve, elapsed) in enumerate(
            pool.imap_unordered(run_one, specs), 1
        ):
            b = bits_of[budget_bits]
            raw[b][label][seed] = curve
            seconds[b][label].append(elapsed)
            print(
                f"[{i}/{len(specs)} {time.perf_counter() - start:5.0f}s] {b}-bit {label} "
                f"seed={seed}: best={curve[-1]:.4f} ({elapsed:.0f}s)",
                flush=True,
            )
    curves = {
        b: {label: np.array([raw[b][label][s] for s in range(args.seeds)]) for label in SAMPLERS}
        for b in budgets
    }

    out = RESULTS_DIR / f"model_search_{args.task}{args.tag}"
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "task": args.task,
                "optuna_version": optuna.__version__,
                "fp32_metric": fp32,
                "budgets": budgets,
                "refs": refs,
                "space": json.loads(space.to_json()),
                "sensitivity_seconds": sens_seconds,
                "curves": {b: {k: v.tolist() for k, v in c.items()} for b, c in curves.items()},
                "seconds": seconds,
            }
        )
    )
    _plot(
        curves,
        refs,
        out.with_suffix(".png"),
        f"{task.name}: {args.seeds} seeds x {args.trials} trials (1 - {metric_name})",
    )
    points = [p for p in (10, 25, 50, 100) if p <= args.trials]
    rows = [
        row
        for b in budgets
        for row in _budget_rows(
            b, curves[b], refs[b], {s: float(np.mean(seconds[b][s])) for s in SAMPLERS}
        )
    ]
    lines = [
        report_header(
            f"Mixed-precision search on {task.name}: method vs TPE vs ILP vs uniform",
            ["benchmarks/model_search.py", *argv],
            f"Seeds 0..{args.seeds - 1}, {args.trials} trials per run (warm starts included); "
            f"objective 1 - {metric_name} within the size budget, minimised.",
        ),
        "## Setup",
        "",
        f"- Task `{TASKS[args.task][0]}` (seed {TASK_SEED}): built in {task_seconds:.0f} s; FP32 "
        f"{metric_name} {fp32:.4f}; {len(space.sensitivities)} quantized layers, "
        f"{n_weights / 1e6:.2f}M weights; fixed layers: "
        f"{dict(space.fixed_bits) or 'none'}.",
        f"- Sensitivities (`from_model` defaults, `estimator={args.estimator!r}`, adaptive "
        f"stop, seed 0): {sens_seconds:.0f} s."
        + (f" TPE curves reused from `{args.tpe_from}`." if args.tpe_from else "")
        + (f" Continued from `{args.resume}` (its space and seeds)." if args.resume else ""),
        "- Scoring: in place with a `WeightCache`, equal to `space.apply` (checked on 3 random "
        "configurations).",
        "",
        markdown_table(
            [
                "budget B",
                "MiB",
                "bits / weight",
                "full grid (params)",
                "method's space (params)",
                f"uniform {metric_name}",
                f"ILP {metric_name} (size)",
            ],
            setup_rows,
        ),
        "",
        "## Results",
        "",
        markdown_table(
            [
                "budget",
                "sampler",
                *(f"median best @{p}" for p in points),
                f"median best @{args.trials}",
                "TPE median final (target)",
                "trials to reach target",
                "ratio vs TPE",
                "p (final < TPE)",
                "runs < ILP",
                "p (final < ILP)",
                "s / run",
            ],
            rows,
        ),
        "",
        f"![convergence]({out.with_suffix('.png').name})",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
