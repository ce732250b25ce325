"""Search quality: ClusterTPESampler vs Optuna's TPESampler (defaults) vs RandomSampler.

Runs every sampler on every problem of :mod:`problems` for several seeds (sampler seed = run
seed) on two worker processes, then writes

* ``results/search_quality<tag>_<problem>.json``: raw best-so-far curves per sampler and seed,
* ``results/search_quality<tag>_<problem>.png``: median best-so-far with interquartile bands,
* ``results/search_quality<tag>.md``: per problem, the median best-so-far at 25/50/100/200
  trials, the trials each sampler's median curve needs to reach TPE's median 200-trial best and
  the ratio to TPE's, and one-sided Mann-Whitney U p-values of ClusterTPESampler's final bests
  against TPE's and Random's.

Full run (the committed results)::

    python benchmarks/search_quality.py

Quick experiment with a modified split, TPE and Random reused from the committed raw files::

    python benchmarks/search_quality.py --problems quant40 --ctpe-kwargs '{"n_clusters": 2}' \\
        --tag _exp

Held-out seeds (the defaults were chosen on seeds 0-19)::

    python benchmarks/search_quality.py --seed-offset 1000 --tag _heldout

TPE and Random curves are reused from an existing raw file of the same tag (or, failing that,
of the untagged run) when their settings and seeds match; ClusterTPESampler always runs again
because its code is what is being changed. ``--no-cache`` reruns everything.
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import collect
from _common import Config
from _common import Curves
from _common import fmt
from _common import mann_whitney
from _common import median_curve
from _common import load_raw
from _common import parse_json_kwargs
from _common import plot_convergence
from _common import report_header
from _common import RESULTS_DIR
from _common import run_settings
from _common import SAMPLER_KINDS
from _common import save_raw
from _common import summary_tables
from _common import trials_to_reach
from problems import PROBLEMS


BASELINE_KINDS = ("tpe", "random")
# The acceptance criteria. "faster": ClusterTPESampler's median curve reaches TPE's median
# final best in at most half of TPE's trials and its final bests are better (one-sided p < 0.05).
# "not worse": its final bests are not significantly worse (one-sided p >= 0.05).
# quant40_alt (held out, same design) is checked against quant40's criterion for information.
ACCEPTANCE = {
    "quant40": "faster",
    "quant40_alt": "faster",
    "mixint_f01": "not worse",
    "mixint_f15": "not worse",
}


def acceptance(name: str, curves: dict[str, Curves]) -> str:
    """One markdown line: whether ClusterTPESampler meets the issue's criterion on ``name``."""
    ctpe, tpe = curves["ctpe"].curves, curves["tpe"].curves
    if ACCEPTANCE[name] == "faster":
        target = float(median_curve(tpe)[-1])
        ctpe_trials, tpe_trials = trials_to_reach(ctpe, target), trials_to_reach(tpe, target)
        p = mann_whitney(ctpe[:, -1], tpe[:, -1], "less")
        met = ctpe_trials is not None and ctpe_trials <= 0.5 * tpe_trials and p < 0.05
        detail = (
            f"trials to reach TPE's median final best {fmt(ctpe_trials)} vs TPE {tpe_trials} "
            f"(needs <= {0.5 * tpe_trials:g}); p (ctpe better) = {p:.3g} (needs < 0.05)"
        )
    else:
        p = mann_whitney(ctpe[:, -1], tpe[:, -1], "greater")
        met = p >= 0.05
        detail = f"p (ctpe worse) = {p:.3g} (needs >= 0.05)"
    verdict = "met" if met else "NOT met"
    return f"Acceptance on {name} ({ACCEPTANCE[name]}): **{verdict}**; {detail}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="number of seeds")
    parser.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="first seed; e.g. 1000 for held-out seeds the defaults were not chosen on",
    )
    parser.add_argument("--trials", type=int, default=200, help="trials per run")
    parser.add_argument(
        "--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS), metavar="NAME"
    )
    parser.add_argument(
        "--samplers", nargs="+", default=list(SAMPLER_KINDS), choices=list(SAMPLER_KINDS)
    )
    parser.add_argument(
        "--ctpe-kwargs",
        type=parse_json_kwargs,
        default={},
        help="JSON keyword arguments of ClusterTPESampler, e.g. '{\"n_clusters\": 2}'",
    )
    parser.add_argument(
        "--tpe-kwargs",
        type=parse_json_kwargs,
        default={},
        help="JSON keyword arguments of TPESampler (default: none, Optuna's defaults), e.g. a "
        "tuned-TPE control '{\"prior_weight\": 0.05}'",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the output file names, e.g. _exp")
    parser.add_argument("--no-cache", action="store_true", help="rerun TPE and Random too")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    """Run the benchmark and write the report, raw curves and plots."""
    args = parse_args(argv)
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    kwargs = {"ctpe": args.ctpe_kwargs, "tpe": args.tpe_kwargs, "random": {}}
    configs = [Config(kind, kind, kwargs[kind]) for kind in args.samplers]
    start = time.perf_counter()
    sections = []
    verdicts = []
    for name in args.problems:
        problem = PROBLEMS[name]
        raw_path = RESULTS_DIR / f"search_quality{args.tag}_{name}.json"
        cached = {}
        if not args.no_cache:
            cached = load_raw(RESULTS_DIR / f"search_quality_{name}.json") | load_raw(raw_path)
            cached = {k: v for k, v in cached.items() if v.config.kind in BASELINE_KINDS}
        curves = collect(name, configs, seeds, args.trials, args.workers, cached)
        save_raw(raw_path, name, args.trials, curves)
        plot_convergence(
            curves,
            RESULTS_DIR / f"search_quality{args.tag}_{name}.png",
            f"search quality on {name}",
            problem.log_scale,
            reference="tpe",
        )
        if "ctpe" in curves and "tpe" in curves and name in ACCEPTANCE:
            verdicts.append(f"- {acceptance(name, curves)}")
        sections.append(
            f"## {name}\n\n{problem.description}\n\n"
            f"![convergence](search_quality{args.tag}_{name}.png)\n\n"
            + summary_tables(
                curves,
                reference="tpe" if "tpe" in curves else None,
                baseline="ctpe" if "ctpe" in curves else None,
            )
        )
    elapsed = time.perf_counter() - start
    header = report_header(
        "Search quality: ClusterTPESampler vs TPESampler vs RandomSampler",
        ["benchmarks/search_quality.py", *argv],
        run_settings(seeds, args.trials),
    )
    notes = (
        f"- ClusterTPESampler kwargs: `{args.ctpe_kwargs or 'defaults'}`; TPESampler kwargs: "
        f"`{args.tpe_kwargs or 'defaults'}`; RandomSampler with its defaults (`seed` is set "
        "for all).\n"
        f"- Wall time of this invocation: {elapsed / 60:.1f} min on {args.workers} worker "
        "processes (cached runs not included). `s / run` is the mean time of one run.\n"
        "- *trials to reach*: first trial at which the sampler's **median** best-so-far curve "
        "(over seeds) is <= TPE's median best after the last trial; *ratio* = that / TPE's.\n"
        "- p-values: one-sided Mann-Whitney U on the final bests (bold: < 0.05).\n"
    )
    summary = "\n".join(verdicts) + "\n\n" if verdicts else ""
    report = header + notes + "\n" + summary + "\n\n".join(sections) + "\n"
    out = RESULTS_DIR / f"search_quality{args.tag}.md"
    out.write_text(report)
    print(report)
    print(f"wrote {out} in {elapsed:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
