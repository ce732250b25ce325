"""Searching over weight formats: the full method vs uniform formats vs the ILP vs TPE.

For each task and seed a format space is measured on the model
(``HessianSearchSpace.from_model(formats=FORMATS)``) and, for today's method, a space over the
per-channel symmetric round-to-nearest formats only (what 0.1 searched). At each size target,
given as stored bits per weight of the searched layers (codes, scales and zero points; fixed
layers and float tensors priced as they are), the metric of the best configuration within
the target is reported for:

* ``uniform pc-sym-rtn`` / ``uniform g<G>-asym-rtn`` / ``uniform g<G>-asym-gptq``: the
  largest bit-width of that family whose uniform configuration fits (what a user gets from
  one call of a toolkit; the last is uniform GPTQ with group scales and zero points);
* ``ilp (formats)``: the HAWQ-V3-style ILP over the unpruned format space (least summed Ω
  within the target), evaluated once;
* ``ctpe (formats)``: the method as a user runs it: ``relaxed_for_size(keep_allocation=True)``,
  every uniform format that fits measured and the best kept (``keeping``) and enqueued, the
  ILP's warm starts enqueued, ``ClusterTPESampler`` with the space's priors and the size
  budget as a known constraint, ``--trials`` trials in all (warm starts count);
* ``ctpe (pc-sym-rtn, 0.1)``: the same on the per-channel symmetric RTN space (today's
  search);
* ``tpe (formats)``: Optuna's ``TPESampler`` on the same formats, unpruned, nothing enqueued,
  the size as ``constraints_func`` (what an Optuna user would write).

Beside the final best, the report gives the trials each search needs to reach TPE's median
final best (median over seeds; a run that never reaches it counts as beyond the end) and the
one-time cost of a seed (measuring the spaces, the uniform formats and the ILP).

Tasks: ``digits`` (the embedded CNN, groups of 32: its rows have 9 to 512 inputs),
``minilm`` (all-MiniLM-L6-v2, every Linear layer and the embeddings searched, groups of 128,
metric the mean cosine to the FP32 embeddings on held-out sentences), ``resnet18`` and
``mobilenet_v2`` (on upscaled digits, first and last layers fixed at 8 bits, groups of 128,
metric top-1 accuracy). Widths stay full (the formats are the question). Seeds run in
parallel processes (``--workers``).

Run::

    python benchmarks/format_search.py --task minilm --seeds 0 1 2 --targets 3.25 4.25 \
        --trials 100 --workers 2

Writes ``results/format_search<tag>.md`` and ``.json``. Seeds run separately are joined with
``--report-only --tag _minilm --merge _minilm_b`` (the JSON of ``_minilm`` then holds both).
"""

from __future__ import annotations

import argparse
import json
import math
from multiprocessing import get_context
import sys
import time
from typing import Any
import warnings

import numpy as np
import optuna

from _common import markdown_table
from _common import report_header
from _common import RESULTS_DIR


BITS = (2, 3, 4, 8)
#: Task -> (factory, group size, ``from_model`` keyword arguments).
TASKS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "digits": ("optuna_ctpe.tasks.digits:digits_task", 32, {}),
    "minilm": (
        "optuna_ctpe.tasks.minilm:minilm_task",
        128,
        {"keep_first_last_bits": None, "include_embeddings": True},
    ),
    "resnet18": ("optuna_ctpe.tasks.vision:resnet18_digits_task", 128, {}),
    "mobilenet_v2": (
        "optuna_ctpe.tasks.vision:mobilenet_v2_digits_task",
        128,
        {},
    ),
}
N_WARM = 2


def families(group: int) -> dict[str, list[str]]:
    """Family label -> its formats, smallest bit-width first."""
    return {
        "pc-sym-rtn": [f"int{b}-pc-sym-rtn" for b in BITS],
        f"g{group}-asym-rtn": [f"int{b}-g{group}-asym-rtn" for b in BITS],
        f"g{group}-asym-gptq": [f"int{b}-g{group}-asym-gptq" for b in BITS],
    }


def methods(group: int) -> list[str]:
    """The report's rows of one target, in order."""
    return [
        "fp32 (reference)",
        *(f"uniform {f}" for f in families(group)),
        "ilp (formats)",
        "ctpe (formats)",
        "ctpe (pc-sym-rtn, 0.1)",
        "tpe (formats)",
    ]


SEARCHES = ("ctpe (formats)", "ctpe (pc-sym-rtn, 0.1)", "tpe (formats)")


def size_target(space: Any, bits_per_weight: float) -> int:
    """Bits of the model whose searched layers store ``bits_per_weight`` per weight."""
    from optuna_ctpe.space.size import layer_bits

    spec = space.spec
    full = dict.fromkeys(spec.groups, 1.0)
    reference = space.uniform(spec.formats[0])
    searched = spec.searched_layers()
    rest = space.size(reference) - sum(
        layer_bits(spec, n, reference.formats[n], full) for n in searched
    )
    numel = sum(spec.layers[n].n_params for n in searched)
    return int(rest + bits_per_weight * numel)


def _load_task(name: str, seed: int) -> Any:
    import importlib

    module, factory = TASKS[name][0].split(":")
    return getattr(importlib.import_module(module), factory)(seed=seed)


def _search(
    method: str, space: Any, target: int, seed: int, trials: int, metric: Any
) -> tuple[list[float], float]:
    """Best feasible metric after each trial (-inf before the first) and the search's seconds."""
    from optuna_ctpe import ClusterTPESampler

    start = time.perf_counter()
    if method == "tpe (formats)":
        space = space.with_budget(math.inf)
        sampler: Any = optuna.samplers.TPESampler(
            seed=seed, constraints_func=lambda t: (t.user_attrs["excess"],)
        )
        enqueued: list[dict[str, Any]] = []
    else:
        space = space.relaxed_for_size(size_bits=target, keep_allocation=True)
        uniforms = space.uniform_formats(size_bits=target)
        best = max(uniforms, key=lambda f: metric(space.uniform(f)))
        space = space.keeping([best])
        sampler = ClusterTPESampler(
            seed=seed,
            prior_weights=space.prior_weights(),
            known_constraints=space.size_constraint(size_bits=target),
        )
        enqueued = [space.to_params(space.uniform(best))]
        enqueued += space.warm_starts(size_bits=target, n=N_WARM)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for params in enqueued:
        study.enqueue_trial(params)

    def objective(trial: optuna.Trial) -> float:
        config = space.suggest(trial)
        excess = space.size(config) / target - 1.0
        trial.set_user_attr("excess", excess)
        return metric(config)

    study.optimize(objective, n_trials=trials)
    curve, best_value = [], -math.inf
    for t in study.trials:
        if t.user_attrs["excess"] <= 0:
            best_value = max(best_value, float(t.value))
        curve.append(best_value)
    return curve, time.perf_counter() - start


def run_seed(job: tuple[str, int, list[float], int]) -> dict[str, Any]:
    """Everything of one seed of one task: values per (target, method), curves, costs."""
    import torch

    from optuna_ctpe import HessianSearchSpace

    task_name, seed, targets, trials = job
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.manual_seed(seed)
    task = _load_task(task_name, seed)
    _, group, kwargs = TASKS[task_name]
    fams = families(group)
    formats = [f for names in fams.values() for f in names]
    start = time.perf_counter()
    spaces = {}
    for key, grid in (("formats", formats), ("pc", fams["pc-sym-rtn"])):
        spaces[key] = HessianSearchSpace.from_model(
            task.model,
            task.loss_fn,
            task.calibration_batches,
            formats=grid,
            widths=(1.0,),
            seed=seed,
            **kwargs,
        )
    space_seconds = time.perf_counter() - start
    # One score per configuration: the two spaces quantize a format the same way.
    scores: dict[Any, float] = {}

    def metric_of(key: str) -> Any:
        space = spaces[key]

        def metric(config: Any) -> float:
            if config not in scores:
                with torch.no_grad(), space.applied(task.model, config) as net:
                    scores[config] = float(task.evaluate(net))
            return scores[config]

        return metric

    metric = metric_of("formats")
    with torch.no_grad():
        fp32 = float(task.evaluate(task.model))
    values: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    space0 = spaces["formats"]
    for bpw in targets:
        label = f"{bpw}"
        target = size_target(space0, bpw)
        row = values.setdefault(label, {"fp32 (reference)": fp32})
        for family, names in fams.items():
            fits = [f for f in names if space0.size(space0.uniform(f)) <= target]
            row[f"uniform {family}"] = metric(space0.uniform(fits[-1])) if fits else math.nan
        ilp = space0.with_budget(math.inf).warm_starts(size_bits=target, n=1)[0]
        row["ilp (formats)"] = metric(space0.config_from_params(ilp))
    one_time = space_seconds + time.perf_counter() - start
    for bpw in targets:
        label = f"{bpw}"
        target = size_target(space0, bpw)
        for method in SEARCHES:
            key = "pc" if "0.1" in method else "formats"
            curve, secs = _search(method, spaces[key], target, seed, trials, metric_of(key))
            values[label][method] = curve[-1] if math.isfinite(curve[-1]) else math.nan
            curves.setdefault(label, {})[method] = curve
            seconds.setdefault(label, {})[method] = secs
        print(
            task_name, seed, label, {k: round(v, 4) for k, v in values[label].items()}, flush=True
        )
    return {
        "seed": seed,
        "values": values,
        "curves": curves,
        "search_seconds": seconds,
        "one_time_seconds": one_time,
        "evaluations": len(scores),
    }


def trials_to(curve: list[float], target: float) -> int | None:
    """Trials until the best feasible metric reaches ``target``."""
    hit = [i for i, v in enumerate(curve) if v >= target - 1e-12]
    return hit[0] + 1 if hit else None


def report(data: dict[str, Any], command: list[str]) -> str:
    """The markdown report of a run's JSON."""
    task, trials, group = data["task"], data["trials"], data["group"]
    per_seed = data["per_seed"]
    header = report_header(
        f"Searching over weight formats ({task})",
        command,
        f"seeds {[r['seed'] for r in per_seed]}; {trials} trials per search (enqueued ones "
        f"count); formats {data['formats']}; {data['seconds']:.0f} s in all.",
    )
    notes = (
        "- The metric of the best configuration within the size target (higher is better); "
        "targets in stored bits per weight of the searched layers (scales and zero points "
        "included). nan: nothing of that kind fits.\n"
        "- *to TPE median*: median over seeds of the trials a search needs to reach TPE's "
        "median final best (beyond the end when it never does: '>N'); *s/search*: median "
        "seconds of one search (evaluations included).\n\n"
    )
    rows = []
    for label in data["targets"]:
        tpe_final = np.nanmedian([r["values"][label]["tpe (formats)"] for r in per_seed])
        for m in methods(group):
            vals = np.array([r["values"][label][m] for r in per_seed], dtype=float)
            to, secs = "", ""
            if m in SEARCHES:
                counts = [trials_to(r["curves"][label][m], tpe_final) for r in per_seed]
                med = float(np.median([c if c is not None else trials + 1 for c in counts]))
                to = f">{trials}" if med > trials else f"{med:g}"
                secs = f"{np.median([r['search_seconds'][label][m] for r in per_seed]):.0f}"
            rows.append(
                [
                    label,
                    m,
                    " / ".join(f"{v:.4f}" for v in vals),
                    f"{np.nanmedian(vals):.4f}" if np.isfinite(vals).any() else "nan",
                    to,
                    secs,
                ]
            )
    table = markdown_table(
        ["bits/weight", "method", "per seed", "median", "to TPE median", "s/search"], rows
    )
    one_time = np.median([r["one_time_seconds"] for r in per_seed])
    footer = (
        f"\nOne-time cost per seed (median): {one_time:.0f} s to measure the two spaces "
        "(sensitivities, the formats' Ω), the uniform formats and the ILP answers. "
        f"Distinct configurations evaluated per seed (median): "
        f"{np.median([r['evaluations'] for r in per_seed]):.0f}.\n"
    )
    return header + notes + table + "\n" + footer


def merged(data: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the seeds of ``more``, a run of the same task and settings on other seeds.

    Raises:
        ValueError: If the two runs differ in anything but their seeds, or share a seed.
    """
    for key in ("task", "group", "trials", "targets", "formats"):
        if data[key] != more[key]:
            raise ValueError(f"cannot merge runs of different {key}: {data[key]} / {more[key]}")
    seeds = {r["seed"] for r in data["per_seed"]}
    shared = sorted(seeds & {r["seed"] for r in more["per_seed"]})
    if shared:
        raise ValueError(f"cannot merge runs that share seeds {shared}")
    return {
        **data,
        "seconds": data["seconds"] + more["seconds"],
        "command": [*data["command"], "+", *more["command"]],
        "per_seed": sorted([*data["per_seed"], *more["per_seed"]], key=lambda r: r["seed"]),
    }


def main(argv: list[str]) -> None:
    """Run the seeds, print and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[3.25, 4.25])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--report-only", action="store_true", help="re-render the JSON")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="TAG",
        help="with --report-only: add the seeds of these runs' JSON (same task and settings)",
    )
    args = parser.parse_args(argv)
    out = RESULTS_DIR / f"format_search{args.tag}"
    if args.report_only:
        data = json.loads(out.with_suffix(".json").read_text())
        for tag in args.merge:
            data = merged(data, json.loads((RESULTS_DIR / f"format_search{tag}.json").read_text()))
        if args.merge:
            out.with_suffix(".json").write_text(json.dumps(data))
        text = report(data, data["command"])
    else:
        start = time.perf_counter()
        jobs = [(args.task, s, args.targets, args.trials) for s in args.seeds]
        if args.workers > 1:
            with get_context("spawn").Pool(args.workers) as pool:
                per_seed = pool.map(run_seed, jobs, chunksize=1)
        else:
            per_seed = [run_seed(j) for j in jobs]
        group = TASKS[args.task][1]
        command = ["benchmarks/format_search.py", *argv]
        data = {
            "task": args.task,
            "group": group,
            "trials": args.trials,
            "targets": [f"{t}" for t in args.targets],
            "formats": [f for names in families(group).values() for f in names],
            "seconds": time.perf_counter() - start,
            "command": command,
            "per_seed": per_seed,
        }
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(data))
        text = report(data, command)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
