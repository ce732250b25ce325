"""The study of ``optuna-ctpe search``: its creation or joining, and its one-time set-up.

A study is created by one worker (the *creator*) and joined by any number of others, at the
same time (distributed workers) or later (a resumed run). Everything that defines the problem
is decided once and stored in the study's user attributes, where later workers and
optuna-dashboard read it:

* ``ctpe:settings``: task, seed, objective, size budget, grids, pruning and fine-tuning
  (:class:`~optuna_ctpe.cli.settings.Settings`).
* ``ctpe:search_space`` (+ chunks): the pruned :class:`~optuna_ctpe.HessianSearchSpace` as JSON.
* ``ctpe:sensitivities``: per-layer Hessian trace data, readable in the dashboard.
* ``ctpe:baselines``: accuracy and size of the FP32 model and of uniform 8-bit quantization.
* ``ctpe:setup``: the worker that measures the sensitivities, so that others wait for it
  instead of measuring again, and take over if it died.
* ``ctpe:search_space_size``: log10 of the number of configurations before and after pruning.
* ``ctpe:latency_table`` (+ chunks; latency objectives with ``--latency-source table``): the
  per-layer latency lookup table, measured once at set-up
  (:class:`~optuna_ctpe.deploy.latency_table.LatencyTable`).

Trials enqueued as warm starts carry the user attributes ``ctpe:warm_start`` and
``ctpe:predicted_omega`` (their summed Ω, so the report can set prediction beside measurement).
Under a size budget, the best uniform configuration that fits (every searched layer at one
grid choice, ranked by calibration-loss increase) is kept in the pruned space and enqueued
first, marked ``ctpe:uniform_baseline`` (the choice) beside ``ctpe:predicted_omega``: the
search is then never worse than a uniform configuration the grid could hold.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
import math
import time
from typing import Any
from typing import TYPE_CHECKING
import warnings

import optuna

from optuna_ctpe import _attrs
from optuna_ctpe.cli.objective import known_constraint
from optuna_ctpe.cli.objective import model_metrics
from optuna_ctpe.cli.objective import set_up_latency
from optuna_ctpe.cli.objective import stored_latency
from optuna_ctpe.cli.options import UsageError
from optuna_ctpe.cli.settings import resolve
from optuna_ctpe.cli.settings import Settings
from optuna_ctpe.cli.settings import stored_settings
from optuna_ctpe.cli.storage import owner_is_dead
from optuna_ctpe.cli.storage import worker_id
from optuna_ctpe.deploy.latency_meter import LatencyMeter
from optuna_ctpe.search_space import HessianSearchSpace
from optuna_ctpe.tasks import Task


if TYPE_CHECKING:
    from optuna_ctpe.nn.trace_file import TraceFile


__all__ = ["Prepared", "SETUP_TIMEOUT", "join_or_create", "prepare"]

#: How long a joining worker waits for another worker's sensitivity measurement.
SETUP_TIMEOUT = 900.0
#: How long a joining worker waits for the creator to store the settings of a new study.
_SETTINGS_TIMEOUT = 30.0
_POLL = 0.5


def join_or_create(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    settings: Settings,
    requested: Mapping[str, Any],
    check: Callable[[Settings], None],
) -> tuple[optuna.Study, Settings, bool]:
    """Create the study with ``settings``, or join it if it exists; return it, its settings and
    whether this process created it.

    Creating without ``load_if_exists`` first makes exactly one of several simultaneous
    workers the creator (the storage's unique study name decides), so the set-up runs once.

    Args:
        storage: The storage.
        study_name: The study.
        settings: The settings :func:`~optuna_ctpe.cli.settings.resolve_settings` resolved.
        requested: The command line's options, as ``resolve_settings`` took them: resolved
            again only if another worker created the study in the meantime with other settings.
        check: As for ``resolve_settings``.

    Raises:
        UsageError: If the study exists but was not created by ``optuna-ctpe search``, or (after
            a lost creation race) the options contradict the winner's settings.
    """
    if stored_settings(storage, study_name) is None:
        study = _create(storage, study_name, settings)
        if study is not None:
            return study, settings, True
    study = optuna.load_study(storage=storage, study_name=study_name, sampler=None)
    stored = _wait_for_settings(study)
    if Settings.from_attr(stored) != settings:
        # Another worker created the study between our read and our attempt (ours were
        # defaults, theirs explicit): the options must hold against its settings.
        settings = resolve(requested, stored, study_name, check)
    return study, settings, False


def _create(
    storage: optuna.storages.BaseStorage, study_name: str, settings: Settings
) -> optuna.Study | None:
    """The new study, its set-up claimed and its settings stored; None if it exists already."""
    try:
        study = optuna.create_study(
            storage=storage, study_name=study_name, directions=settings.directions
        )
    except optuna.exceptions.DuplicatedStudyError:
        return None  # another worker won the race
    # Claim the set-up at once, so joining workers wait instead of measuring too.
    study.set_user_attr(_attrs.SETUP, {"worker": worker_id(), "started": time.time()})
    study.set_user_attr(_attrs.SETTINGS, settings.to_attr())
    with warnings.catch_warnings():
        # Experimental since Optuna 3.2, and what names the objectives in the dashboard.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(settings.metric_names)
    return study


def _wait_for_settings(study: optuna.Study) -> dict[str, Any]:
    """The stored settings of a study; the creator writes them right after creating it."""
    deadline = time.monotonic() + _SETTINGS_TIMEOUT
    while (stored := study.user_attrs.get(_attrs.SETTINGS)) is None:
        if time.monotonic() > deadline:
            raise UsageError(
                f"study {study.study_name!r} exists but was not created by optuna-ctpe search "
                f"(it has no {_attrs.SETTINGS!r} user attribute); use another --study-name."
            )
        time.sleep(_POLL)
    return stored


@dataclass
class Prepared:
    """Everything a worker needs once the study is set up."""

    space: HessianSearchSpace
    baselines: dict[str, dict[str, float]]
    latency: LatencyMeter | None = None


def prepare(
    study: optuna.Study,
    settings: Settings,
    task: Task,
    *,
    creator: bool,
    log: Callable[[str], None],
    traces: TraceFile | None = None,
) -> Prepared:
    """Measure and store the search space and baselines once, or read another worker's.

    The creator measures, or builds the space from ``traces`` (a sensitivity file) when given;
    a joining worker waits for the creator's attributes, and measures itself only if the
    worker that claimed the set-up has died on this host. A study that has its space already
    keeps it: ``traces`` are then ignored, with a log line.
    """
    deadline = time.monotonic() + SETUP_TIMEOUT
    announced = False
    while True:
        attrs = study.user_attrs  # read afresh from the storage on every access
        if _attrs.SEARCH_SPACE in attrs and _attrs.BASELINES in attrs:
            if traces is not None:
                log("the study has its search space already; --sensitivities is ignored")
            space = HessianSearchSpace.load_from_study(study)
            if space.formats:
                # GPTQ formats need the calibration batches; a loaded space has no quantizer.
                space.format_quantizer(task.model, task.calibration_batches, task.loss_fn)
            latency = stored_latency(attrs, settings, space, task)
            return Prepared(space, attrs[_attrs.BASELINES], latency)
        claim = attrs.get(_attrs.SETUP)
        owner = claim.get("worker") if isinstance(claim, dict) else None
        if creator:
            return _set_up(study, settings, task, log, traces)
        if owner is None or owner_is_dead(owner):
            log(f"taking over the set-up of study {study.study_name!r} from {owner} ...")
            study.set_user_attr(_attrs.SETUP, {"worker": worker_id(), "started": time.time()})
            return _set_up(study, settings, task, log, traces)
        if not announced:
            log(f"waiting for worker {owner} to measure the sensitivities ...")
            announced = True
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"worker {owner} has not finished setting up study {study.study_name!r} in "
                f"{SETUP_TIMEOUT:.0f} s; if it died on another machine, delete its "
                f"{_attrs.SETUP!r} claim or use another --study-name."
            )
        time.sleep(_POLL)


def _set_up(
    study: optuna.Study,
    settings: Settings,
    task: Task,
    log: Callable[[str], None],
    traces: TraceFile | None = None,
) -> Prepared:
    estimator = None
    if traces is None:
        from optuna_ctpe.nn.sensitivity import resolve_estimator

        estimator = resolve_estimator("auto", task.model, task.loss_fn, task.calibration_batches)
        log(f"measuring Hessian sensitivities ({estimator} traces) ...")
        source = {"estimator": estimator}
    else:
        log(f"building the search space from {traces.estimator} traces of a sensitivity file")
        source = {"estimator": traces.estimator, **traces.metadata}
    space = _measure_space(settings, task, traces, estimator)
    args = (task.model, task.loss_fn, task.calibration_batches, task.example_inputs)
    measure = space.loss_increase(*args) if space.distributions else None
    uniform = _best_uniform(space, settings, measure)
    if uniform is not None:
        # Kept before anything reads the space (latency table, warm starts, the stored JSON).
        space = space.keeping([uniform])
        log(f"uniform baseline: every searched layer at {uniform}, enqueued first")
    latency = set_up_latency(study, settings, space, task, log)
    known_constraint(settings, space, latency)  # an unreachable budget fails here, not later
    baselines = _baselines(space, task, latency)
    study.set_user_attr(_attrs.SENSITIVITIES, _sensitivity_records(space))
    study.set_user_attr(
        _attrs.SEARCH_SPACE_SIZE,
        {"log10_before": space.log10_size_before, "log10_after": space.log10_size_after},
    )
    # A worker taking over from a dead one does not enqueue the warm starts a second time.
    enqueued = (t.user_attrs for t in study.get_trials(deepcopy=False))
    if not any(a.get(_attrs.WARM_START) or _attrs.UNIFORM_BASELINE in a for a in enqueued):
        baseline: dict[str, Any] | None = None
        if uniform is not None:
            baseline = space.to_params(space.uniform(uniform))
            attrs = {
                _attrs.UNIFORM_BASELINE: uniform,
                _attrs.PREDICTED_OMEGA: space.perturbation(space.uniform(uniform)),
            }
            study.enqueue_trial(baseline, user_attrs=attrs)
        for params in _warm_starts(space, settings, measure):
            if params == baseline:
                continue  # the ILP's answer is the uniform configuration: measured once
            omega = space.perturbation(space.config_from_params(params))
            attrs = {_attrs.WARM_START: True, _attrs.PREDICTED_OMEGA: omega}
            study.enqueue_trial(params, user_attrs=attrs)
    # Written last: joining workers start searching as soon as they see these two.
    study.set_user_attr(_attrs.BASELINES, baselines)
    space.save_to_study(study)
    study.set_user_attr(_attrs.SENSITIVITY_SOURCE, source)  # informative: workers need not wait
    return Prepared(space, baselines, latency)


def _measure_space(
    settings: Settings, task: Task, traces: TraceFile | None, estimator: str | None
) -> HessianSearchSpace:
    """The task's pruned search space, from ``traces`` or measured by ``estimator``, relaxed
    until the size budget (if any) can be met and the unpruned grid's best allocations at it
    are kept."""
    # The library's default pruning threshold, or none at all (math.inf keeps every choice).
    no_pruning: dict[str, float] = {} if settings.hessian_pruning else {"budget": math.inf}
    try:
        space = HessianSearchSpace.from_model(
            task.model,
            task.loss_fn,
            task.calibration_batches,
            bits=settings.bits,
            widths=settings.widths,
            example_inputs=task.example_inputs,
            seed=settings.seed,
            traces=None if traces is None else traces.traces,
            estimator=estimator or "auto",
            formats=None if settings.formats is None else list(settings.formats),
            ties="fused" if settings.tie_fused else None,
            **no_pruning,
        )
    except ValueError as e:
        if traces is None:
            raise
        raise UsageError(f"--sensitivities: {e}") from None
    if settings.size_budget is None:
        return space
    try:
        # Keep the choices the sensitivities pick at this size: under a tight budget the space
        # relaxed just enough to fit holds only a handful of fitting configurations.
        return space.relaxed_for_size(settings.size_budget, keep_allocation=True)
    except ValueError as e:
        # The option is a compression ratio; the settings keep its inverse, a fraction of FP32.
        raise UsageError(
            f"--size-budget {1 / settings.size_budget:g} cannot be met: {e}"
        ) from None


def _sensitivity_records(space: HessianSearchSpace) -> dict[str, dict[str, Any]]:
    """The ``ctpe:sensitivities`` attribute: per layer, what the dashboard shows."""
    return {
        name: {
            "n_params": s.n_params,
            "mean_trace": s.mean_trace,
            "trace": s.mean_trace * s.n_params,
            "rel_stderr": s.trace_stderr / s.mean_trace if s.mean_trace > 0 else None,
            "fixed_bits": space.fixed_bits.get(name),
        }
        for name, s in space.sensitivities.items()
    }


def _baselines(
    space: HessianSearchSpace, task: Task, latency: LatencyMeter | None = None
) -> dict[str, dict[str, float]]:
    """Accuracy and size (and latency) of the FP32 model and of uniform 8-bit quantization."""
    fp32 = model_metrics(space, float(task.evaluate(task.model)), space.fp32_bits)
    uniform = space.uniform(8)
    quantized = space.apply(task.model, uniform, task.example_inputs)
    uniform8 = model_metrics(space, float(task.evaluate(quantized)), space.size(uniform))
    if latency is not None:
        fp32[_attrs.LATENCY_MS] = latency.fp32()
        uniform8[_attrs.LATENCY_MS] = latency(uniform)
    return {"fp32": fp32, "uniform8": uniform8}


def _best_uniform(
    space: HessianSearchSpace,
    settings: Settings,
    measure: Callable[[Any], float] | None,
) -> Any:
    """The grid choice (bit-width or format) whose uniform configuration fits the size budget
    with the least calibration-loss increase (``measure``), or None without a budget, a
    searched parameter, or a fitting uniform configuration.

    Hessian pruning and the ILP's warm starts can steer away from every uniform configuration
    (issue 16: 0.52 accuracy at a budget where uniform 3-bit scores 0.59); measuring the few
    that fit is cheap, and keeping the best in the space bounds the search's result by it.
    """
    if settings.size_budget is None or measure is None:
        return None
    fits = space.uniform_formats(size_ratio=settings.size_budget)
    if not fits:
        return None
    # Measured on the unpruned grid's uniform configurations: the pruned space need not hold
    # them yet (keeping() adds the chosen one).
    return min(fits, key=lambda choice: measure(space.uniform(choice)))


def _warm_starts(
    space: HessianSearchSpace, settings: Settings, measure: Callable[[Any], float] | None
) -> list[dict[str, Any]]:
    """ILP allocations to enqueue, each checked on the calibration batches by ``measure`` (a
    joint answer that loses far more than Ω predicts is corrected): two at the budget, or one
    at each of two sizes on the way to a Pareto front (1/6 and 1/10 of FP32, between uniform
    8-bit and 4-bit)."""
    if measure is None:
        return []
    if settings.size_budget is not None:
        return space.warm_starts(size_ratio=settings.size_budget, n=2, measure=measure)
    found: list[dict[str, Any]] = []
    for ratio in (1 / 6, 1 / 10):
        try:
            candidates = space.warm_starts(size_ratio=ratio, n=1, measure=measure)
        except ValueError:
            continue  # nothing in the pruned space is that small
        found += [c for c in candidates if c not in found]
    return found
