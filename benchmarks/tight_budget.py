"""Tight size budgets: known constraints vs the constraint learned from finished trials.

Question (issue 18): the size of a configuration is a known function of its parameters. With
``ClusterTPESampler(known_constraints=space.size_constraint(ratio))`` no trial should be
spent on a configuration that cannot fit. How many trials are infeasible with and without it,
how soon does each method reach Optuna's TPESampler's median 200-trial best feasible value
(the full method should need at most a quarter of TPE's trials), where does it end, and what
does the check cost the sampler per trial?

Compared, each for ``--seeds`` seeds and ``--trials`` trials (warm starts count as trials):

* ``known``: the full method with known constraints: the Hessian-pruned space relaxed to fit
  the budget and to keep the unpruned grid's three ILP allocations at it
  (``relaxed_for_size(..., keep_allocation=True)``), its priors, its three ILP warm starts, and
  ``known_constraints=space.size_constraint(...)``;
* ``learned_kept``: the same space, priors and warm starts without known constraints;
* ``learned``: the method as it was before (``relaxed_for_size`` without
  ``keep_allocation``), the size reaching the sampler only through ``set_constraint`` of
  finished trials;
* ``tpe``: Optuna's ``TPESampler()`` (defaults) on the full grid with ``set_constraint``.

Every trial records ``set_constraint("size", size / B - 1)``. The objective is ``1 - metric``
(validation accuracy; MiniLM: embedding fidelity); an infeasible configuration is not scored
(its value, 1, is ignored by all three samplers, which rank infeasible trials by violation), so
the benchmark spends no time on it; the share of such trials is what a real search would waste.
Scores are cached by configuration (bit for bit ``space.apply``, as in ``model_search.py``).

The sampler's time per trial is the wall time of a trial minus its objective's, measured in the
same runs; the report gives ``known``'s over ``learned``'s.

Tasks and budgets (``--task``, repeatable): ``digits`` (the package's digits CNN, default grids
with widths, at 1/16 and 1/24 of FP32), ``resnet18`` (bits only, at uniform 3-bit size),
``minilm`` (bits only over the 36 Linear layers, at 3.25 bits per searched Linear weight:
``size(uniform 3) + 0.25 × (size(uniform 4) − size(uniform 3))``), and ``synthetic39`` (the
sampler's overhead at MiniLM's scale without its model: 39 layers of MiniLM's Linear and
embedding sizes, scored by ``1 / (1 + Ω / Ω(uniform 4-bit))`` as the metric, at 3.25 bits
per weight).

Writes ``results/tight_budget.md`` and ``.json`` (raw per-trial records)::

    python benchmarks/tight_budget.py --task digits                     # 10 seeds x 200 trials
    python benchmarks/tight_budget.py --task digits --task resnet18 --seeds 3 --trials 100
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
from _common import markdown_table
from _common import report_header
from _common import RESULTS_DIR
import numpy as np
import optuna


TASK_SEED = 0
N_WARM = 3
METHODS = ("known", "learned_kept", "learned", "tpe")
#: Task -> (factory, ``from_model`` keyword arguments, budgets as label -> rule).
TASKS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "digits": ("optuna_ctpe.tasks.digits:digits_task", {}, ("1/16", "1/24")),
    "resnet18": ("optuna_ctpe.tasks.vision:resnet18_digits_task", {"widths": (1.0,)}, ("3.0b",)),
    "minilm": ("optuna_ctpe.tasks.minilm:minilm_task", {"widths": (1.0,)}, ("3.25b",)),
    # The sampler's overhead at MiniLM's scale without its model: 39 layers of MiniLM's sizes,
    # scored by a function of Ω (no evaluation), bits only.
    "synthetic39": ("", {}, ("3.25b",)),
}


def _synthetic_space() -> Any:
    """39 layers of all-MiniLM-L6-v2's Linear and embedding sizes, traces spread over 4
    decades, rounding error falling 4x per bit."""
    from optuna_ctpe.search_space import HessianSearchSpace
    from optuna_ctpe.search_space import LayerSensitivity

    rng = np.random.default_rng(0)
    sizes = [384 * 384] * 24 + [384 * 1536] * 12 + [30522 * 384, 512 * 384, 2 * 384]
    bits = (2, 3, 4, 6, 8)
    layers = [
        LayerSensitivity(
            f"l{i}", float(10 ** rng.uniform(-4, 0)), n, {b: 4.0 ** (-b) * n for b in bits}
        )
        for i, n in enumerate(sizes)
    ]
    return HessianSearchSpace.from_sensitivities(layers, bits=bits, fixed_bits={"l38": 8})


#: Method -> (whether the space keeps the unpruned grid's allocations, known constraints).
METHOD_SETTINGS = {
    "known": (True, True),
    "learned_kept": (True, False),
    "learned": (False, False),
}


def budget_bits(space: Any, label: str) -> float:
    """The budget in bits: a fraction of FP32 (``1/16``), or bits per searched weight (``3.25b``,
    between the sizes of uniform 3 and 4 bits)."""
    if label.endswith("b"):
        b = float(label[:-1])
        lo, hi = math.floor(b), math.ceil(b)
        low, high = space.size(space.uniform(lo)), space.size(space.uniform(hi))
        return float(low + (b - lo) * (high - low))
    num, den = label.split("/")
    return float(space.fp32_bits) * float(num) / float(den)


def _load_task(name: str) -> Any:
    import importlib

    module, factory = TASKS[name][0].split(":")
    return getattr(importlib.import_module(module), factory)(seed=TASK_SEED)


_STATE: dict[str, Any] = {}


def _init_worker(task_name: str, space_json: str) -> None:
    import torch

    from optuna_ctpe.nn.apply import WeightCache
    from optuna_ctpe.search_space import HessianSearchSpace

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    task = _load_task(task_name) if task_name != "synthetic39" else None
    _STATE.update(
        task=task,
        space=HessianSearchSpace.from_json(space_json),
        cache=WeightCache(),
        scores={},
    )


def _metric(config: Any) -> float:
    scores, space, task = _STATE["scores"], _STATE["space"], _STATE["task"]
    key = config.key()
    if task is None:
        # A stand-in metric in (0, 1], 1/2 at uniform 4-bit's summed Ω.
        return 1.0 / (1.0 + space.perturbation(config) / space.perturbation(space.uniform(4)))
    if key not in scores:
        with space.applied(task.model, config, task.example_inputs, cache=_STATE["cache"]) as net:
            scores[key] = float(task.evaluate(net))
    return scores[key]


def run_one(spec: tuple[str, str, int, int]) -> dict[str, Any]:
    """One study: per trial its feasibility and value, and the sampler's seconds per trial."""
    from optuna_ctpe import ClusterTPESampler

    method, label, seed, n_trials = spec
    space = _STATE["space"]
    bits = budget_bits(space, label)
    if method == "tpe":
        searched = space.with_budget(math.inf)
        sampler: Any = optuna.samplers.TPESampler(seed=seed)
    else:
        keep, use_known = METHOD_SETTINGS[method]
        searched = space.relaxed_for_size(size_bits=int(bits), keep_allocation=keep)
        known = searched.size_constraint(size_bits=int(bits)) if use_known else None
        sampler = ClusterTPESampler(
            seed=seed, prior_weights=searched.prior_weights(), known_constraints=known
        )
    study = optuna.create_study(sampler=sampler)
    if method != "tpe":
        for params in searched.warm_starts(size_bits=int(bits), n=N_WARM):
            study.enqueue_trial(params)
    objective_seconds = [0.0]

    def objective(trial: optuna.Trial) -> float:
        # Optuna samples relative parameters at the first suggest: the suggestions are the
        # sampler's time, the scoring after them the objective's.
        config = searched.suggest(trial)
        start = time.perf_counter()
        excess = space.size(config) / int(bits) - 1.0
        trial.set_constraint("size", excess)
        value = 1.0 if excess > 0 else 1.0 - _metric(config)
        objective_seconds[0] += time.perf_counter() - start
        return value

    start = time.perf_counter()
    study.optimize(objective, n_trials=n_trials)
    total = time.perf_counter() - start
    feasible = [
        all(v <= 0 for v in t.constraints.values()) and t.value is not None for t in study.trials
    ]
    return {
        "method": method,
        "budget": label,
        "seed": seed,
        "feasible": feasible,
        "values": [t.value for t in study.trials],
        "repaired": sum(bool(t.user_attrs.get("ctpe:repaired")) for t in study.trials),
        "sampler_s_per_trial": (total - objective_seconds[0]) / n_trials,
    }


def best_curve(run: dict[str, Any]) -> np.ndarray:
    """Best feasible value after each trial (inf before the first feasible one)."""
    vals = np.where(run["feasible"], np.asarray(run["values"], dtype=float), np.inf)
    return np.minimum.accumulate(vals)


def trials_to(curve: np.ndarray, target: float) -> int | None:
    """Trials until the best feasible value reaches ``target``; with an infinite target (the
    reference found nothing feasible), trials until the first feasible value."""
    hit = np.nonzero(np.isfinite(curve) & (curve <= target + 1e-12))[0]
    return int(hit[0]) + 1 if hit.size else None


def median_trials(counts: list[int | None], n_trials: int) -> float | None:
    """Median of trials-to-target, a run that never reaches it counting as beyond the end."""
    med = float(np.median([c if c is not None else n_trials + 1 for c in counts]))
    return None if med > n_trials else med


def report(data: dict[str, Any], command: list[str]) -> str:
    n_trials, seeds = data["trials"], data["seeds"]
    lines = [
        report_header(
            "Tight budgets: known constraints vs the learned constraint",
            command,
            f"Seeds: {list(range(seeds))}, {n_trials} trials per run (warm starts count); "
            "objective 1 - metric minimised within the size budget.",
        ),
        "Columns: *infeasible* is the share of trials over the budget (mean over seeds); "
        "*to TPE median* the median number of trials to reach TPE's median final best feasible "
        "value (runs that never reach it count as beyond the end) and its ratio to TPE's; "
        "*final* the median final best feasible value (1 - metric); *sampler ms/trial* the "
        "median sampler time per trial (trial wall time minus the scoring), and *vs "
        "learned_kept* its ratio to that of the same space without known constraints, "
        "measured in the same invocation.",
        "",
    ]
    header = [
        "task",
        "budget",
        "method",
        "infeasible",
        "repaired",
        "to TPE median",
        "ratio to TPE",
        "final (median)",
        "sampler ms/trial",
        "vs learned_kept",
    ]
    rows = []
    for task, per_budget in data["results"].items():
        for label, runs in per_budget.items():
            curves = {m: np.array([best_curve(r) for r in runs[m]]) for m in METHODS if m in runs}
            tpe_final = np.median(curves["tpe"][:, -1])
            counts = {m: [trials_to(c, tpe_final) for c in curves[m]] for m in curves}
            tpe_med = median_trials(counts["tpe"], n_trials)
            ms = {
                m: float(np.median([r["sampler_s_per_trial"] for r in runs[m]])) * 1e3
                for m in runs
            }
            for m in curves:
                med = median_trials(counts[m], n_trials)
                rows.append(
                    [
                        task,
                        f"{label} ({data['budget_ratio'][task][label]:.4f} of FP32)",
                        m,
                        f"{np.mean([1 - np.mean(r['feasible']) for r in runs[m]]):.1%}",
                        f"{np.mean([r['repaired'] for r in runs[m]]):.1f}"
                        if m == "known"
                        else "—",
                        "never" if med is None else f"{med:.0f}",
                        "—" if med is None or tpe_med is None else f"{med / tpe_med:.2f}",
                        fmt(float(np.median(curves[m][:, -1]))),
                        f"{ms[m]:.1f}",
                        f"{ms[m] / ms['learned_kept']:.2f}" if m != "tpe" else "—",
                    ]
                )
    lines += [markdown_table(header, rows), ""]
    never = [
        f"{task} at {label}"
        for task, per_budget in data["results"].items()
        for label, runs in per_budget.items()
        if not np.isfinite(np.median([best_curve(r)[-1] for r in runs["tpe"]]))
    ]
    if never:
        lines += [
            f"At {', '.join(never)} most TPE runs found no feasible configuration in "
            f"{n_trials} trials, so TPE's median final best is infinite: there *to TPE median* "
            "counts the trials to the first feasible configuration, and TPE's entry is "
            "*never*.",
            "",
        ]
    lines += [
        f"Task set-up: {json.dumps(data['setup'])}",
        "",
    ]
    return "\n".join(lines)


def replay_overhead(space: Any, label: str, n_history: int, repeats: int) -> dict[str, Any]:
    """The sampler's time for one proposal after ``n_history`` trials, with and without known
    constraints, on the same study: a cleaner ratio than whole runs on a shared machine.

    The history is a run of the ``known`` method scored by the stand-in metric of
    ``synthetic39`` (only its shape matters here). Each repeat then times, for a fresh sampler
    of either kind (seed = the repeat), what one trial costs the sampler: the relative search
    space, the relative sample and ``after_trial``, on a new trial that is then failed (failed
    trials are ignored by both). The two kinds alternate, so load on the machine hits both.
    """
    from optuna_ctpe import ClusterTPESampler

    bits = int(budget_bits(space, label))
    searched = space.relaxed_for_size(size_bits=bits, keep_allocation=True)
    known = searched.size_constraint(size_bits=bits)
    omega4 = searched.perturbation(searched.uniform(4))

    def objective(trial: optuna.Trial) -> float:
        config = searched.suggest(trial)
        return searched.perturbation(config) / (omega4 + searched.perturbation(config))

    priors = searched.prior_weights()
    study = optuna.create_study(
        sampler=ClusterTPESampler(seed=0, prior_weights=priors, known_constraints=known)
    )
    study.optimize(objective, n_trials=n_history)
    seconds: dict[str, list[float]] = {"known": [], "none": []}
    for r in range(repeats):
        for kind in ("none", "known"):
            sampler = ClusterTPESampler(
                seed=r, prior_weights=priors, known_constraints=known if kind == "known" else None
            )
            trial = study.ask()
            frozen = study._storage.get_trial(trial._trial_id)
            start = time.perf_counter()
            relative = sampler.infer_relative_search_space(study, frozen)
            sampler.sample_relative(study, frozen, relative)
            sampler.after_trial(study, frozen, optuna.trial.TrialState.FAIL, None)
            seconds[kind].append(time.perf_counter() - start)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    known_ms = 1e3 * float(np.median(seconds["known"]))
    none_ms = 1e3 * float(np.median(seconds["none"]))
    return {
        "budget": label,
        "n_history": n_history,
        "repeats": repeats,
        "known_ms": known_ms,
        "none_ms": none_ms,
        "ratio": known_ms / none_ms,
    }


def overhead_report(data: dict[str, Any], command: list[str]) -> str:
    rows = [
        [
            task,
            f"{r['budget']} ({data['budget_ratio'][task][r['budget']]:.4f} of FP32)",
            str(data["setup"][task]["searched"]),
            str(r["n_history"]),
            str(r["repeats"]),
            f"{r['none_ms']:.1f}",
            f"{r['known_ms']:.1f}",
            f"{r['ratio']:.2f}",
        ]
        for task, results in data["results"].items()
        for r in results
    ]
    header = [
        "task",
        "budget",
        "searched parameters",
        "trials before",
        "repeats",
        "ms without known constraints",
        "ms with",
        "ratio",
    ]
    return "\n".join(
        [
            report_header(
                "Tight budgets: the sampler's time per proposal with known constraints",
                command,
                "One proposal (relative search space, relative sample, after_trial) timed on "
                "the same study after the given trials, alternating the two samplers; medians "
                "over the repeats (see replay_overhead in the script).",
            ),
            markdown_table(header, rows),
            "",
        ]
    )


def main(argv: list[str]) -> None:
    import torch

    from optuna_ctpe.search_space import HessianSearchSpace

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), action="append", required=True)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--replay",
        type=int,
        default=0,
        metavar="REPEATS",
        help="only time one proposal after --trials trials, with and without known "
        "constraints, REPEATS times each (see replay_overhead); writes results/"
        "tight_budget_overhead<tag>.md",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = RESULTS_DIR / f"tight_budget{args.tag}.json"
    data: dict[str, Any] = {
        "trials": args.trials,
        "seeds": args.seeds,
        "results": {},
        "budget_ratio": {},
        "setup": {},
    }
    for name in args.task:
        _, kwargs, budgets = TASKS[name]
        t0 = time.perf_counter()
        if name == "synthetic39":
            space = _synthetic_space()
        else:
            task = _load_task(name)
            space = HessianSearchSpace.from_model(
                task.model,
                task.loss_fn,
                task.calibration_batches,
                example_inputs=task.example_inputs,
                seed=0,
                **kwargs,
            )
        data["setup"][name] = {
            "layers": len(space.sensitivities),
            "searched": len(space.distributions),
            "log10_full": round(space.log10_size_before, 1),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        data["budget_ratio"][name] = {b: budget_bits(space, b) / space.fp32_bits for b in budgets}
        if args.replay:
            data["results"][name] = [
                replay_overhead(space, b, args.trials, args.replay) for b in budgets
            ]
            continue
        specs = [
            (m, b, seed, args.trials)
            for b in budgets
            for seed in range(args.seeds)
            for m in METHODS
        ]
        with multiprocessing.get_context("fork").Pool(
            args.workers, _init_worker, (name, space.to_json())
        ) as pool:
            runs = pool.map(run_one, specs, chunksize=1)
        per_budget: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for r in runs:
            per_budget.setdefault(r["budget"], {}).setdefault(r["method"], []).append(r)
        data["results"][name] = per_budget
        out.write_text(json.dumps(data))
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.replay:
        text = overhead_report(data, ["benchmarks/tight_budget.py", *argv])
        (RESULTS_DIR / f"tight_budget_overhead{args.tag}.md").write_text(text)
        print(text)
        return
    write_report(data, ["benchmarks/tight_budget.py", *argv], args.tag)


def write_report(data: dict[str, Any], command: list[str], tag: str) -> None:
    """Write ``results/tight_budget<tag>.md`` from the raw results (also used to re-render a
    committed ``.json`` after a change to the report)."""
    text = report(data, command)
    (RESULTS_DIR / f"tight_budget{tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
