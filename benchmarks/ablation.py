"""Ablation of ClusterTPESampler's split parameters, one factor at a time from the defaults.

Every variant in :data:`VARIANTS` (a name and the keyword arguments that differ from the
sampler's defaults) runs on each problem for several seeds, together with Optuna's default
TPESampler as the reference. The report ``results/ablation<tag>.md`` has, per problem, the same
metrics as ``search_quality.py`` (median best-so-far at 25/50/100/200 trials, trials to reach
TPE's median 200-trial best, ratio to TPE, p-value against TPE) plus one-sided Mann-Whitney U
tests of the ``default`` variant against each other variant. Raw curves go to
``results/ablation<tag>_<problem>.json`` and plots to ``results/ablation<tag>_<problem>.png``.

Full run (the committed results)::

    python benchmarks/ablation.py

Adding a variant: add an entry to :data:`VARIANTS`, or pass one on the command line::

    python benchmarks/ablation.py --variants default n_clusters=2 \\
        --extra-variants '{"mw=0.25": {"middle_weight": 0.25}}' --tag _exp

TPE's curves are reused from ``search_quality``'s raw files when their seeds and trials match.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from _common import collect
from _common import Config
from _common import load_raw
from _common import plot_convergence
from _common import report_header
from _common import RESULTS_DIR
from _common import run_settings
from _common import save_raw
from _common import summary_tables
from problems import PROBLEMS


# name -> ClusterTPESampler keyword arguments that differ from its defaults (``max_good`` as
# ``[fraction, cap]``, see ``_common.GoodCap``). The issue's ``bad_group="worst"`` is
# ``middle_weight=0`` (the default) and ``bad_group="rest"`` is ``middle_weight=1`` (with the
# default ``near_miss_weight=1``: g(x) from every trial outside the good group).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "n_clusters=2": {"n_clusters": 2},
    "n_clusters=4": {"n_clusters": 4},
    "n_clusters=auto": {"n_clusters": "auto"},
    "transform=log": {"transform": "log"},
    "transform=rank": {"transform": "rank"},
    "middle_weight=0.5": {"middle_weight": 0.5},
    "middle_weight=1 (bad_group=rest)": {"middle_weight": 1.0},
    "near_miss_weight=0": {"near_miss_weight": 0.0},
    "max_good=TPE's min(ceil(0.1n),25)": {"max_good": [0.1, 25]},
    "max_good=None (uncapped)": {"max_good": None},
    "prior_weight=1 (TPE's)": {"prior_weight": 1.0},
}
DEFAULT_PROBLEMS = ["quant40", "mixint_f01", "mixint_f15"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds (0..seeds-1)")
    parser.add_argument("--trials", type=int, default=200, help="trials per run")
    parser.add_argument(
        "--problems", nargs="+", default=DEFAULT_PROBLEMS, choices=list(PROBLEMS), metavar="NAME"
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), help="names from VARIANTS to run"
    )
    parser.add_argument(
        "--extra-variants",
        type=json.loads,
        default={},
        help="JSON object name -> ClusterTPESampler kwargs, added to the variants",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    """Run the ablation and write the report, raw curves and plots."""
    args = parse_args(argv)
    seeds = list(range(args.seeds))
    variants = {name: VARIANTS[name] for name in args.variants} | args.extra_variants
    configs = [Config(name, "ctpe", kwargs) for name, kwargs in variants.items()]
    configs.append(Config("tpe", "tpe"))
    start = time.perf_counter()
    sections = []
    for name in args.problems:
        problem = PROBLEMS[name]
        cached = {
            k: v
            for k, v in load_raw(RESULTS_DIR / f"search_quality_{name}.json").items()
            if v.config.kind == "tpe"
        }
        curves = collect(name, configs, seeds, args.trials, args.workers, cached)
        save_raw(RESULTS_DIR / f"ablation{args.tag}_{name}.json", name, args.trials, curves)
        plot_convergence(
            curves,
            RESULTS_DIR / f"ablation{args.tag}_{name}.png",
            f"ablation on {name}",
            problem.log_scale,
            reference="tpe",
        )
        sections.append(
            f"## {name}\n\n{problem.description}\n\n"
            f"![convergence](ablation{args.tag}_{name}.png)\n\n"
            + summary_tables(
                curves,
                reference="tpe",
                baseline="default" if "default" in curves else None,
            )
        )
    elapsed = time.perf_counter() - start
    header = report_header(
        "Ablation of ClusterTPESampler's split parameters",
        ["benchmarks/ablation.py", *argv],
        run_settings(seeds, args.trials),
    )
    variant_lines = "\n".join(f"  - `{n}`: `{json.dumps(kw)}`" for n, kw in variants.items())
    notes = (
        "- One factor at a time from ClusterTPESampler's defaults. Variants (kwargs that differ "
        f"from the defaults):\n{variant_lines}\n"
        '- `bad_group="worst"` of the issue is `middle_weight=0` (the default), '
        '`bad_group="rest"` is `middle_weight=1`. `max_good` `[f, c]` means '
        "`min(ceil(f n), c)`.\n"
        "- `tpe`: Optuna's TPESampler with its defaults (reference for *trials to reach*).\n"
        f"- Wall time of this invocation: {elapsed / 60:.1f} min on {args.workers} worker "
        "processes (cached runs not included).\n"
        "- *trials to reach*: first trial at which the variant's **median** best-so-far curve is "
        "<= TPE's median best after the last trial; *ratio* = that / TPE's.\n"
        "- p-values: one-sided Mann-Whitney U on the final bests (bold: < 0.05); the second "
        "table tests `default` against each variant in both directions.\n"
    )
    report = header + notes + "\n" + "\n\n".join(sections) + "\n"
    out = RESULTS_DIR / f"ablation{args.tag}.md"
    out.write_text(report)
    print(report)
    print(f"wrote {out} in {elapsed:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
