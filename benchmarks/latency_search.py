"""Latency-aware vs size-only search on the digits CNN: Pareto fronts, measured again.

Question (issue 11, item 6): does a search that minimises latency on the target runtime find
other configurations than one that minimises size, once the chosen models are exported and
timed as whole models? Which bit-widths pay on onnxruntime's CPU provider?

Set-up: the digits CNN (:func:`optuna_ctpe.tasks.digits.digits_task`, seed 0) with the CLI's
default grids (bits 2, 3, 4, 6, 8 and widths 0.5, 0.75, 1, Hessian-pruned as the CLI prunes
them; conv1 and fc2 fixed at 8 bits). Two searches, each ``--seeds`` runs of ``--trials``
trials, as ``optuna-ctpe search`` runs them: :class:`~optuna_ctpe.ClusterTPESampler` with the
space's prior weights and its two ILP warm starts (1/6 and 1/10 of FP32) enqueued, each trial
scored by validation accuracy of the width-pruned, weight-quantized model:

* ``latency-aware`` (``--objective pareto-latency``): accuracy up, latency down (the latency
  lookup table's prediction on onnxruntime CPU, one thread, batch 1,
  :func:`~optuna_ctpe.deploy.latency_table.measure_latency_table`), accounted size down;
* ``size-only`` (``--objective pareto``): accuracy up, accounted size down.

Each search's front is the non-dominated set, in its own objectives, of its runs' Pareto-optimal
trials together. Every configuration of both fronts, with FP32 and uniform 4- and 8-bit, is then
exported by :func:`~optuna_ctpe.deploy.onnx.export_onnx` (the file a user deploys, its real
size) and :func:`~optuna_ctpe.deploy.artifact.save_packed` (the packed safetensors file), and
the exported files are timed as whole models at batch 1 and 32, all of them interleaved
(:func:`~optuna_ctpe.deploy.latency.time_calls`: rounds in which every model runs in turn), so
that load from other processes falls on all of them alike.

``--task minilm`` runs the same comparison on the pretrained all-MiniLM-L6-v2
(:func:`optuna_ctpe.tasks.minilm.minilm_task`, seed 0; metric: embedding fidelity), bits only
(widths fixed at 1, embeddings left in float: the lookup table has no one-layer graph for them),
Hutchinson traces with 20 probes, warm starts at the accounted sizes of uniform 6 and 4 bits
(the CLI's 1/6 and 1/10 of FP32 do not fit), 3 runs x 60 trials per search, timed at batch 1
and 8, each front cut to 8 configurations spread along it
(:func:`~_latency_search_fronts.spread_front`). What differs between the tasks is in
``_latency_search_tasks.py``.

Run ``python benchmarks/latency_search.py [--task minilm]`` from the repository root (the
``deploy`` extra installed, and ``minilm`` for MiniLM; digits: 10 runs x 150 trials per search,
about 2 minutes on 2 cores; MiniLM: about 20 minutes); it writes
``benchmarks/results/latency_search.md`` (``latency_search_minilm.md``), ``.png`` and ``.json``
(the report is ``_latency_search_report.py``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import tempfile
import time
from typing import Any
import warnings

from _latency_search_fronts import pareto_front
from _latency_search_fronts import spread_front
from _latency_search_report import write_report
from _latency_search_tasks import Bench
from _latency_search_tasks import BENCHES
import numpy as np
import optuna
import torch


#: Objective directions of the two searches, as the CLI's ``--objective`` gives them.
SEARCHES = {
    "latency-aware": ("maximize", "minimize", "minimize"),
    "size-only": ("maximize", "minimize"),
}


def _metric_of(space: Any, task: Any) -> Any:
    """``config -> task metric``, cached by configuration (every run shares it)."""
    from optuna_ctpe.nn.apply import WeightCache

    cache, scores = WeightCache(), {}

    def metric(config: Any) -> float:
        key = config.key()
        if key not in scores:
            with space.applied(task.model, config, task.example_inputs, cache=cache) as net:
                scores[key] = float(task.evaluate(net))
        return scores[key]

    return metric


def _warm_starts(space: Any, ratios: tuple[float, ...]) -> list[dict[str, Any]]:
    """The ILP allocations at these size ratios of FP32 (the CLI's without a size budget)."""
    found: list[dict[str, Any]] = []
    for ratio in ratios:
        try:
            found += [c for c in space.warm_starts(size_ratio=ratio, n=1) if c not in found]
        except ValueError:
            continue  # nothing in the pruned space is that small
    return found


def _search(
    name: str, seed: int, n_trials: int, space: Any, metric: Any, table: Any, warm: list[Any]
) -> list[dict[str, Any]]:
    """One run; its trials as ``{"params", "values", "pareto"}`` (Pareto-optimal or not)."""
    from optuna_ctpe import ClusterTPESampler

    sampler = ClusterTPESampler(seed=seed, prior_weights=space.prior_weights())
    study = optuna.create_study(directions=list(SEARCHES[name]), sampler=sampler)
    for params in warm:
        study.enqueue_trial(params)

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        config = space.suggest(trial)
        size_kb = space.size(config) / 8 / 1024
        if name == "latency-aware":
            return metric(config), table.predict(config), size_kb
        return metric(config), size_kb

    study.optimize(objective, n_trials=n_trials)
    best = {t.number for t in study.best_trials}
    return [
        {"params": t.params, "values": list(t.values), "pareto": t.number in best}
        for t in study.trials
    ]


def _export(space: Any, task: Any, entries: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Export every configuration (None: FP32); its ONNX bytes, file and packed sizes."""
    from optuna_ctpe.deploy.artifact import save_packed
    from optuna_ctpe.deploy.latency import float_model_bytes
    from optuna_ctpe.deploy.onnx import export_onnx

    out = {}
    for key, config in entries.items():
        if config is None:
            onnx_bytes = float_model_bytes(task.model, task.example_inputs)
            out[key] = {"onnx": onnx_bytes, "packed_kb": None, "operators": None}
        else:
            path = folder / "model.onnx"
            report = export_onnx(
                space, task.model, config, path, task.example_inputs, verify=False
            )
            packed = save_packed(
                space,
                task.model,
                config,
                folder / "model.safetensors",
                example_inputs=task.example_inputs,
            )
            out[key] = {
                "onnx": path.read_bytes(),
                "packed_kb": packed.file_bytes / 1024,
                # MatMulNBits / DequantizeLinear / float layers: what the runtime executes.
                "operators": report.operators,
            }
        out[key]["file_kb"] = len(out[key]["onnx"]) / 1024
    return out


def _time_all(models: dict[str, bytes], inputs: Any, repeats: int) -> dict[str, Any]:
    """Every model timed in the same rounds (interleaved), on one thread each."""
    from optuna_ctpe.deploy.latency import OrtRuntime
    from optuna_ctpe.deploy.latency import session_feed
    from optuna_ctpe.deploy.latency import time_calls

    runtime = OrtRuntime()
    calls = []
    for onnx_bytes in models.values():
        session = runtime.session(onnx_bytes)
        feed = session_feed(session, inputs)
        calls.append(lambda session=session, feed=feed: session.run(None, feed))
    timings = time_calls(calls, repeats=repeats, rounds=min(20, repeats))
    return dict(zip(models, timings))


def _search_fronts(
    space: Any, runs: dict[str, list[list[dict[str, Any]]]], cap: int | None
) -> dict[str, Any]:
    """Per search: key -> configuration of the non-dominated set, in the search's own
    objectives, of its runs' Pareto-optimal trials together; at most ``cap`` of them, spread
    along the front (:func:`~_latency_search_fronts.spread_front`)."""
    fronts = {}
    for name, directions in SEARCHES.items():
        signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
        pool = {}
        for run in runs[name]:
            for trial in (t for t in run if t["pareto"]):
                config = space.config_from_params(trial["params"])
                pool[repr(config.key())] = (config, signs * np.array(trial["values"]))
        keys = list(pool)
        values = np.array([pool[k][1] for k in keys])
        chosen = pareto_front(values)
        if cap is not None:
            chosen = [chosen[i] for i in spread_front(values[chosen], cap)]
        fronts[name] = {keys[i]: pool[keys[i]][0] for i in chosen}
    return fronts


def _run_searches(
    bench: Bench, args: argparse.Namespace, space: Any, metric: Any, table: Any
) -> tuple[dict[str, list[list[dict[str, Any]]]], dict[str, float]]:
    """Every run of both searches; and each search's seconds per run."""
    warm = _warm_starts(space, bench.warm_ratios(space))
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in SEARCHES}
    search_s = {}
    for name in SEARCHES:
        t0 = time.perf_counter()
        for seed in range(args.seeds):
            runs[name].append(_search(name, seed, args.trials, space, metric, table, warm))
            n_best = sum(t["pareto"] for t in runs[name][-1])
            print(f"{name} seed {seed}: {n_best} Pareto-optimal trials", flush=True)
        search_s[name] = (time.perf_counter() - t0) / args.seeds
    return runs, search_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(BENCHES), default="digits")
    parser.add_argument("--seeds", type=int, default=None, help="runs per search")
    parser.add_argument("--trials", type=int, default=None, help="trials per run")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)
    bench = BENCHES[args.task]
    # The task's defaults where not given: MiniLM's trials cost a second each, digits' 10 ms.
    for option in ("seeds", "trials", "repeats"):
        if getattr(args, option) is None:
            setattr(args, option, getattr(bench, option))
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    start, load_start = time.perf_counter(), os.getloadavg()[0]

    import onnxruntime

    from optuna_ctpe.deploy.latency import batched_inputs
    from optuna_ctpe.deploy.latency_table import measure_latency_table

    task, space = bench.build()
    tables = {
        b: measure_latency_table(space, task.model, task.example_inputs, batch=b)
        for b in bench.batches
    }
    print(f"set-up {time.perf_counter() - start:.0f} s", flush=True)
    metric = _metric_of(space, task)
    runs, search_s = _run_searches(bench, args, space, metric, tables[bench.batches[0]])
    fronts = _search_fronts(space, runs, bench.front_cap)
    baselines = {
        "FP32": None,
        "uniform 8-bit": space.uniform(8),
        "uniform 4-bit": space.uniform(4),
    }
    entries = {**baselines}
    for front in fronts.values():
        entries.update(front)
    print(f"exporting {len(entries)} models ...", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        files = _export(space, task, entries, Path(folder))
    models = {k: f["onnx"] for k, f in files.items()}
    timings = {
        b: _time_all(models, batched_inputs(task.example_inputs, b), args.repeats)
        for b in bench.batches
    }
    # A second pass at the first batch, later: how far the same files move between passes.
    again = _time_all(models, batched_inputs(task.example_inputs, bench.batches[0]), args.repeats)
    points = {}
    for key, config in entries.items():
        points[key] = {
            "label": key if key in baselines else bench.describe(space, config),
            "bits": None if config is None else dict(config.bits),
            "widths": None if config is None else dict(config.widths),
            "accuracy": float(task.evaluate(task.model)) if config is None else metric(config),
            "accounted_kb": (space.fp32_bits if config is None else space.size(config)) / 8192,
            "file_kb": files[key]["file_kb"],
            "packed_kb": files[key]["packed_kb"],
            "operators": files[key]["operators"],
            "b1_again_ms": again[key].median_ms,
            **{
                f"b{b}": {
                    "measured_ms": timings[b][key].median_ms,
                    "noise": timings[b][key].noise,
                    "predicted_ms": (
                        tables[b].fp32_ms if config is None else tables[b].predict(config)
                    ),
                }
                for b in bench.batches
            },
        }
    context = {
        "load": (load_start, os.getloadavg()[0]),
        "search_s": search_s,
        "total_s": time.perf_counter() - start,
        "onnxruntime": onnxruntime.__version__,
    }
    write_report(bench, args, argv, space, tables, runs, fronts, points, list(baselines), context)


if __name__ == "__main__":
    main()
