"""Benchmark problems for the sampler benchmarks: a synthetic mixed-precision quantization search
and two mixed-integer functions of COCO's ``bbob-mixint`` suite.

Every problem is an :class:`Problem`: a name, a short description and an Optuna objective that
returns a value to *minimise*. Each objective is deterministic, so a run is reproducible from the
sampler seed alone.

Quantization problem (``quant40``)
----------------------------------

Per-layer bit widths for a 40-layer network, each ``trial.suggest_categorical(f"bits_{i}",
[2, 3, 4, 5, 6, 7, 8])``. The model is a second-order (Hessian) estimate of the loss increase
caused by quantization noise, as used by HAWQ-style mixed-precision methods, plus a model size
penalty. Each term and why it is there:

* **Layer sizes** ``n_i`` (parameter counts) are log-uniform between 1e4 and 2.5e6, with a small
  stem (first layer) and a small classifier (last layer), as in CNNs and transformers: the size
  penalty is dominated by a few large layers.
* **Sensitivities** ``s_i`` are lognormal (sigma 1.5), i.e. heavy tailed: most layers tolerate
  low precision and a few are very sensitive. The stem and the classifier are additionally
  ten times more sensitive, as is commonly observed (they are usually kept at 8 bits). ``s_i``
  stands for ``trace(H_i) * ||W_i||^2``-like quantities and is drawn independently of ``n_i``.
* **Quantization noise** of a uniform ``b``-bit quantizer has power proportional to the squared
  step, ``2^(-2b) = 4^(-b)``, so layer ``i`` contributes ``e_i = s_i * 4^(-b_i)`` to the
  second-order loss estimate (diagonal Hessian blocks).
* **Neighbour interactions**: the off-diagonal Hessian blocks between consecutive layers make
  errors compound: noise injected by layer ``i`` is propagated and amplified by a noisy layer
  ``i+1``. By Cauchy-Schwarz the cross term is bounded by ``sqrt(e_i e_{i+1})``; we add
  ``2 rho_i sqrt(e_i e_{i+1})`` with fixed correlations ``rho_i ~ U(0, 0.5)``. The combined
  perturbation is ``E = sum_i e_i + sum_i 2 rho_i sqrt(e_i e_{i+1})``, so lowering the bits of
  two neighbouring layers costs more than the sum of lowering each alone.
* **Accuracy loss** is ``log(1 + E / tau)``: linear (second order) for small perturbations and
  saturating for large ones, because accuracy cannot drop below chance. ``tau`` is set so that
  uniform 4-bit quantization gives ``E = tau`` (a clearly visible but not catastrophic loss,
  ``log 2``), which is the regime where mixed precision matters in practice.
* **Size penalty** ``lambda * sum_i b_i n_i / (8 sum_i n_i)``: the model size relative to the
  all-8-bit model (between 0.25 and 1). ``lambda = 1`` trades one unit of log-loss for the whole
  8-bit model size. With it the best uniform precision is 6 bits (objective 0.81), while the
  best mixed assignment found by coordinate descent (0.480) uses 3.2 bits per parameter on
  average: low bits for the large insensitive layers, 7-8 bits for the stem, the classifier and
  the other very sensitive layers. 1000 random configurations give a median of 1.29 and a
  minimum of 0.69.

The instance (sizes, sensitivities, correlations) is drawn once from its own seed
(``QUANT_INSTANCE_SEED``) and frozen; the constants were fixed from the reasoning above before
any sampler was run on the problem and must not be tuned to favour a sampler. ``quant40_alt``
is the same design drawn from another seed (``QUANT_ALT_INSTANCE_SEED``), a held-out instance
for checking that sampler settings chosen on ``quant40`` generalise.

bbob-mixint problems (``mixint_f01``, ``mixint_f15``)
-----------------------------------------------------

The 10-dimensional, instance-1 sphere (f1, separable unimodal) and rotated Rastrigin (f15,
multimodal) functions of COCO's ``bbob-mixint`` suite (``coco-experiment``, import name
``cocoex``). Their first ``number_of_integer_variables`` (8) variables are integers, mapped to
``trial.suggest_int`` over the problem's bounds (cardinalities 2, 4, 8 and 16); the other two are
continuous in [-5, 5] and mapped to ``trial.suggest_float``. The objective is the regret
``f(x) - f_opt``, where ``f_opt`` is ``f`` at the problem's own optimal solution (a grid point),
so values are >= 0 and a log scale is meaningful.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import functools
import os
import tempfile

import numpy as np
import optuna


QUANT_N_LAYERS = 40
QUANT_BITS = [2, 3, 4, 5, 6, 7, 8]
QUANT_INSTANCE_SEED = 20240806
# A second instance of the same design, not used to choose the sampler's defaults: a check that
# what is tuned on ``quant40`` carries over to another draw of sizes and sensitivities.
QUANT_ALT_INSTANCE_SEED = 1
QUANT_SIZE_WEIGHT = 1.0  # lambda


@dataclass(frozen=True)
class Problem:
    """A benchmark problem: an Optuna objective to minimise.

    Attributes:
        name: Short identifier used on the command line and in file names.
        description: One-line description for reports.
        objective: The Optuna objective function.
        log_scale: Whether convergence plots should use a logarithmic y axis.
    """

    name: str
    description: str
    objective: Callable[[optuna.Trial], float]
    log_scale: bool


@dataclass(frozen=True)
class QuantizationInstance:
    """The frozen data of the synthetic quantization problem (see the module docstring)."""

    params: np.ndarray  # parameter count per layer
    sensitivity: np.ndarray  # s_i
    rho: np.ndarray  # correlation between layer i and i+1, length n_layers - 1
    tau: float  # perturbation scale of the accuracy loss
    size_weight: float  # lambda

    def perturbation(self, bits: np.ndarray) -> float:
        """Return the second-order loss perturbation ``E`` for per-layer bit widths."""
        return _perturbation(self.sensitivity, self.rho, bits)

    def evaluate(self, bits: np.ndarray) -> float:
        """Return ``log(1 + E / tau) + lambda * size`` for an array of per-layer bit widths."""
        size = np.sum(bits * self.params) / (8.0 * self.params.sum())
        return float(np.log1p(self.perturbation(bits) / self.tau) + self.size_weight * size)


def _perturbation(sensitivity: np.ndarray, rho: np.ndarray, bits: np.ndarray) -> float:
    """``E = sum_i e_i + sum_i 2 rho_i sqrt(e_i e_{i+1})`` with ``e_i = s_i 4^(-b_i)``."""
    err = sensitivity * 4.0 ** (-bits)
    return float(err.sum() + np.sum(2.0 * rho * np.sqrt(err[:-1] * err[1:])))


def make_quantization_instance(
    n_layers: int = QUANT_N_LAYERS, seed: int = QUANT_INSTANCE_SEED
) -> QuantizationInstance:
    """Draw the frozen instance of the quantization problem from its own seed."""
    rng = np.random.default_rng(seed)
    params = np.exp(rng.uniform(np.log(1e4), np.log(2.5e6), n_layers))
    params[0] = 1e4  # stem
    params[-1] = 5e4  # classifier
    sensitivity = rng.lognormal(mean=0.0, sigma=1.5, size=n_layers)
    sensitivity[[0, -1]] *= 10.0
    rho = rng.uniform(0.0, 0.5, n_layers - 1)
    tau = _perturbation(sensitivity, rho, np.full(n_layers, 4.0))  # uniform 4 bits: E = tau
    return QuantizationInstance(params, sensitivity, rho, tau=tau, size_weight=QUANT_SIZE_WEIGHT)


@functools.cache
def _quantization_instance(seed: int) -> QuantizationInstance:
    """The instance drawn from ``seed``, drawn once per process."""
    return make_quantization_instance(seed=seed)


def make_quantization_objective(seed: int) -> Callable[[optuna.Trial], float]:
    """Return the Optuna objective of the quantization instance drawn from ``seed``."""

    def objective(trial: optuna.Trial) -> float:
        bits = np.array(
            [trial.suggest_categorical(f"bits_{i}", QUANT_BITS) for i in range(QUANT_N_LAYERS)],
            dtype=float,
        )
        return _quantization_instance(seed).evaluate(bits)

    return objective


@functools.cache
def _mixint_problem(function: int, dimension: int) -> tuple[object, float]:
    """Return a ``bbob-mixint`` instance-1 problem and its optimal value ``f_opt``."""
    import cocoex

    suite = cocoex.Suite("bbob-mixint", "", f"dimensions:{dimension} instance_indices:1")
    problem = suite.get_problem_by_function_dimension_instance(function, dimension, 1)
    # cocoex only exposes the optimal solution by writing it to a file in the working directory.
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            problem._best_parameter("print")
            x_opt = np.loadtxt("._bbob_problem_best_parameter.txt")
        finally:
            os.chdir(cwd)
    return problem, float(problem(x_opt))


def make_mixint_objective(function: int, dimension: int = 10) -> Callable[[optuna.Trial], float]:
    """Return the Optuna objective ``f(x) - f_opt`` of a ``bbob-mixint`` function."""

    def objective(trial: optuna.Trial) -> float:
        problem, f_opt = _mixint_problem(function, dimension)
        lower, upper = problem.lower_bounds, problem.upper_bounds
        n_int = problem.number_of_integer_variables
        x = np.array(
            [
                trial.suggest_int(f"x{i}", int(lower[i]), int(upper[i]))
                if i < n_int
                else trial.suggest_float(f"x{i}", float(lower[i]), float(upper[i]))
                for i in range(problem.dimension)
            ],
            dtype=float,
        )
        return float(problem(x)) - f_opt

    return objective


PROBLEMS: dict[str, Problem] = {
    "quant40": Problem(
        "quant40",
        "synthetic 40-layer mixed-precision quantization, bits 2..8 categorical "
        "(best known value 0.4797, by coordinate descent; best uniform precision 0.8106)",
        make_quantization_objective(QUANT_INSTANCE_SEED),
        log_scale=False,
    ),
    "quant40_alt": Problem(
        "quant40_alt",
        f"held-out instance of quant40's design (instance seed {QUANT_ALT_INSTANCE_SEED}; best "
        "known value 0.6142, by coordinate descent; best uniform precision 0.8106)",
        make_quantization_objective(QUANT_ALT_INSTANCE_SEED),
        log_scale=False,
    ),
    "mixint_f01": Problem(
        "mixint_f01",
        "bbob-mixint f1 sphere, d=10 (8 integer + 2 continuous), instance 1, regret",
        make_mixint_objective(1),
        log_scale=True,
    ),
    "mixint_f15": Problem(
        "mixint_f15",
        "bbob-mixint f15 rotated Rastrigin, d=10 (8 integer + 2 continuous), instance 1, regret",
        make_mixint_objective(15),
        log_scale=True,
    ),
}
