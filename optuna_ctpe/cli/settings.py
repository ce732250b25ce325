"""A study's settings: what defines its problem, and how command-line options resolve against them.

The settings (task, seed, objective, size budget, grids, pruning, fine-tuning and, for the
latency objectives, the latency budget, source, batch and runtime) are what make two trials
comparable. They are decided once, when the study is created, from the options given and
:data:`~optuna_ctpe.cli.options.DEFAULTS`, and stored as the study's ``ctpe:settings`` user
attribute. A later run adopts them; an explicit option that contradicts them is a usage error.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import fields
from dataclasses import MISSING
from typing import Any

import optuna

from optuna_ctpe import _attrs
from optuna_ctpe.cli.objectives import LATENCY_OBJECTIVES
from optuna_ctpe.cli.objectives import ObjectiveKind
from optuna_ctpe.cli.objectives import objective_kind
from optuna_ctpe.cli.objectives import OBJECTIVES
from optuna_ctpe.cli.options import DEFAULT_LATENCY_BATCH
from optuna_ctpe.cli.options import DEFAULT_LATENCY_RUNTIME
from optuna_ctpe.cli.options import DEFAULT_LATENCY_SOURCE
from optuna_ctpe.cli.options import DEFAULT_SIZE_BUDGET
from optuna_ctpe.cli.options import DEFAULTS
from optuna_ctpe.cli.options import show_grid
from optuna_ctpe.cli.options import UsageError


__all__ = ["Settings", "resolve", "resolve_settings", "stored_settings"]


@dataclass(frozen=True)
class Settings:
    """What defines a study's problem; stored once as ``ctpe:settings``.

    Attributes:
        task: ``module:factory`` of the task.
        seed: Seed of the task (data split, training) and of the sensitivity probes.
        objective: The name of one of :data:`~optuna_ctpe.cli.objectives.OBJECTIVES`:
            ``"pareto"`` (maximise accuracy, minimise size), ``"budget"`` (maximise
            accuracy subject to ``size <= size_budget``), ``"latency-budget"`` (maximise
            accuracy subject to ``latency <= latency_budget_ms``, and to the size budget if
            one is given) or ``"pareto-latency"`` (maximise accuracy, minimise latency and
            size).
        size_budget: Size budget as a fraction of the FP32 size, in (0, 1]; None for none.
        bits: Bit-width grid.
        widths: Width-ratio grid.
        hessian_pruning: Whether choices are pruned by Hessian sensitivity.
        finetune_epochs: Fine-tuning epochs per trial (0: none).
        formats: Weight format names of a format space (``--formats``; ``bits`` is then not
            read), sorted; None for a bit-width space.
        latency_budget_ms: The latency budget of ``"latency-budget"``, in milliseconds; None
            otherwise.
        latency_source: How a trial's latency is had, with a latency objective: ``"table"``
            (the study's per-layer lookup table, measured once at set-up) or ``"measured"``
            (each configuration exported and timed); None otherwise.
        latency_batch: Rows of the input the latency is timed on, with a latency objective;
            None otherwise.
        latency_runtime: Where the latency is timed, with a latency objective:
            ``"onnxruntime"`` (its CPU provider) or ``"torch"`` (torchao's kernels, on CUDA
            when the worker has a GPU, else the CPU; ``"measured"`` source only); None
            otherwise.
        tie_fused: Whether the layers a serving runtime fuses (q/k/v projections, gate and up
            projections: :func:`optuna_ctpe.nn.heads.fused_layer_sets`) share one choice
            (``--tie-fused``).

    The four latency fields and ``formats`` came after 0.1.0: settings stored without them
    read as None, so old studies resume unchanged; a latency study stored before
    ``latency_runtime`` reads as ``"onnxruntime"``, where it was timed. A bit-width study
    (``formats`` None) stores no ``formats`` key, exactly as before; likewise a study without
    ``--tie-fused`` stores no ``tie_fused`` key.
    """

    task: str
    seed: int
    objective: str
    size_budget: float | None
    bits: tuple[int, ...]
    widths: tuple[float, ...]
    hessian_pruning: bool
    finetune_epochs: int
    latency_budget_ms: float | None = None
    latency_source: str | None = None
    latency_batch: int | None = None
    latency_runtime: str | None = None
    formats: tuple[str, ...] | None = None
    tie_fused: bool = False

    @classmethod
    def from_attr(cls, data: Mapping[str, Any]) -> Settings:
        """The settings stored as the ``ctpe:settings`` user attribute (JSON lists as tuples);
        a field added since the study was created takes its default."""
        values = {
            f.name: data[f.name] if f.name in data or f.default is MISSING else f.default
            for f in fields(cls)
        }
        values["bits"] = tuple(values["bits"])
        values["widths"] = tuple(values["widths"])
        if values["formats"] is not None:
            values["formats"] = tuple(values["formats"])
        if objective_kind(values["objective"]).latency and values["latency_runtime"] is None:
            # Latency studies stored before --latency-runtime were all timed on onnxruntime.
            values["latency_runtime"] = DEFAULT_LATENCY_RUNTIME
        return cls(**values)

    def to_attr(self) -> dict[str, Any]:
        """The JSON-ready dict stored as the ``ctpe:settings`` user attribute."""
        data = asdict(self)
        data["bits"], data["widths"] = list(self.bits), list(self.widths)
        if self.formats is None:
            del data["formats"]  # a bit-width study stores what it stored before formats
        else:
            data["formats"] = list(self.formats)
        if not self.tie_fused:
            del data["tie_fused"]  # a study without ties stores what it stored before them
        return data

    @property
    def kind(self) -> ObjectiveKind:
        """The study's objective: its row of :data:`~optuna_ctpe.cli.objectives.OBJECTIVES`."""
        return objective_kind(self.objective)

    @property
    def has_latency(self) -> bool:
        """Whether trials measure latency (a latency objective)."""
        return self.kind.latency

    @property
    def metric_names(self) -> list[str]:
        """The names of the study's objectives, as optuna-dashboard shows them."""
        return list(self.kind.metrics)

    @property
    def directions(self) -> list[str]:
        """The study's directions: accuracy up, and latency and size down for the Pareto
        objectives."""
        return list(self.kind.directions)


#: The settings of the latency objectives only.
_LATENCY_FIELDS = ("latency_budget_ms", "latency_source", "latency_batch", "latency_runtime")
#: The option that sets each setting, as error messages name it.
_OPTION = {
    "task": "--task",
    "seed": "--seed",
    "objective": "--objective",
    "size_budget": "--size-budget",
    "bits": "--bits",
    "widths": "--widths",
    "hessian_pruning": "--no-hessian-pruning",
    "finetune_epochs": "--finetune-epochs",
    "latency_budget_ms": "--latency-budget",
    "latency_source": "--latency-source",
    "latency_batch": "--latency-batch",
    "latency_runtime": "--latency-runtime",
    "formats": "--formats",
    "tie_fused": "--tie-fused",
}


def resolve(
    requested: Mapping[str, Any],
    stored: Mapping[str, Any] | None,
    study_name: str,
    check: Callable[[Settings], None],
) -> Settings:
    """Merge the options given on the command line with a study's stored settings.

    Args:
        requested: Setting name -> the command line's value, None where the option was not given.
        stored: The study's ``ctpe:settings`` attribute, or None for a study yet to be created
            (the options then apply, with :data:`~optuna_ctpe.cli.options.DEFAULTS`).
        study_name: The study, as error messages name it.
        check: Validates the resolved settings against the other options of the command.

    Raises:
        UsageError: If an explicit option contradicts the stored settings, ``--size-budget``
            comes without ``--objective budget``, or ``check`` refuses the settings.
    """
    if stored is None:
        settings = _new_settings(requested)
    else:
        settings = _adopted(requested, stored, study_name)
    check(settings)
    return settings


def _new_settings(requested: Mapping[str, Any]) -> Settings:
    values = {k: (DEFAULTS[k] if v is None else v) for k, v in requested.items()}
    kind = objective_kind(values["objective"])
    if values["formats"] is not None:
        _check_formats(requested, kind)
    if kind.size_budget == "default" and values["size_budget"] is None:
        values["size_budget"] = DEFAULT_SIZE_BUDGET
    if kind.size_budget == "none" and values["size_budget"] is not None:
        bounded = " or ".join(n for n, k in OBJECTIVES.items() if k.size_budget == "default")
        raise UsageError(f"--size-budget applies to --objective {bounded} only.")
    if not kind.latency:
        given = [_OPTION[k] for k in _LATENCY_FIELDS if values.get(k) is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UsageError(
                f"{', '.join(given)} {verb} to --objective {' or '.join(LATENCY_OBJECTIVES)} only."
            )
        return Settings(**values)
    if kind.latency_budget and values["latency_budget_ms"] is None:
        raise UsageError(f"--objective {kind.name} needs --latency-budget MS.")
    if not kind.latency_budget and values["latency_budget_ms"] is not None:
        bounded = " or ".join(n for n, k in OBJECTIVES.items() if k.latency_budget)
        raise UsageError(f"--latency-budget applies to --objective {bounded} only.")
    if values["latency_runtime"] is None:
        values["latency_runtime"] = DEFAULT_LATENCY_RUNTIME
    if values["latency_runtime"] == "torch":
        # The lookup table's one-layer graphs are onnxruntime's: torch times whole models.
        if values["latency_source"] == "table":
            raise UsageError(
                "--latency-runtime torch supports --latency-source measured only: the latency "
                "table is measured on onnxruntime."
            )
        values["latency_source"] = "measured"
    if values["latency_source"] is None:
        values["latency_source"] = DEFAULT_LATENCY_SOURCE
    if values["latency_batch"] is None:
        values["latency_batch"] = DEFAULT_LATENCY_BATCH
    return Settings(**values)


def _check_formats(requested: Mapping[str, Any], kind: ObjectiveKind) -> None:
    """Refuse ``--formats`` with what cannot handle formats yet, rather than ignore it."""
    if requested.get("bits") is not None:
        raise UsageError(
            "--bits and --formats exclude each other: a format space searches formats "
            "(give bit-widths as formats, e.g. int4-pc-sym-rtn)."
        )
    if kind.latency:
        raise UsageError(
            f"--formats does not apply to --objective {kind.name}: the latency objectives "
            "time bit-width configurations only."
        )
    if requested.get("finetune_epochs"):
        raise UsageError(
            "--formats does not apply with --finetune-epochs: quantization-aware "
            "fine-tuning trains bit-width configurations only."
        )


def _adopted(requested: Mapping[str, Any], stored: Mapping[str, Any], study_name: str) -> Settings:
    settings = Settings.from_attr(stored)
    for key, value in requested.items():
        have = getattr(settings, key)
        if value is None or value == have:
            continue
        option = _OPTION[key]
        # --no-hessian-pruning and --tie-fused are flags: they have no value to show.
        flag = key in ("hessian_pruning", "tie_fused")
        given = option if flag else f"{option} {show_grid(value)}"
        if key == "hessian_pruning":
            created = "Hessian pruning"
        elif key == "tie_fused":
            created = f"no {option}"
        elif have is None:  # a latency setting of a study without a latency objective
            created = f"no {option}"
        else:
            created = f"{option} {show_grid(have)}"
        raise UsageError(
            f"{given} conflicts with study {study_name!r}, which was created with {created}; "
            "leave the option out to continue the study, or use another --study-name."
        )
    return settings


def stored_settings(
    storage: optuna.storages.BaseStorage, study_name: str
) -> dict[str, Any] | None:
    """The ``ctpe:settings`` attribute of a study; None if the study or the attribute is absent.

    Reads the storage, writes nothing (no study is created).
    """
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return None
    return storage.get_study_user_attrs(study_id).get(_attrs.SETTINGS)


def resolve_settings(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    requested: Mapping[str, Any],
    check: Callable[[Settings], None],
) -> Settings:
    """The settings a search with these options runs under: the existing study's, or the
    options' (with defaults) for a new study. Reads the storage, writes nothing.

    The arguments are those of :func:`resolve`, with the study's storage in place of its
    stored settings.
    """
    return resolve(requested, stored_settings(storage, study_name), study_name, check)
