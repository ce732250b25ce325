"""Hessian-pruned search on the digits CNN: per-layer weight bits and per-group widths.

Question: does the Hessian-pruned space (with its priors and ILP warm starts) make the search
faster and better than plain TPE, and does the search beat the HAWQ-V3-style ILP allocation at
the same size budget on the true objective?

Problem: the embedded task :func:`optuna_ctpe.tasks.digits.digits_task` (seed 0), a 5-layer CNN
on scikit-learn's digits. Parameters: ``bits:<layer>`` for the three inner layers (the first and
last are fixed at 8 bits) and ``width:<group>`` for its channel groups. A trial prunes a copy,
fake-quantizes its weights (per channel) and measures validation accuracy; the objective is

* the validation error ``1 - accuracy`` if the model's size is within the budget ``B``,
* ``1 + (size - B) / B`` otherwise, so every infeasible configuration is worse than every
  feasible one and still tells the sampler how far off it is.

``B`` is the size of uniform ``--budget-bits``-bit weights at full width, interpolated linearly
between integer bit-widths (default 2.5: halfway between uniform 2 and 3 bits, where no uniform
precision fits and the search must mix bit-widths and widths). The pruned space is relaxed to
contain a configuration of size <= B (:meth:`HessianSearchSpace.relaxed_for_size`). Runs
of every sampler share one evaluation cache (configurations are deterministic), so repeated
configurations cost nothing; wall times include the sampler.

Samplers (each for ``--seeds`` seeds and ``--trials`` trials; warm starts count as trials):

* ``ctpe+prune16+prior+warm``: ClusterTPESampler on the space pruned at the default budget
  16, with the space's prior weights and its ILP warm starts enqueued (the package defaults);
* ``ctpe+prune16``: the same space, without priors and warm starts;
* ``ctpe+prune1+prior+warm``, ``ctpe+prune1``: the same with pruning budget 1, the first
  default, which pruned the best configurations away (hence the default 16; see the results);
* ``ctpe+prior+warm``: the full grid with priors and warm starts (no pruning);
* ``ctpe``: ClusterTPESampler on the full grid;
* ``tpe``: Optuna's ``TPESampler()`` on the full grid;
* ``random``: ``RandomSampler`` on the full grid;
* ``ilp``: the HAWQ-V3-style ILP allocation over the full grid (least summed Ω within B; one
  deterministic configuration, a horizontal line).

Writes ``results/hessian_search.md``, ``results/hessian_search.png`` and
``results/hessian_search.json`` (raw curves)::

    python benchmarks/hessian_search.py                  # 10 seeds x 200 trials
    python benchmarks/hessian_search.py --seeds 2 --trials 40 --tag _quick
"""

from __future__ import annotations

import argparse
import copy
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
# "prune": the pruning budget (multiple of Omega_ref) of the space, math.inf for the full grid.
CONFIGS: dict[str, dict[str, Any]] = {
    "ctpe+prune1+prior+warm": {"kind": "ctpe", "prune": 1.0, "prior": True, "warm": True},
    "ctpe+prune1": {"kind": "ctpe", "prune": 1.0, "prior": False, "warm": False},
    "ctpe+prune16+prior+warm": {"kind": "ctpe", "prune": 16.0, "prior": True, "warm": True},
    "ctpe+prune16": {"kind": "ctpe", "prune": 16.0, "prior": False, "warm": False},
    "ctpe+prior+warm": {"kind": "ctpe", "prune": math.inf, "prior": True, "warm": True},
    "ctpe": {"kind": "ctpe", "prune": math.inf, "prior": False, "warm": False},
    "tpe": {"kind": "tpe", "prune": math.inf, "prior": False, "warm": False},
    "random": {"kind": "random", "prune": math.inf, "prior": False, "warm": False},
}
REFERENCE = "tpe"
METHOD = "ctpe+prune16+prior+warm"  # the package defaults
N_WARM = 3


class Evaluator:
    """Validation accuracy of configurations, cached by configuration key.

    Pruned models are cached per width assignment and quantized weights per (widths, layer,
    bits), so a trial costs one weight copy per layer plus one validation forward pass. The
    result equals ``task.evaluate(space.apply(model, config))``; :func:`main` checks this.
    """

    def __init__(self, task: Any, space: Any) -> None:
        self.task = task
        self.space = space
        self.scores: dict[Any, float] = {}
        self._nets: dict[Any, Any] = {}
        self._originals: dict[Any, dict[str, Any]] = {}
        self._weights: dict[tuple[Any, str, int], Any] = {}

    def _net(self, widths_key: Any) -> Any:
        if widths_key not in self._nets:
            from optuna_ctpe.nn.width import prune_widths

            pruned = {g: w for g, w in widths_key if w < 1}
            net = (
                prune_widths(self.task.model, self.task.example_inputs, pruned)
                if pruned
                else copy.deepcopy(self.task.model)
            )
            modules = dict(net.named_modules())
            self._nets[widths_key] = (net, modules)
            self._originals[widths_key] = {
                n: modules[n].weight.detach().clone() for n in self.space.sensitivities
            }
        return self._nets[widths_key]

    def accuracy(self, config: Any) -> float:
        import torch

        from optuna_ctpe.nn.quantize import quantize_weight

        key = config.key()
        if key in self.scores:
            return self.scores[key]
        widths_key = key[1]
        net, modules = self._net(widths_key)
        with torch.no_grad():
            for layer, bits in config.bits.items():
                wkey = (widths_key, layer, bits)
                if wkey not in self._weights:
                    original = self._originals[widths_key][layer]
                    self._weights[wkey] = quantize_weight(original, bits)
                modules[layer].weight.copy_(self._weights[wkey])
        score = self.task.evaluate(net)
        self.scores[key] = score
        return score


_STATE: dict[str, Any] = {}


def _spaces(space: Any, budget_bits: int) -> dict[float, Any]:
    """The space at every pruning budget of :data:`CONFIGS`, each relaxed to contain size B."""
    budgets = {c["prune"] for c in CONFIGS.values()}
    return {b: space.with_budget(b).relaxed_for_size(size_bits=budget_bits) for b in budgets}


def _init_worker(space_json: str, budget_bits: int) -> None:
    import torch

    from optuna_ctpe.search_space import HessianSearchSpace
    from optuna_ctpe.tasks.digits import digits_task

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    task = digits_task(seed=TASK_SEED)
    space = HessianSearchSpace.from_json(space_json)
    _STATE.update(
        spaces=_spaces(space, budget_bits),
        evaluator=Evaluator(task, space),
        budget_bits=budget_bits,
    )


def objective_value(space: Any, evaluator: Evaluator, config: Any, budget_bits: int) -> float:
    """Validation error within the size budget, ``1 + relative overshoot`` beyond it."""
    size = space.size(config)
    if size > budget_bits:
        return 1.0 + (size - budget_bits) / budget_bits
    return 1.0 - evaluator.accuracy(config)


def _make_sampler(kind: str, seed: int, priors: dict[str, list[float]] | None) -> Any:
    if kind == "ctpe":
        from optuna_ctpe import ClusterTPESampler

        return ClusterTPESampler(seed=seed, prior_weights=priors)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def run_one(spec: tuple[str, int, int]) -> tuple[str, int, list[float], list[float]]:
    """One study: returns label, seed, best-so-far curve and elapsed seconds after each trial."""
    label, seed, n_trials = spec
    setting = CONFIGS[label]
    space = _STATE["spaces"][setting["prune"]]
    evaluator, budget_bits = _STATE["evaluator"], _STATE["budget_bits"]
    priors = space.prior_weights() if setting["prior"] else None
    study = optuna.create_study(sampler=_make_sampler(setting["kind"], seed, priors))
    if setting["warm"]:
        for params in space.warm_starts(size_bits=budget_bits, n=N_WARM):
            study.enqueue_trial(params)
    start = time.perf_counter()
    elapsed: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        value = objective_value(space, evaluator, space.suggest(trial), budget_bits)
        elapsed.append(time.perf_counter() - start)
        return value

    study.optimize(objective, n_trials=n_trials)
    values = np.minimum.accumulate([t.value for t in study.trials])
    return label, seed, values.tolist(), elapsed


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="runs per sampler (seeds 0..n-1)")
    parser.add_argument("--trials", type=int, default=200, help="trials per run")
    parser.add_argument("--budget-bits", type=float, default=2.5, help="B = uniform b-bit size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samplers", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tag", default="", help="suffix of the result files")
    return parser.parse_args(argv)


def _plot(curves: dict[str, np.ndarray], ilp_value: float, path: Any, title: str) -> None:
    fig, ax = new_axes(figsize=(7.5, 4.5))
    for label, c in curves.items():
        x = np.arange(1, c.shape[1] + 1)
        q25, q50, q75 = np.percentile(c, [25, 50, 75], axis=0)
        (line,) = ax.plot(x, q50, label=label)
        ax.fill_between(x, q25, q75, alpha=0.15, color=line.get_color())
    ax.axhline(ilp_value, color="black", ls="--", lw=0.9, label="ILP allocation (HAWQ-V3 style)")
    ax.set_yscale("log")
    ax.set_ylim(top=0.3)
    ax.set_xlabel("trial")
    ax.set_ylabel("best validation error within the size budget (median, IQR)")
    ax.set_title(title, fontsize=10)
    save_figure(fig, ax, path)


def main(argv: list[str]) -> None:
    import torch

    from optuna_ctpe.search_space import HessianSearchSpace
    from optuna_ctpe.tasks.digits import digits_task

    args = parse_args(argv)
    torch.set_num_threads(1)
    task = digits_task(seed=TASK_SEED)
    fp32 = task.evaluate(task.model)
    t0 = time.perf_counter()
    space = HessianSearchSpace.from_model(
        task.model,
        task.loss_fn,
        task.calibration_batches,
        example_inputs=task.example_inputs,
        seed=0,
    )
    sens_seconds = time.perf_counter() - t0
    full = space.with_budget(math.inf)
    lo, hi = math.floor(args.budget_bits), math.ceil(args.budget_bits)
    size_lo, size_hi = space.size(space.uniform(lo)), space.size(space.uniform(hi))
    budget_bits = int(size_lo + (args.budget_bits - lo) * (size_hi - size_lo))
    spaces = _spaces(space, budget_bits)
    evaluator = Evaluator(task, space)

    # The cached evaluation must equal the package's own apply(); check a few configurations.
    rng = np.random.default_rng(0)
    check_seconds = []
    for _ in range(5):
        params = {
            n: d.choices[rng.integers(len(d.choices))] for n, d in full.distributions.items()
        }
        config = full.config_from_params(params)
        t = time.perf_counter()
        direct = task.evaluate(space.apply(task.model, config, task.example_inputs))
        check_seconds.append(time.perf_counter() - t)
        assert direct == evaluator.accuracy(config), config

    ilp_configs = [
        full.config_from_params(p) for p in full.warm_starts(size_bits=budget_bits, n=N_WARM)
    ]
    ilp = ilp_configs[0]
    ilp_value = objective_value(space, evaluator, ilp, budget_bits)
    uniform = {
        b: (1 - evaluator.accuracy(space.uniform(b)), space.size(space.uniform(b)) / budget_bits)
        for b in space.bits
    }

    specs = [(label, seed, args.trials) for label in args.samplers for seed in range(args.seeds)]
    results: dict[str, dict[int, tuple[list[float], list[float]]]] = {
        label: {} for label in args.samplers
    }
    start = time.perf_counter()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(
        args.workers, initializer=_init_worker, initargs=(space.to_json(), budget_bits)
    ) as pool:
        for i, (label, seed, curve, elapsed) in enumerate(pool.imap_unordered(run_one, specs), 1):
            results[label][seed] = (curve, elapsed)
            print(
                f"[{i}/{len(specs)} {time.perf_counter() - start:5.0f}s] {label} seed={seed}: "
                f"best={curve[-1]:.4f} ({elapsed[-1]:.1f}s)",
                flush=True,
            )
    curves = {
        label: np.array([results[label][s][0] for s in range(args.seeds)])
        for label in args.samplers
    }
    seconds = {
        label: [results[label][s][1][-1] for s in range(args.seeds)] for label in args.samplers
    }

    out = RESULTS_DIR / f"hessian_search{args.tag}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "optuna_version": optuna.__version__,
                "budget_bits": budget_bits,
                "fp32_accuracy": fp32,
                "ilp_value": ilp_value,
                "space": json.loads(space.to_json()),
                "curves": {label: c.tolist() for label, c in curves.items()},
                "seconds": seconds,
            }
        )
    )
    _plot(
        curves,
        ilp_value,
        out.with_suffix(".png"),
        f"digits CNN, size <= uniform {args.budget_bits:g}-bit: "
        f"{args.seeds} seeds x {args.trials} trials",
    )

    target = float(median_curve(curves[REFERENCE])[-1]) if REFERENCE in curves else None
    ref_trials = trials_to_reach(curves[REFERENCE], target) if target is not None else None
    points = [p for p in (10, 25, 50, 100, 200) if p < args.trials] + [args.trials]
    rows = []
    for label, c in curves.items():
        med = median_curve(c)
        reached = trials_to_reach(c, target) if target is not None else None
        final = c[:, -1]
        rows.append(
            [label]
            + [fmt(med[p - 1]) for p in points]
            + [
                fmt(reached),
                "—" if reached is None or not ref_trials else f"{reached / ref_trials:.2f}",
                "—"
                if label == REFERENCE
                else fmt_p(mann_whitney(final, curves[REFERENCE][:, -1], "less")),
                f"{np.mean(final < ilp_value):.0%} / {np.mean(final <= ilp_value):.0%}",
                f"{np.mean(seconds[label]):.1f}",
            ]
        )
    header = (
        ["sampler"]
        + [f"median best @{p}" for p in points]
        + [
            f"trials to reach {REFERENCE} median best ({fmt(target)})",
            f"ratio vs {REFERENCE}",
            f"p (final < {REFERENCE})",
            "runs < / <= ILP",
            "s / run",
        ]
    )
    comparisons = []
    if METHOD in curves:
        for label, c in curves.items():
            if label == METHOD:
                continue
            comparisons.append(
                [
                    f"{METHOD} vs {label}",
                    fmt(float(np.median(curves[METHOD][:, -1]))),
                    fmt(float(np.median(c[:, -1]))),
                    fmt_p(mann_whitney(curves[METHOD][:, -1], c[:, -1], "less")),
                    fmt_p(mann_whitney(curves[METHOD][:, -1], c[:, -1], "greater")),
                ]
            )
    per_trial = np.mean(check_seconds)
    lines = [
        report_header(
            "Hessian-pruned search on the digits CNN",
            ["benchmarks/hessian_search.py", *argv],
            f"Seeds 0..{args.seeds - 1}, {args.trials} trials per run (warm starts included); "
            "objective minimised.",
        ),
        "## Setup",
        "",
        f"- Task: `digits_task(seed={TASK_SEED})`, FP32 validation accuracy {fp32:.4f} "
        f"({len(task.validation_batches[0][1])} images).",
        f"- Size budget B = uniform {args.budget_bits:g}-bit weights at full width = "
        f"{budget_bits} bits ({budget_bits / space.fp32_bits:.4f} of FP32). Objective: "
        "validation error if size <= B, else 1 + (size - B)/B.",
        f"- Sensitivities (Hutchinson, seed 0): {sens_seconds:.1f} s.",
        f"- Search space: 10^{full.log10_size_before:.2f} configurations before pruning "
        f"({len(full.distributions)} searched parameters); after pruning: "
        + "; ".join(
            f"budget {b:g} (relaxed to {s.budget:.4g} to fit B): 10^{s.log10_size_after:.2f} "
            f"({len(s.distributions)} parameters)"
            for b, s in sorted(spaces.items())
            if math.isfinite(b)
        )
        + ".",
        f"- One uncached evaluation (prune + quantize + validate via `space.apply`): "
        f"{1000 * per_trial:.0f} ms; cached evaluator used in the runs.",
        "",
        markdown_table(
            ["parameter", "full grid"]
            + [f"pruned, budget {b:g}" for b in sorted(spaces) if math.isfinite(b)]
            + ["mean trace"],
            [
                [name, str(list(full.choices[name]))]
                + [
                    str(list(s.choices[name]))
                    for b, s in sorted(spaces.items())
                    if math.isfinite(b)
                ]
                + [
                    fmt(
                        space.sensitivities[name.split(":", 1)[1]].mean_trace
                        if name.startswith("bits:")
                        else space.groups[name.split(":", 1)[1]].mean_trace
                    ),
                ]
                for name in full.choices
            ],
        ),
        "",
        "Uniform configurations (full width): "
        + ", ".join(f"{b}-bit error {e:.4f} at {s:.2f} B" for b, (e, s) in uniform.items()),
        "",
        "ILP warm starts over the full grid at B (least summed Omega first; the first is the "
        "ILP baseline): "
        + "; ".join(
            f"`{dict(c.bits)}` widths `{dict(c.widths)}` -> objective "
            f"{objective_value(space, evaluator, c, budget_bits):.4f}, "
            f"size {space.size(c) / budget_bits:.3f} B"
            for c in ilp_configs
        ),
        "",
        "## Results",
        "",
        markdown_table(header, rows),
        "",
        markdown_table(
            [
                "comparison (final best)",
                f"median {METHOD}",
                "median other",
                "p (method better, one-sided)",
                "p (method worse, one-sided)",
            ],
            comparisons,
        )
        if comparisons
        else "",
        "",
        f"![convergence]({out.with_suffix('.png').name})",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
