"""The study of ``optuna-ctpe search``: its settings, its one-time set-up and its attributes.

A study is created by one worker (the *creator*) and joined by any number of others, at the
same time (distributed workers) or later (a resumed run). Everything that defines the problem
is decided once and stored in the study's user attributes, where later workers and
optuna-dashboard read it:

* ``ctpe:settings``: task, seed, objective, size budget, grids, pruning and fine-tuning, i.e.
  what makes two trials comparable. A joining worker adopts them; an explicit option that
  contradicts them is a usage error.
* ``ctpe:search_space`` (+ chunks): the pruned :class:`~optuna_ctpe.HessianSearchSpace` as JSON.
* ``ctpe:sensitivities``: per-layer Hessian trace data, readable in the dashboard.
* ``ctpe:baselines``: accuracy and size of the FP32 model and of uniform 8-bit quantization.
* ``ctpe:setup``: the worker that measures the sensitivities, so that others wait for it
  instead of measuring again, and take over if it died.
* ``ctpe:search_space_size``: log10 of the number of configurations before and after pruning.

Trials enqueued as warm starts carry the user attribute ``ctpe:warm_start``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import fields
import importlib
import inspect
import math
import os
import time
from typing import Any
import warnings

import optuna

from optuna_ctpe._cli_storage import UsageError
from optuna_ctpe._cli_storage import owner_is_dead
from optuna_ctpe._cli_storage import worker_id
from optuna_ctpe.search_space import HessianSearchSpace
from optuna_ctpe.search_space import USER_ATTR_KEY as SPACE_ATTR
from optuna_ctpe.tasks import Task


__all__ = [
    "BASELINES_ATTR",
    "DEFAULT_TASK",
    "SENSITIVITIES_ATTR",
    "SETTINGS_ATTR",
    "SETUP_ATTR",
    "Prepared",
    "Settings",
    "join_or_create",
    "load_task",
    "resolve_factory",
    "prepare",
    "resolve_settings",
]

SETTINGS_ATTR = "ctpe:settings"
SENSITIVITIES_ATTR = "ctpe:sensitivities"
BASELINES_ATTR = "ctpe:baselines"
SETUP_ATTR = "ctpe:setup"
SPACE_SIZE_ATTR = "ctpe:search_space_size"
WARM_START_ATTR = "ctpe:warm_start"
DEFAULT_TASK = "optuna_ctpe.tasks.digits:digits_task"
#: The environment variable naming the weight cache of tasks whose factory takes ``cache_dir``.
CACHE_ENV = "OPTUNA_CTPE_CACHE_DIR"
#: How long a joining worker waits for another worker's sensitivity measurement.
SETUP_TIMEOUT = 900.0
_POLL = 0.5


@dataclass(frozen=True)
class Settings:
    """What defines a study's problem; stored once as ``ctpe:settings``.

    Attributes:
        task: ``module:factory`` of the task.
        seed: Seed of the task (data split, training) and of the sensitivity probes.
        objective: ``"pareto"`` (maximise accuracy, minimise size) or ``"budget"`` (maximise
            accuracy subject to ``size <= size_budget``).
        size_budget: Size budget as a fraction of the FP32 size, in (0, 1]; None for Pareto.
        bits: Bit-width grid.
        widths: Width-ratio grid.
        hessian_pruning: Whether choices are pruned by Hessian sensitivity.
        finetune_epochs: Fine-tuning epochs per trial (0: none).
    """

    task: str
    seed: int
    objective: str
    size_budget: float | None
    bits: tuple[int, ...]
    widths: tuple[float, ...]
    hessian_pruning: bool
    finetune_epochs: int

    @classmethod
    def from_attr(cls, data: dict[str, Any]) -> Settings:
        """The settings stored as the ``ctpe:settings`` user attribute (JSON lists as tuples)."""
        values = {f.name: data[f.name] for f in fields(cls)}
        values["bits"] = tuple(values["bits"])
        values["widths"] = tuple(values["widths"])
        return cls(**values)

    def to_attr(self) -> dict[str, Any]:
        """The JSON-ready dict stored as the ``ctpe:settings`` user attribute."""
        data = asdict(self)
        data["bits"], data["widths"] = list(self.bits), list(self.widths)
        return data

    @property
    def directions(self) -> list[str]:
        """The study's directions: accuracy up (and size down, for the Pareto objective)."""
        return ["maximize", "minimize"] if self.objective == "pareto" else ["maximize"]


#: Defaults of the settings a user leaves out when creating a study.
DEFAULTS: dict[str, Any] = {
    "task": DEFAULT_TASK,
    "seed": 0,
    "objective": "pareto",
    "size_budget": None,
    "bits": (2, 3, 4, 6, 8),
    "widths": (0.5, 0.75, 1.0),
    "hessian_pruning": True,
    "finetune_epochs": 0,
}
#: ``--size-budget`` when ``--objective budget`` is given without one: 1/8 of FP32 (twice the
#: compression of uniform 8-bit).
DEFAULT_SIZE_BUDGET = 0.125
_OPTION = {
    "task": "--task",
    "seed": "--seed",
    "objective": "--objective",
    "size_budget": "--size-budget",
    "bits": "--bits",
    "widths": "--widths",
    "hessian_pruning": "--no-hessian-pruning",
    "finetune_epochs": "--finetune-epochs",
}


def _resolve(requested: dict[str, Any], stored: dict[str, Any] | None, name: str) -> Settings:
    """Merge the options given on the command line (None: not given) with a study's settings."""
    if stored is None:
        values = {k: (DEFAULTS[k] if v is None else v) for k, v in requested.items()}
        if values["objective"] == "budget" and values["size_budget"] is None:
            values["size_budget"] = DEFAULT_SIZE_BUDGET
        if values["objective"] == "pareto" and values["size_budget"] is not None:
            raise UsageError("--size-budget applies to --objective budget only.")
        return Settings(**values)
    settings = Settings.from_attr(stored)
    for key, value in requested.items():
        have = getattr(settings, key)
        if value is None or value == have:
            continue
        given = _OPTION[key] if key == "hessian_pruning" else f"{_OPTION[key]} {_show(value)}"
        created = (
            "Hessian pruning" if key == "hessian_pruning" else f"{_OPTION[key]} {_show(have)}"
        )
        raise UsageError(
            f"{given} conflicts with study {name!r}, which was created with {created}; leave "
            "the option out to continue the study, or use another --study-name."
        )
    return settings


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def resolve_settings(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    requested: dict[str, Any],
    check: Callable[[Settings], None],
) -> Settings:
    """The settings a search with these options runs under: the existing study's, or the
    options' (with defaults) for a new study. Reads the storage, writes nothing.

    Args:
        storage: The storage.
        study_name: The study.
        requested: Setting name -> the command line's value, None where the option was not given.
        check: Validates the resolved settings against the other options.

    Raises:
        UsageError: If an explicit option contradicts the existing study, or ``check`` refuses
            the settings.
    """
    settings = _resolve(requested, _stored_settings(storage, study_name), study_name)
    check(settings)
    return settings


def join_or_create(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    requested: dict[str, Any],
    check: Callable[[Settings], None],
) -> tuple[optuna.Study, Settings, bool]:
    """Create the study, or join it if it exists; return it, its settings and whether this
    process created it.

    Creating without ``load_if_exists`` first makes exactly one of several simultaneous
    workers the creator (the storage's unique study name decides), so the set-up runs once.
    The arguments are those of :func:`resolve_settings`.

    Raises:
        UsageError: As :func:`resolve_settings`, or if the study exists but was not created by
            ``optuna-ctpe search``.
    """
    stored = _stored_settings(storage, study_name)
    settings = _resolve(requested, stored, study_name)
    check(settings)
    if stored is None:
        try:
            study = optuna.create_study(
                storage=storage, study_name=study_name, directions=settings.directions
            )
        except optuna.exceptions.DuplicatedStudyError:
            pass  # another worker won the race: join below
        else:
            # Claim the set-up at once, so joining workers wait instead of measuring too.
            study.set_user_attr(SETUP_ATTR, {"worker": worker_id(), "started": time.time()})
            study.set_user_attr(SETTINGS_ATTR, settings.to_attr())
            with warnings.catch_warnings():
                # Experimental since Optuna 3.2, and what names the objectives in the dashboard.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(
                    ["accuracy", "size_kb"] if settings.objective == "pareto" else ["accuracy"]
                )
            return study, settings, True
    study = optuna.load_study(storage=storage, study_name=study_name, sampler=None)
    # The creator writes its settings right after creating the study; wait for them briefly.
    deadline = time.monotonic() + 30.0
    while SETTINGS_ATTR not in study.user_attrs:
        if time.monotonic() > deadline:
            raise UsageError(
                f"study {study_name!r} exists but was not created by optuna-ctpe search (it has "
                f"no {SETTINGS_ATTR!r} user attribute); use another --study-name."
            )
        time.sleep(_POLL)
    settings = _resolve(requested, study.user_attrs[SETTINGS_ATTR], study_name)
    check(settings)
    return study, settings, False


def _stored_settings(
    storage: optuna.storages.BaseStorage, study_name: str
) -> dict[str, Any] | None:
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return None
    return storage.get_study_user_attrs(study_id).get(SETTINGS_ATTR)


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Import ``module:factory`` and return the factory, without calling it.

    Raises:
        UsageError: If ``spec`` is not ``module:factory``, the module does not import, or it has
            no such callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"--task {spec!r} must have the form module:factory, e.g. {DEFAULT_TASK}."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"--task {spec!r}: cannot import module {module_name!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--task {spec!r}: module {module_name!r} has no callable {attr!r}.")
    return factory


def load_task(spec: str, *, seed: int, cache_dir: str | None) -> Task:
    """Call the ``module:factory`` of ``spec`` as ``factory(seed=seed)``, adding ``cache_dir``
    (from the argument or ``$OPTUNA_CTPE_CACHE_DIR``) when the factory takes it.

    Raises:
        UsageError: As :func:`resolve_factory`, or if the factory does not return a
            :class:`~optuna_ctpe.tasks.Task`.
    """
    factory = resolve_factory(spec)
    kwargs: dict[str, Any] = {"seed": seed}
    cache_dir = cache_dir or os.environ.get(CACHE_ENV) or None
    if cache_dir is not None and "cache_dir" in inspect.signature(factory).parameters:
        kwargs["cache_dir"] = cache_dir
    task = factory(**kwargs)
    if not isinstance(task, Task):
        raise UsageError(
            f"--task {spec!r}: the factory returned {type(task).__name__}, not an "
            "optuna_ctpe.tasks.Task."
        )
    return task


@dataclass
class Prepared:
    """Everything a worker needs once the study is set up."""

    space: HessianSearchSpace
    baselines: dict[str, dict[str, float]]


def prepare(
    study: optuna.Study,
    settings: Settings,
    task: Task,
    *,
    creator: bool,
    log: Callable[[str], None],
) -> Prepared:
    """Measure and store the search space and baselines once, or read another worker's.

    The creator measures; a joining worker waits for the creator's attributes, and measures
    itself only if the worker that claimed the set-up has died on this host.
    """
    deadline = time.monotonic() + SETUP_TIMEOUT
    announced = False
    while True:
        attrs = study.user_attrs
        if SPACE_ATTR in attrs and BASELINES_ATTR in attrs:
            space = HessianSearchSpace.load_from_study(study)
            return Prepared(space, attrs[BASELINES_ATTR])
        claim = attrs.get(SETUP_ATTR)
        owner = claim.get("worker") if isinstance(claim, dict) else None
        if creator:
            return _set_up(study, settings, task, log)
        if owner is None or owner_is_dead(owner):
            log(f"taking over the set-up of study {study.study_name!r} from {owner} ...")
            study.set_user_attr(SETUP_ATTR, {"worker": worker_id(), "started": time.time()})
            return _set_up(study, settings, task, log)
        if not announced:
            log(f"waiting for worker {owner} to measure the sensitivities ...")
            announced = True
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"worker {owner} has not finished setting up study {study.study_name!r} in "
                f"{SETUP_TIMEOUT:.0f} s; if it died on another machine, delete its "
                f"{SETUP_ATTR!r} claim or use another --study-name."
            )
        time.sleep(_POLL)  # study.user_attrs reads the storage afresh on every access


def _set_up(
    study: optuna.Study, settings: Settings, task: Task, log: Callable[[str], None]
) -> Prepared:
    log("measuring Hessian sensitivities ...")
    # The library's default pruning threshold, or none at all (math.inf keeps every choice).
    no_pruning: dict[str, float] = {} if settings.hessian_pruning else {"budget": math.inf}
    space = HessianSearchSpace.from_model(
        task.model,
        task.loss_fn,
        task.calibration_batches,
        bits=settings.bits,
        widths=settings.widths,
        example_inputs=task.example_inputs,
        seed=settings.seed,
        **no_pruning,
    )
    if settings.size_budget is not None:
        try:
            space = space.relaxed_for_size(settings.size_budget)
        except ValueError as e:
            raise UsageError(
                f"--size-budget {settings.size_budget:g} cannot be met: {e}"
            ) from None
    baselines = _baselines(space, task)
    study.set_user_attr(
        SENSITIVITIES_ATTR,
        {
            name: {
                "n_params": s.n_params,
                "mean_trace": s.mean_trace,
                "trace": s.mean_trace * s.n_params,
                "rel_stderr": s.trace_stderr / s.mean_trace if s.mean_trace > 0 else None,
                "fixed_bits": space.fixed_bits.get(name),
            }
            for name, s in space.sensitivities.items()
        },
    )
    study.set_user_attr(
        SPACE_SIZE_ATTR,
        {"log10_before": space.log10_size_before, "log10_after": space.log10_size_after},
    )
    # A worker taking over from a dead one does not enqueue the warm starts a second time.
    if not any(t.user_attrs.get(WARM_START_ATTR) for t in study.get_trials(deepcopy=False)):
        for params in _warm_starts(space, settings):
            study.enqueue_trial(params, user_attrs={WARM_START_ATTR: True})
    # Written last: joining workers start searching as soon as they see these two.
    study.set_user_attr(BASELINES_ATTR, baselines)
    space.save_to_study(study)
    return Prepared(space, baselines)


def _baselines(space: HessianSearchSpace, task: Task) -> dict[str, dict[str, float]]:
    fp32_bytes = space.fp32_bits / 8
    out = {
        "fp32": {
            "accuracy": float(task.evaluate(task.model)),
            "size_bytes": fp32_bytes,
            "compression_ratio": 1.0,
        }
    }
    uniform = space.uniform(8)
    net = space.apply(task.model, uniform, task.example_inputs)
    size_bits = space.size(uniform)
    out["uniform8"] = {
        "accuracy": float(task.evaluate(net)),
        "size_bytes": size_bits / 8,
        "compression_ratio": space.fp32_bits / size_bits,
    }
    return out


def _warm_starts(space: HessianSearchSpace, settings: Settings) -> list[dict[str, Any]]:
    """ILP allocations to enqueue: two at the budget, or one at each of two sizes on the way
    to a Pareto front (1/6 and 1/10 of FP32, between uniform 8-bit and 4-bit)."""
    if not space.distributions:
        return []
    if settings.size_budget is not None:
        return space.warm_starts(size_ratio=settings.size_budget, n=2)
    found: list[dict[str, Any]] = []
    for ratio in (1 / 6, 1 / 10):
        try:
            candidates = space.warm_starts(size_ratio=ratio, n=1)
        except ValueError:
            continue  # nothing in the pruned space is that small
        found += [c for c in candidates if c not in found]
    return found
