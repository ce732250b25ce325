"""The public surface that users import: names, import paths, signatures and the console script.

A refactor may move code between rooms; it must not move or rename what these tests name.
"""

from __future__ import annotations

import importlib
import inspect

from pathlib import Path

import optuna
import pytest

import optuna_ctpe


ROOT = Path(__file__).resolve().parents[1]

SAMPLER_ARGUMENTS = [
    "seed",
    "n_startup_trials",
    "n_ei_candidates",
    "n_clusters",
    "transform",
    "near_miss_weight",
    "middle_weight",
    "max_good",
    "multivariate",
    "group",
    "constant_liar",
    "prior_weights",
    "prior_weight",
    "avoid_duplicates",
    "record_decisions",
    "warn_independent_sampling",
    "known_constraints",
]

SPACE_PUBLIC = {
    "always_kept",
    "apply",
    "applied",
    "bits",
    "budget",
    "choices",
    "config_from_params",
    "distributions",
    "fixed_bits",
    "format_quantizer",
    "formats",
    "fp32_bits",
    "from_json",
    "from_model",
    "from_sensitivities",
    "groups",
    "keeping",
    "latency_constraint",
    "load_from_study",
    "log10_size_after",
    "log10_size_before",
    "loss_increase",
    "omega",
    "perturbation",
    "prior_weights",
    "prune",
    "relaxed_for_size",
    "save_packed",
    "save_to_study",
    "sensitivities",
    "size",
    "spec",
    "size_constraint",
    "suggest",
    "tensors",
    "tied",
    "ties",
    "to_json",
    "trace_z",
    "to_params",
    "uncertain_layers",
    "uniform",
    "uniform_formats",
    "warm_starts",
    "widths",
    "with_budget",
}


def test_top_level_names() -> None:
    assert optuna_ctpe.__all__ == ["ClusterTPESampler", "HessianSearchSpace", "__version__"]
    assert issubclass(optuna_ctpe.ClusterTPESampler, optuna.samplers.BaseSampler)
    from optuna_ctpe.search_space import HessianSearchSpace

    assert optuna_ctpe.HessianSearchSpace is HessianSearchSpace


def test_sampler_arguments_are_keyword_only_and_unchanged() -> None:
    parameters = inspect.signature(optuna_ctpe.ClusterTPESampler).parameters
    assert list(parameters) == SAMPLER_ARGUMENTS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values())


def test_search_space_face() -> None:
    from optuna_ctpe.search_space import HessianSearchSpace

    assert {n for n in dir(HessianSearchSpace) if not n.startswith("_")} == SPACE_PUBLIC


@pytest.mark.parametrize(
    "name",
    [
        "HessianSearchSpace",
        "QuantConfig",
        "LayerSensitivity",
        "WidthGroupSensitivity",
        "ParamTensor",
        "DEFAULT_BITS",
        "DEFAULT_WIDTHS",
        "DEFAULT_BUDGET",
    ],
)
def test_search_space_module_names(name: str) -> None:
    module = importlib.import_module("optuna_ctpe.search_space")
    assert getattr(module, name) is not None


def test_tasks() -> None:
    from optuna_ctpe.tasks import Task
    from optuna_ctpe.tasks.digits import digits_task

    assert optuna_ctpe.tasks.digits_task is digits_task
    assert {"name", "model", "loss_fn", "evaluate", "example_inputs"} <= set(
        Task.__dataclass_fields__
    )


def test_console_script_points_at_the_cli_main() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"optuna-ctpe": "optuna_ctpe.cli:main"}
    module, _, attr = scripts["optuna-ctpe"].partition(":")
    main = getattr(importlib.import_module(module), attr)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
