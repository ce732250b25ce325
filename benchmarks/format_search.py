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

On the classifiers (``digits``, ``resnet18``, ``mobilenet_v2``) the 540 validation images are
split in two halves (even and odd positions of the seeded validation split): every search and
every choice among uniform formats looks only at the accuracy on the *selection* half, and the
report gives the accuracy of the chosen configuration on the *held-out* half. Scoring the best
of a hundred configurations on the images that chose it rewards the luckiest, not the best: in
an earlier run on the whole 540 images every search on resnet18 beat the FP32 model by one to
two points. The report gives both, so the size of that bias is visible. With ``--select kl``
the searches maximise, on the selection half, minus the mean KL divergence of the model's
outputs from the FP32 model's instead of its accuracy: a fidelity that no configuration can
raise above the FP32 model's by luck with the labels (the report's number stays the held-out
accuracy). On MiniLM the searches select and report on the same held-out sentences
(``held_out`` is off): its metric is a mean of cosines over many sentences, and the full
method's answer is its ILP warm start.

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
#: Task -> (factory, group size, ``from_model`` keyword arguments, held-out half).
TASKS: dict[str, tuple[str, int, dict[str, Any], bool]] = {
    "digits": ("optuna_ctpe.tasks.digits:digits_task", 32, {}, True),
    "minilm": (
        "optuna_ctpe.tasks.minilm:minilm_task",
        128,
        {"keep_first_last_bits": None, "include_embeddings": True},
        False,
    ),
    "resnet18": ("optuna_ctpe.tasks.vision:resnet18_digits_task", 128, {}, True),
    "mobilenet_v2": ("optuna_ctpe.tasks.vision:mobilenet_v2_digits_task", 128, {}, True),
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


def _scorer(task: Any, held_out: bool, select: str) -> Any:
    """``score(net) -> (selection, held-out)``: what the searches see, and the report's number.

    With a held-out half the report's number is the accuracy on the odd validation images, and
    the searches see the even ones: their accuracy (``select="accuracy"``) or the fidelity of
    the outputs to the FP32 model's, minus the mean KL divergence ``KL(p_fp32 || p_net)``
    (``select="kl"``; 0 for the FP32 model itself). Without a held-out half both numbers are
    the task's own metric on all its validation data.
    """
    import torch
    import torch.nn.functional as F

    from optuna_ctpe.nn.layers import eval_mode

    if not held_out:

        def whole(net: Any) -> tuple[float, float]:
            value = float(task.evaluate(net))
            return value, value

        return whole

    def outputs(net: Any) -> list[Any]:
        with torch.no_grad(), eval_mode(net):
            return [net(x) for x, _ in task.validation_batches]

    # Computed before any configuration is applied.
    reference = [torch.log_softmax(o, 1) for o in outputs(task.model)]

    def halves(net: Any) -> tuple[float, float]:
        logits = outputs(net)
        right = torch.cat(
            [o.argmax(1) == y for o, (_, y) in zip(logits, task.validation_batches, strict=True)]
        ).float()
        if select == "accuracy":
            chosen = float(right[0::2].mean())
        else:
            kl = torch.cat(
                [
                    F.kl_div(torch.log_softmax(o, 1), p, log_target=True, reduction="none").sum(1)
                    for o, p in zip(logits, reference, strict=True)
                ]
            )
            chosen = -float(kl[0::2].mean())
        return chosen, float(right[1::2].mean())

    return halves


def _search(
    method: str, space: Any, target: int, seed: int, trials: int, score: Any
) -> tuple[list[float], float, float]:
    """The search's incumbent after each trial, scored on the held-out half (-inf before the
    first feasible trial); its final selection score; its seconds.

    ``score(config) -> (selection, held-out)``; the search sees only the selection score.
    """
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
        best = max(uniforms, key=lambda f: score(space.uniform(f))[0])
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
    configs: dict[int, Any] = {}

    def objective(trial: optuna.Trial) -> float:
        config = configs[trial.number] = space.suggest(trial)
        excess = space.size(config) / target - 1.0
        trial.set_user_attr("excess", excess)
        return score(config)[0]

    study.optimize(objective, n_trials=trials)
    curve, best_selection, incumbent = [], -math.inf, -math.inf
    for t in study.trials:
        if t.user_attrs["excess"] <= 0 and float(t.value) > best_selection:
            best_selection = float(t.value)
            incumbent = score(configs[t.number])[1]
        curve.append(incumbent)
    return curve, best_selection, time.perf_counter() - start


def run_seed(job: tuple[str, int, list[float], int, str]) -> dict[str, Any]:
    """Everything of one seed of one task: held-out and selection values per (target,
    method), held-out curves of the searches, costs."""
    import torch

    from optuna_ctpe import HessianSearchSpace

    task_name, seed, targets, trials, select = job
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.manual_seed(seed)
    task = _load_task(task_name, seed)
    _, group, kwargs, held_out = TASKS[task_name]
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
    halves = _scorer(task, held_out, select)
    # One score per configuration: the two spaces quantize a format the same way.
    scores: dict[Any, tuple[float, float]] = {}

    def score_of(key: str) -> Any:
        space = spaces[key]

        def score(config: Any) -> tuple[float, float]:
            if config not in scores:
                with torch.no_grad(), space.applied(task.model, config) as net:
                    scores[config] = halves(net)
            return scores[config]

        return score

    score = score_of("formats")
    fp32 = halves(task.model)
    values: dict[str, dict[str, float]] = {}
    selection: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    space0 = spaces["formats"]
    for bpw in targets:
        label = f"{bpw}"
        target = size_target(space0, bpw)
        fixed = {"fp32 (reference)": fp32}
        for family, names in fams.items():
            fits = [f for f in names if space0.size(space0.uniform(f)) <= target]
            fixed[f"uniform {family}"] = (
                score(space0.uniform(fits[-1])) if fits else (math.nan, math.nan)
            )
        ilp = space0.with_budget(math.inf).warm_starts(size_bits=target, n=1)[0]
        fixed["ilp (formats)"] = score(space0.config_from_params(ilp))
        values[label] = {m: v[1] for m, v in fixed.items()}
        selection[label] = {m: v[0] for m, v in fixed.items()}
    one_time = space_seconds + time.perf_counter() - start
    for bpw in targets:
        label = f"{bpw}"
        target = size_target(space0, bpw)
        for method in SEARCHES:
            key = "pc" if "0.1" in method else "formats"
            curve, chosen, secs = _search(method, spaces[key], target, seed, trials, score_of(key))
            values[label][method] = curve[-1] if math.isfinite(curve[-1]) else math.nan
            selection[label][method] = chosen if math.isfinite(chosen) else math.nan
            curves.setdefault(label, {})[method] = curve
            seconds.setdefault(label, {})[method] = secs
        print(
            task_name, seed, label, {k: round(v, 4) for k, v in values[label].items()}, flush=True
        )
    return {
        "seed": seed,
        "values": values,
        **({"selection": selection} if held_out else {}),
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
    """The markdown report of a run's JSON (runs before the held-out halves have no
    ``selection`` values: their one metric is reported as it was)."""
    task, trials, group = data["task"], data["trials"], data["group"]
    per_seed = data["per_seed"]
    split = all("selection" in r for r in per_seed)
    header = report_header(
        f"Searching over weight formats ({task})",
        command,
        f"seeds {[r['seed'] for r in per_seed]}; {trials} trials per search (enqueued ones "
        f"count); formats {data['formats']}; {data['seconds']:.0f} s in all.",
    )
    kl = _setting(data, "select") == "kl"
    seen = "minus the mean KL divergence from the FP32 outputs" if kl else "accuracy"
    metric = (
        "The held-out accuracy (odd validation images) of the configuration each method chose "
        f"by its {seen} on the selection half (even images); *selection half*: the chosen "
        f"configuration's {seen} on the images that chose it"
        if split
        else "The metric of the best configuration within the size target"
    )
    notes = (
        f"- {metric} (higher is better); targets in stored bits per weight of the searched "
        "layers (scales and zero points included). nan: nothing of that kind fits.\n"
        "- *to TPE median*: median over seeds of the trials a search needs to reach TPE's "
        f"median final {'held-out value' if split else 'best'} (beyond the end when it never "
        "does: '>N'); *s/search*: median seconds of one search (evaluations included).\n\n"
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
            row = [label, m, " / ".join(f"{v:.4f}" for v in vals), _median(vals)]
            if split:
                chosen = [r["selection"][label][m] for r in per_seed]
                row.append(_median(np.array(chosen, dtype=float)))
            rows.append([*row, to, secs])
    columns = ["bits/weight", "method", "per seed", "median"]
    if split:
        columns.append("selection half (-KL)" if kl else "selection half")
    table = markdown_table([*columns, "to TPE median", "s/search"], rows)
    one_time = np.median([r["one_time_seconds"] for r in per_seed])
    footer = (
        f"\nOne-time cost per seed (median): {one_time:.0f} s to measure the two spaces "
        "(sensitivities, the formats' Ω), the uniform formats and the ILP answers. "
        f"Distinct configurations evaluated per seed (median): "
        f"{np.median([r['evaluations'] for r in per_seed]):.0f}.\n"
    )
    return header + notes + table + "\n" + footer


def _median(values: np.ndarray) -> str:
    return f"{np.nanmedian(values):.4f}" if np.isfinite(values).any() else "nan"


def merged(data: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the seeds of ``more``, a run of the same task and settings on other seeds.

    Raises:
        ValueError: If the two runs differ in anything but their seeds, or share a seed.
    """
    for key in ("task", "group", "trials", "targets", "formats", "select"):
        if _setting(data, key) != _setting(more, key):
            raise ValueError(
                f"cannot merge runs of different {key}: "
                f"{_setting(data, key)} / {_setting(more, key)}"
            )
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


def _setting(data: dict[str, Any], key: str) -> Any:
    """A run's setting; runs written before ``--select`` existed selected by accuracy."""
    return data.get(key, "accuracy") if key == "select" else data[key]


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
    parser.add_argument(
        "--select",
        choices=("accuracy", "kl"),
        default="accuracy",
        help="what the searches maximise on the selection half of a classifier's validation "
        "images: accuracy, or minus the KL divergence of the outputs from the FP32 model's",
    )
    args = parser.parse_args(argv)
    if args.select != "accuracy" and not TASKS[args.task][3]:
        parser.error(f"--select {args.select} needs a classifier task, not {args.task!r}")
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
        jobs = [(args.task, s, args.targets, args.trials, args.select) for s in args.seeds]
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
            "select": args.select,
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
