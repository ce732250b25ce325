"""``optuna-ctpe export``: a study's chosen configuration as JSON, and its model's weights.

The export is two files, ``<study>-trial<N>.json`` and ``<study>-trial<N>.pt``. The JSON holds
the configuration (per-layer bits, per-group widths), the trial's recorded metrics, the task and
the search space, which is what rebuilding the pruned architecture needs. The ``.pt`` file is a
plain state dict of tensors written with :func:`torch.save`; it loads with
``torch.load(path, weights_only=True)``, which unpickles tensors and containers only and so is
safe on files of unknown origin. Its weights hold the quantized values (stored as floats) of the
width-pruned model, so its shapes fit the pruned architecture, not the original one:
:func:`load_exported` rebuilds that architecture and loads the weights into it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import json
import os
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from optuna_ctpe import _attrs
from optuna_ctpe.cli.choose import recommended_trial
from optuna_ctpe.cli.objective import build_model
from optuna_ctpe.cli.options import add_storage_options
from optuna_ctpe.cli.options import add_task_options
from optuna_ctpe.cli.options import nonnegative_int
from optuna_ctpe.cli.options import UsageError
from optuna_ctpe.cli.settings import Settings
from optuna_ctpe.cli.storage import open_storage
from optuna_ctpe.cli.storage import parse_storage
from optuna_ctpe.cli.storage import StorageSpec
from optuna_ctpe.cli.task import load_task
from optuna_ctpe.search_space import HessianSearchSpace
from optuna_ctpe.search_space import QuantConfig
from optuna_ctpe.tasks import Task


__all__ = ["EXPORT_SCHEMA", "ExportResult", "add_parser", "export", "load_exported"]

EXPORT_SCHEMA = "optuna-ctpe/export"


def add_parser(commands: Any) -> None:
    """Add the ``export`` command to the subparsers ``commands``."""
    parser = commands.add_parser(
        "export",
        help="write a trial's configuration (JSON) and quantized model (state dict)",
        description=(
            "Rebuild one trial's width-pruned, quantized model and write "
            "<study>-trial<N>.json (configuration, metrics, search space) and "
            "<study>-trial<N>.pt (its state dict, saved with torch.save; load it with "
            "torch.load(path, weights_only=True), or with optuna_ctpe.cli.load_exported(json))."
        ),
    )
    add_storage_options(parser, study_required=False)
    parser.add_argument(
        "--trial",
        type=nonnegative_int,
        metavar="N",
        help=(
            "trial number to export (default: the most accurate feasible trial for "
            "--objective budget, the most accurate Pareto-optimal trial for pareto)"
        ),
    )
    parser.add_argument(
        "-o", "--output-dir", default=".", metavar="DIR", help="folder for the files (default: .)"
    )
    add_task_options(parser, task=False)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``optuna-ctpe export`` with parsed arguments; return the exit code."""
    spec = parse_storage(args.storage)
    result = export(spec, args.study_name, args.trial, args.output_dir, cache_dir=args.cache_dir)
    recorded = result.trial.user_attrs[_attrs.ACCURACY]
    print(f"trial {result.trial.number}: accuracy {result.accuracy:.4f} (recorded {recorded:.4f})")
    print(f"configuration: {result.config_path}")
    print(f"state dict:    {result.model_path}  (torch.load(path, weights_only=True))")
    return 0


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote, and the accuracy the rebuilt model reaches."""

    config_path: Path
    model_path: Path
    trial: FrozenTrial
    accuracy: float


def _pick_study(storage: optuna.storages.BaseStorage, spec: StorageSpec, name: str | None) -> str:
    names = [s.study_name for s in storage.get_all_studies()]
    if name is None:
        if len(names) == 1:
            return names[0]
        raise UsageError(
            f"--study-name is required: {spec.location} holds {len(names)} studies "
            f"({', '.join(sorted(names)) or 'none'})."
        )
    if name not in names:
        raise UsageError(
            f"--study-name {name!r} does not exist in {spec.location}; studies there: "
            f"{', '.join(sorted(names)) or 'none'}."
        )
    return name


def _pick_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    if number is None:
        trial = recommended_trial(study)
        if trial is None:
            raise UsageError(
                f"study {study.study_name!r} has no completed (feasible) trial to export; pass "
                "--trial N."
            )
        return trial
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise UsageError(
            f"--trial {number} does not exist in study {study.study_name!r}, which has "
            f"trials 0 to {len(trials) - 1}."
        )
    trial = trials[number]
    if trial.state != TrialState.COMPLETE:
        raise UsageError(
            f"--trial {number} is {trial.state.name}, not COMPLETE; only completed trials "
            "have a scored configuration."
        )
    return trial


def _load_study(spec: StorageSpec, study_name: str | None) -> optuna.Study:
    """The ``optuna-ctpe search`` study to export from (never creating a storage file)."""
    local = spec.local_file
    if local is not None and not local.exists():
        # Opening a missing SQLite or journal file would create an empty one: a typo in the path
        # must not leave files behind.
        raise UsageError(f"--storage {spec.location!r}: no such file {str(local)!r}.")
    storage = open_storage(spec, heartbeat=False)
    name = _pick_study(storage, spec, study_name)
    study = optuna.load_study(study_name=name, storage=storage)
    if _attrs.SETTINGS not in study.user_attrs:
        raise UsageError(f"study {name!r} was not created by optuna-ctpe search.")
    return study


def export(
    spec: StorageSpec,
    study_name: str | None,
    trial_number: int | None,
    output_dir: str | os.PathLike[str],
    *,
    cache_dir: str | None = None,
) -> ExportResult:
    """Write the configuration JSON and state dict of one trial of an ``optuna-ctpe`` study.

    Args:
        spec: The storage.
        study_name: The study; may be None when the storage holds exactly one.
        trial_number: The trial; None picks the best feasible trial (budget objective) or the
            most accurate Pareto-optimal trial (Pareto objective).
        output_dir: Folder of the two files (created if missing).
        cache_dir: Weight cache folder of the task, as for ``search``.

    Raises:
        UsageError: If the study or trial does not exist, the trial is not complete, or the study
            was not made by ``optuna-ctpe search``.
    """
    study = _load_study(spec, study_name)
    settings = Settings.from_attr(study.user_attrs[_attrs.SETTINGS])
    trial = _pick_trial(study, trial_number)
    space = HessianSearchSpace.load_from_study(study)  # present once any trial has completed
    task = load_task(settings.task, seed=settings.seed, cache_dir=cache_dir)
    config = space.config_from_params(trial.params)
    net = build_model(space, task, config, settings.finetune_epochs)
    accuracy = float(task.evaluate(net))

    import torch

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{study.study_name}-trial{trial.number}"
    model_path = out / f"{stem}.pt"
    config_path = out / f"{stem}.json"
    torch.save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, model_path)
    document = _document(study.study_name, trial, settings, space, config, accuracy, model_path)
    config_path.write_text(json.dumps(document, indent=2) + "\n")
    return ExportResult(config_path, model_path, trial, accuracy)


def _document(
    study_name: str,
    trial: FrozenTrial,
    settings: Settings,
    space: HessianSearchSpace,
    config: QuantConfig,
    reproduced_accuracy: float,
    model_path: Path,
) -> dict[str, Any]:
    """The export's JSON: what rebuilding the model needs, and the trial's recorded metrics."""
    return {
        "schema": EXPORT_SCHEMA,
        "study": study_name,
        "trial": trial.number,
        "task": settings.task,
        "seed": settings.seed,
        "finetune_epochs": settings.finetune_epochs,
        "params": trial.params,
        "bits": dict(config.bits),
        "widths": dict(config.widths),
        _attrs.ACCURACY: trial.user_attrs[_attrs.ACCURACY],
        "reproduced_accuracy": reproduced_accuracy,
        _attrs.SIZE_BYTES: trial.user_attrs[_attrs.SIZE_BYTES],
        _attrs.COMPRESSION_RATIO: trial.user_attrs[_attrs.COMPRESSION_RATIO],
        "state_dict": model_path.name,  # beside the JSON: the pair moves together
        "load": "optuna_ctpe.cli.load_exported(json_path), or build the pruned architecture and "
        "load_state_dict(torch.load(state_dict, weights_only=True))",
        "search_space": json.loads(space.to_json()),
    }


def load_exported(
    config_path: str | os.PathLike[str],
    *,
    task: Task | None = None,
    cache_dir: str | None = None,
) -> Any:
    """Rebuild an exported model: the pruned architecture with the exported quantized weights.

    The state dict is read with ``torch.load(..., weights_only=True)``.

    Args:
        config_path: The ``.json`` file :func:`export` wrote (the ``.pt`` file must sit beside
            it).
        task: The task, if already built; by default it is rebuilt from the recorded
            ``task`` and ``seed``.
        cache_dir: Weight cache folder for rebuilding the task.

    Returns:
        The ``torch.nn.Module``, in eval mode.
    """
    import torch

    config_path = Path(config_path)
    document = json.loads(config_path.read_text())
    if document.get("schema") != EXPORT_SCHEMA:
        raise ValueError(f"{config_path} is not an optuna-ctpe export (schema {EXPORT_SCHEMA!r}).")
    space = HessianSearchSpace.from_json(document["search_space"])
    if task is None:
        task = load_task(document["task"], seed=document["seed"], cache_dir=cache_dir)
    config = QuantConfig(document["bits"], document["widths"])
    # apply() gives the pruned architecture; its weights are then replaced by the exported ones.
    net = space.apply(task.model, config, task.example_inputs)
    state = torch.load(config_path.with_name(document["state_dict"]), weights_only=True)
    net.load_state_dict(state)
    return net.eval()
