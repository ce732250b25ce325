"""Write ClusterTPESampler's OptunaHub package: ``python -m optuna_ctpe.optunahub OUT_DIR``.

The command writes ``OUT_DIR/samplers/cluster_tpe/`` in the layout of the OptunaHub registry
(``optuna/optunahub-registry``, under ``package/``): ``README.md`` with the front matter its CI
checks (``author``, ``title``, ``description`` and ``license`` strings, ``tags`` and
``optuna_versions`` lists of strings, ``license: MIT License``, a ``sampler`` tag) and the
sections its template asks for, ``__init__.py``, ``LICENSE``, ``example.py`` and
``requirements.txt``. ``samplers/ctpe`` is taken in the registry by c-TPE (constrained TPE), hence
``cluster_tpe``.

The package is a thin entry point over the installed ``optuna-ctpe`` (named in
``requirements.txt``, which the registry publishes) rather than a vendored copy: OptunaHub
imports ``__init__.py`` by file path, so a copy would need its imports rewritten, and it would
drift from the sampler, its tests and its Optuna 4.x / 5.x shims. The files are written from the
templates below at release time; no copy is kept in the repository.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import importlib.metadata
from pathlib import Path

from optuna_ctpe import __version__


NAME = "cluster_tpe"
#: The package's path in the registry, as ``optunahub.load_module`` takes it.
PACKAGE = f"samplers/{NAME}"
#: The Optuna versions whose sampler suites pass in CI (``.ci/run``).
OPTUNA_VERSIONS = ("4.9.0", "5.0.0")
_DISTRIBUTION = "optuna-ctpe"

_README = """\
---
author: optuna-ctpe developers
title: ClusterTPE, a Tree-structured Parzen Estimator with a k-means dual-threshold split
description: TPE whose good and bad groups come from k-means clustering of the results.
tags: [sampler, tpe, clustering, k-means, quantization, mixed-precision]
optuna_versions: [{versions}]
license: MIT License
---

## Abstract

Optuna's TPE fits a density l(x) to the best `min(ceil(0.1 n), 25)` trials and g(x) to all
others. `ClusterTPESampler` replaces that fixed quantile by a *dual threshold* found by 1-D
k-means on the objective values: l(x) is fitted to the best cluster (capped in size), g(x) to the
worst cluster plus the best cluster's members beyond the cap, and the clusters in between are
left out. Everything else behaves as Optuna's TPE: start-up trials, multivariate and
group-decomposed kernels, constant liar for parallel workers, pruned trials, constraints and
multi-objective studies. Optional prior weights over categorical choices (for example from a
Hessian sensitivity analysis of a neural network's layers) steer the start-up trials and l(x).

The method follows arXiv:2308.06422 (Azizi et al., DATE 2024), of which only the abstract is
public; which choices are ours is documented in the sampler's docstring and in the
[optuna-ctpe README](https://pypi.org/project/optuna-ctpe/).

## Class or Function Names

- ClusterTPESampler

Every argument is keyword-only; the most used are `seed`, `n_startup_trials`, `n_clusters`
(an integer >= 2 or `"auto"`), `prior_weights` and `constant_liar`. See
`help(ClusterTPESampler)` for all of them.

## Installation

This package is an entry point over `optuna-ctpe` (numpy, scipy, scikit-learn and Optuna; no
torch), which its requirements install:

```shell
$ pip install -r https://hub.optuna.org/{package}/requirements.txt
```

## Example

```python
{example}```

## Others

The PyTorch side of optuna-ctpe (Hessian sensitivities, a search space of per-layer bit-widths
and widths, fake quantization) is installed with `pip install "optuna-ctpe[torch]"`.

### Reference

Azizi et al. Sensitivity-Aware Mixed-Precision Quantization and Width Optimization of Deep
Neural Networks Through Cluster-Based Tree-Structured Parzen Estimation. DATE 2024.
arXiv:2308.06422.
"""

_INIT = '''\
"""ClusterTPESampler on OptunaHub: an entry point over the installed optuna-ctpe package."""

from __future__ import annotations


try:
    from optuna_ctpe import ClusterTPESampler
except ModuleNotFoundError as error:  # pragma: no cover - depends on the user's environment
    raise ImportError(
        "samplers/{name} needs the optuna-ctpe package: "
        "pip install -r https://hub.optuna.org/{package}/requirements.txt"
    ) from error


__all__ = ["ClusterTPESampler"]
'''

_EXAMPLE = """\
import optuna
import optunahub


ClusterTPESampler = optunahub.load_module("{package}").ClusterTPESampler


def objective(trial: optuna.Trial) -> float:
    width = trial.suggest_int("width", 8, 256, log=True)
    bits = trial.suggest_categorical("bits", [2, 4, 8])
    dropout = trial.suggest_float("dropout", 0.0, 0.5)
    return (dropout - 0.2) ** 2 + 1.0 / width + 4.0**-bits


# prior_weights (optional) lean the start-up trials and l(x) towards preferred choices.
sampler = ClusterTPESampler(seed=0, prior_weights={{"bits": [0.2, 0.3, 0.5]}})
study = optuna.create_study(sampler=sampler)
study.optimize(objective, n_trials=30)
print(study.best_params)
"""


_REQUIREMENTS = "{distribution}>={version}\n"


def package_files() -> dict[str, str]:
    """The package's files: name -> text."""
    example = _EXAMPLE.format(package=PACKAGE)
    versions = ", ".join(f"'{v}'" for v in OPTUNA_VERSIONS)
    return {
        "README.md": _README.format(versions=versions, package=PACKAGE, example=example),
        "__init__.py": _INIT.format(name=NAME, package=PACKAGE),
        "example.py": example,
        "requirements.txt": _REQUIREMENTS.format(distribution=_DISTRIBUTION, version=__version__),
        "LICENSE": _license_text(),
    }


def _license_text() -> str:
    """optuna-ctpe's LICENSE, from the installed distribution or else the source checkout."""
    try:
        distribution = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    if distribution is not None:
        # setuptools writes it under licenses/ (PEP 639); older backends at the top.
        for name in ("licenses/LICENSE", "LICENSE"):
            text = distribution.read_text(name)
            if text:
                return text
    checkout = Path(__file__).resolve().parents[1] / "LICENSE"
    if checkout.is_file():
        return checkout.read_text()
    raise FileNotFoundError(
        "optuna-ctpe's LICENSE is neither in its installed metadata nor next to the package; "
        "install optuna-ctpe or run from a source checkout."
    )


def write_package(out_dir: str | Path) -> Path:
    """Write the package under ``out_dir/samplers/cluster_tpe`` and return that folder.

    Args:
        out_dir: The registry root (``package/`` in optunahub-registry). Created if missing;
            files already there are overwritten.
    """
    folder = Path(out_dir) / PACKAGE
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in package_files().items():
        (folder / name).write_text(text)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the package under the registry root given as the only argument."""
    parser = argparse.ArgumentParser(
        prog="python -m optuna_ctpe.optunahub",
        description=f"Write the OptunaHub package {PACKAGE} of ClusterTPESampler.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="registry root to write into")
    folder = write_package(parser.parse_args(argv).out_dir)
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
