"""Our Parzen estimator against Optuna's ``_ParzenEstimator``: time per fit + sample + score.

ClusterTPE owns its Parzen estimator (``optuna_ctpe/sampler/_parzen.py``) since Optuna's is
private and changes with Optuna 6. This measures what one sampling step costs with each: fitting
l(x) and g(x) to the same observations, drawing 24 candidates from l(x) and scoring them under
both, as the sampler does per trial. Spaces: 40 categorical parameters (the quantization problem),
10 floats, and a mix of float, log-float, int, log-int, stepped and categorical parameters. The two
estimators are timed in turn on the same inputs, in one process; the median is reported.

Run::

    python benchmarks/parzen_estimator.py

Writes ``results/parzen_estimator.md``. Needs Optuna 4.9 to 5.x (the reference estimator).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.distributions import FloatDistribution
from optuna.distributions import IntDistribution
from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator
from optuna.samplers._tpe.parzen_estimator import _ParzenEstimatorParameters

from _common import markdown_table
from _common import report_header
from _common import RESULTS_DIR
from optuna_ctpe.sampler import _parzen


SPACES = {
    "40 categorical": {f"p{i}": CategoricalDistribution([2, 3, 4, 5, 6, 7, 8]) for i in range(40)},
    "10 float": {f"x{i}": FloatDistribution(-5.0, 5.0) for i in range(10)},
    "mixed 12": {
        **{f"f{i}": FloatDistribution(-5.0, 5.0) for i in range(2)},
        **{f"l{i}": FloatDistribution(1e-4, 1.0, log=True) for i in range(2)},
        **{f"s{i}": FloatDistribution(0.0, 1.0, step=0.05) for i in range(2)},
        **{f"i{i}": IntDistribution(0, 100) for i in range(2)},
        **{f"k{i}": IntDistribution(1, 1024, log=True) for i in range(2)},
        **{f"c{i}": CategoricalDistribution(["a", "b", "c", "d"]) for i in range(2)},
    },
}
N_CANDIDATES = 24


def observations(space, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` random observations (internal representations) of ``space``."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    rows: dict[str, list[float]] = {name: [] for name in space}
    for _ in range(n):
        trial = study.ask(space)
        for name, dist in space.items():
            rows[name].append(dist.to_internal_repr(trial.params[name]))
        study.tell(trial, 0.0)
    return {name: np.asarray(v, dtype=float) for name, v in rows.items()}


def optuna_parameters() -> _ParzenEstimatorParameters:
    fields = {
        "prior_weight": 0.05,
        "consider_magic_clip": True,
        "consider_endpoints": False,
        "weights": _parzen.default_weights,
        "multivariate": False,
        "consider_prior": True,
        "categorical_distance_func": {},
    }
    return _ParzenEstimatorParameters(
        **{k: v for k, v in fields.items() if k in _ParzenEstimatorParameters._fields}
    )


def step_ours(good, bad, space, rng) -> None:
    l_x = _parzen.fit_parzen_estimator(good, space, 0.05)
    g_x = _parzen.fit_parzen_estimator(bad, space, 0.05)
    candidates = l_x.sample(rng, N_CANDIDATES)
    l_x.log_pdf(candidates) - g_x.log_pdf(candidates)


def step_optuna(good, bad, space, rng, parameters) -> None:
    l_x = _ParzenEstimator(good, space, parameters)
    g_x = _ParzenEstimator(bad, space, parameters)
    candidates = l_x.sample(rng, N_CANDIDATES)
    l_x.log_pdf(candidates) - g_x.log_pdf(candidates)


def main(argv: list[str]) -> None:
    """Time both estimators, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 250, 1000])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    parameters = optuna_parameters()

    rows = []
    for label, space in SPACES.items():
        for n in args.sizes:
            data = observations(space, n, seed=n)
            n_good = min(int(np.ceil(0.1 * n)), 25)
            good = {k: v[:n_good] for k, v in data.items()}
            bad = {k: v[n_good:] for k, v in data.items()}
            times: dict[str, list[float]] = {"ours": [], "optuna": []}
            for repeat in range(args.repeats):
                start = time.perf_counter()
                step_ours(good, bad, space, np.random.RandomState(repeat))
                times["ours"].append(time.perf_counter() - start)
                start = time.perf_counter()
                step_optuna(good, bad, space, np.random.RandomState(repeat), parameters)
                times["optuna"].append(time.perf_counter() - start)
            ours, theirs = (1e3 * float(np.median(times[k])) for k in ("ours", "optuna"))
            rows.append([label, str(n), f"{ours:.2f}", f"{theirs:.2f}", f"{ours / theirs:.2f}"])
            print(" | ".join(rows[-1]), flush=True)

    header = report_header(
        "Parzen estimator: ours vs Optuna's",
        ["benchmarks/parzen_estimator.py", *argv],
        f"{args.repeats} repeats per row (median reported); fit l(x) to min(ceil(0.1 n), 25) "
        f"and g(x) to the other observations, draw {N_CANDIDATES} candidates from l(x), score "
        "them under both.",
    )
    table = markdown_table(
        ["space", "observations n", "ours ms", "Optuna ms", "ratio ours/Optuna"], rows
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "parzen_estimator.md").write_text(header + "\n" + table + "\n")
    print(header + "\n" + table)


if __name__ == "__main__":
    main(sys.argv[1:])
