"""``optuna-ctpe export``: a study's chosen configuration as JSON, and its model's weights.

The export is four files:

* ``<study>-trial<N>.json``: the configuration (per-layer bits, per-group widths), the trial's
  recorded metrics, the task and the search space, which is what rebuilding the pruned
  architecture needs;
* ``<study>-trial<N>.safetensors``: the deployable model, packed
  (:mod:`optuna_ctpe.deploy.artifact`): bit-packed integer weights, per-channel scales and the
  float tensors, with the configuration, search space and metrics in its header. Its payload is
  the trial's accounted size, so the compression the search reports is the file's;
* ``<study>-trial<N>.onnx``: the model as an ONNX graph with integer weights
  (:func:`optuna_ctpe.deploy.onnx.export_onnx`: ``MatMulNBits`` for Linear weights,
  ``DequantizeLinear`` for convolutions) that onnxruntime runs on a CPU;
* ``<study>-trial<N>.pt``: a plain state dict of the same weights as floats, written with
  :func:`torch.save` (as large as the pruned FP32 model), for tools that want one. It loads with
  ``torch.load(path, weights_only=True)``, which unpickles tensors and containers only and so is
  safe on files of unknown origin.

Both weight files hold the width-pruned model, so their shapes fit the pruned architecture, not
the original one: :func:`load_exported` rebuilds that architecture from the JSON or the
``.safetensors`` file and loads the weights into it.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
import json
import os
from pathlib import Path
from typing import Any
from typing import TYPE_CHECKING

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


if TYPE_CHECKING:
    from optuna_ctpe.deploy.artifact import PackedFile
    from optuna_ctpe.deploy.onnx import OnnxExport


__all__ = ["EXPORT_SCHEMA", "ExportResult", "add_parser", "export", "load_exported"]

EXPORT_SCHEMA = "optuna-ctpe/export"


def add_parser(commands: Any) -> None:
    """Add the ``export`` command to the subparsers ``commands``."""
    parser = commands.add_parser(
        "export",
        help="write a trial's configuration (JSON) and quantized model (packed, state dict)",
        description=(
            "Rebuild one trial's width-pruned, quantized model and write "
            "<study>-trial<N>.json (configuration, metrics, search space), "
            "<study>-trial<N>.safetensors (the packed model: bit-packed integer weights and "
            "per-channel scales, as large as the accounted size) and <study>-trial<N>.pt (its "
            "state dict as floats, saved with torch.save; load it with "
            "torch.load(path, weights_only=True)). optuna_ctpe.cli.load_exported(path) loads "
            "the JSON or the .safetensors file."
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
    packed = result.packed
    if result.not_written is not None:
        print(f"packed model:  not written: {result.not_written}")
        print(f"ONNX model:    not written: {result.not_written}")
        return 0
    if packed is None:
        print("packed model:  not written: pip install 'optuna-ctpe[deploy]' (safetensors)")
    else:
        print(f"packed model:  {packed.path}  (optuna_ctpe.cli.load_exported(path))")
        print(
            f"  {_kb(packed.file_bytes)} on disk: {_kb(packed.payload_bytes)} of tensors "
            f"(accounted {_kb(packed.accounted_bytes)}) and a {_kb(packed.header_bytes)} header; "
            f"{packed.compression_ratio:.1f}x smaller than FP32 ({_kb(packed.fp32_bytes)})"
        )
    onnx = result.onnx
    if onnx is None:
        print("ONNX model:    not written: pip install 'optuna-ctpe[deploy]' (onnx, onnxruntime)")
    else:
        print(f"ONNX model:    {onnx.path}  ({_kb(onnx.file_bytes)}; {_operators(onnx)})")
        print(
            f"  onnxruntime matches the PyTorch model to {onnx.max_rel_diff:.1e} of its largest "
            'output; run it with: python -c "import onnxruntime; '
            f"s = onnxruntime.InferenceSession('{onnx.path}'); "
            'print([i.name for i in s.get_inputs()])"'
        )
    return 0


def _operators(onnx: OnnxExport) -> str:
    return ", ".join(f"{n} layers {op}" for op, n in sorted(onnx.operators.items()))


def _kb(n_bytes: float) -> str:
    return f"{n_bytes / 1024:.1f} KB"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote, and the accuracy the rebuilt model reaches."""

    config_path: Path
    model_path: Path
    trial: FrozenTrial
    accuracy: float
    packed: PackedFile | None = None
    onnx: OnnxExport | None = None
    #: Why the packed model or the ONNX model was not written, when the reason is not a
    #: missing extra (a format configuration with a pruned width).
    not_written: str | None = None


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
    """Write the configuration JSON, packed model and state dict of one trial of a study.

    Args:
        spec: The storage.
        study_name: The study; may be None when the storage holds exactly one.
        trial_number: The trial; None picks the best feasible trial (budget objective) or the
            most accurate Pareto-optimal trial (Pareto objective).
        output_dir: Folder of the three files (created if missing).
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
    if space.formats:
        # The weights the search scored: GPTQ's need the calibration batches again.
        space.format_quantizer(task.model, task.calibration_batches, task.loss_fn)
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
    pruned = sorted(g for g, ratio in config.widths.items() if ratio < 1.0)
    if config.formats and pruned:
        # Format files (packed and ONNX) store unpruned models: the JSON and state dict only.
        reason = f"a format configuration is written unpruned; width groups {pruned} are pruned"
        config_path.write_text(json.dumps(document, indent=2) + "\n")
        return ExportResult(config_path, model_path, trial, accuracy, not_written=reason)
    packed = _save_packed(space, task, config, net, out / f"{stem}.safetensors", document)
    if packed is not None:
        document["packed"] = packed.path.name
    onnx = _save_onnx(space, task, config, net, out / f"{stem}.onnx")
    if onnx is not None:
        document["onnx"] = onnx.path.name
    config_path.write_text(json.dumps(document, indent=2) + "\n")
    return ExportResult(config_path, model_path, trial, accuracy, packed, onnx)


def _save_onnx(
    space: HessianSearchSpace, task: Task, config: QuantConfig, net: Any, path: Path
) -> OnnxExport | None:
    """The ONNX model with integer weights, or None without the ``deploy`` extra."""
    try:
        if config.formats:
            from optuna_ctpe.deploy.onnx import export_onnx_formats

            quantizer = space.format_quantizer(task.model)
            return export_onnx_formats(
                task.model, config.formats, quantizer, path, task.example_inputs
            )
        from optuna_ctpe.deploy.onnx import export_onnx

        return export_onnx(
            space, task.model, config, path, task.example_inputs, configured=copy.deepcopy(net)
        )
    except ImportError as e:
        # Only a missing exporter package means "not installed"; anything else is a bug.
        if getattr(e, "name", None) not in {"onnx", "onnxscript", "onnxruntime"}:
            raise
        return None


def _save_packed(
    space: HessianSearchSpace,
    task: Task,
    config: QuantConfig,
    net: Any,
    path: Path,
    document: dict[str, Any],
) -> PackedFile | None:
    """The packed model, or None without the ``deploy`` extra (``safetensors``)."""
    try:
        import safetensors  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "safetensors":
            raise
        return None
    # A format configuration is written by save_packed_formats, from the space's quantizer.
    return space.save_packed(
        task.model,
        config,
        path,
        example_inputs=task.example_inputs,
        # The JSON's fields but the search space, which the packed file holds anyway.
        metadata={k: v for k, v in document.items() if k != "search_space"},
        configured=net,  # the model export scored (fine-tuned, if the study fine-tunes)
    )


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
        # Format studies only: a bit-width export's JSON stays as it was.
        **({"formats": dict(config.formats)} if config.formats else {}),
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

    From the ``.json`` file, the state dict beside it is read with
    ``torch.load(..., weights_only=True)``; from the ``.safetensors`` file, the packed model is
    read with :func:`optuna_ctpe.deploy.artifact.load_packed`. Both give the same model.

    Args:
        config_path: The ``.json`` file ``optuna-ctpe export`` wrote (the ``.pt`` file must sit
            beside it), or the ``.safetensors`` file (on its own).
        task: The task, if already built; by default it is rebuilt from the recorded
            ``task`` and ``seed``.
        cache_dir: Weight cache folder for rebuilding the task.

    Returns:
        The ``torch.nn.Module``, in eval mode.

    Raises:
        ValueError: If the file is not an export of this package, or is damaged.
    """
    import torch

    config_path = Path(config_path)
    if config_path.suffix == ".safetensors":
        return _load_packed_export(config_path, task, cache_dir)
    document = json.loads(config_path.read_text())
    if document.get("schema") != EXPORT_SCHEMA:
        raise ValueError(f"{config_path} is not an optuna-ctpe export (schema {EXPORT_SCHEMA!r}).")
    space = HessianSearchSpace.from_json(document["search_space"])
    if task is None:
        task = load_task(document["task"], seed=document["seed"], cache_dir=cache_dir)
    config = QuantConfig(document["bits"], document["widths"], formats=document.get("formats", {}))
    # The pruned architecture, whose weights are then replaced by the exported ones: apply()'s
    # (prune() for formats, whose quantizer would need the calibration batches for nothing).
    if config.formats:
        net = space.prune(task.model, config, task.example_inputs)
    else:
        net = space.apply(task.model, config, task.example_inputs)
    state = torch.load(config_path.with_name(document["state_dict"]), weights_only=True)
    net.load_state_dict(state)
    return net.eval()


def _load_packed_export(path: Path, task: Task | None, cache_dir: str | None) -> Any:
    """The model of an exported ``.safetensors`` file, on the task's architecture."""
    from optuna_ctpe.deploy.artifact import load_packed
    from optuna_ctpe.deploy.artifact import read_packed_metadata

    recorded = read_packed_metadata(path)["metadata"]
    if recorded.get("schema") != EXPORT_SCHEMA:
        raise ValueError(f"{path} is a packed model but not an optuna-ctpe export.")
    if task is None:
        task = load_task(recorded["task"], seed=recorded["seed"], cache_dir=cache_dir)
    return load_packed(path, task.model, example_inputs=task.example_inputs)
