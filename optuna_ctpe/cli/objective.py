"""The objective of ``optuna-ctpe search``: apply a configuration, optionally fine-tune, score.

Each trial suggests a :class:`~optuna_ctpe.search_space.QuantConfig`, scores the width-pruned,
weight-quantized model and records, as trial user attributes that optuna-dashboard shows as
sortable columns:

* ``accuracy``: the task metric of the configured model (after fine-tuning, if any);
* ``size_bytes``, ``size_kb`` and ``compression_ratio`` (FP32 size / size);
* ``feasible`` (budget objectives): whether the size (and latency) are within their budgets;
* ``latency_ms``, ``latency_source`` and ``latency_runtime`` (latency objectives): the
  configuration's latency at the study's batch on its runtime (onnxruntime's CPU provider, one
  thread; or torch with torchao's kernels, ``torch-cuda`` or ``torch-cpu`` as the worker has a
  GPU or not), from the study's lookup table (``table``) or timed as a whole model
  (``measured``); see :class:`optuna_ctpe.deploy.latency_meter.LatencyMeter`.

What a trial returns and which constraints it sets are its objective's row of
:data:`optuna_ctpe.cli.objectives.OBJECTIVES`.

With ``finetune_epochs > 0`` the copy is fine-tuned by quantization-aware training
(:func:`optuna_ctpe.nn.finetune.finetune_quantized`) on the task's calibration batches; after
each epoch the validation accuracy is reported as the intermediate value of that step, so a
pruner can stop an unpromising trial. The fine-tuning is deterministic on a CPU, which lets
``optuna-ctpe export`` rebuild the exact model a trial scored.

Without fine-tuning, a trial with every width at 1 copies nothing: it quantizes a working copy
of the task's model in place for the time of the evaluation (:meth:`HessianSearchSpace.applied`),
with each (layer, bit-width) quantized once per search (a
:class:`~optuna_ctpe.nn.apply.WeightCache`). Each thread (``--n-jobs``) has its own working copy,
made once; the task's model itself is never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import copy
import threading
from typing import Any

import optuna

from optuna_ctpe import _attrs
from optuna_ctpe import _optuna_compat as compat
from optuna_ctpe.cli.objectives import objective_kind
from optuna_ctpe.cli.options import UsageError
from optuna_ctpe.cli.settings import Settings
from optuna_ctpe.cli.signals import check_interrupted
from optuna_ctpe.cli.signals import interruptible
from optuna_ctpe.cli.signals import shielded
from optuna_ctpe.cli.storage import worker_id
from optuna_ctpe.deploy.latency_meter import LatencyMeter
from optuna_ctpe.deploy.latency_meter import missing_packages
from optuna_ctpe.search_space import HessianSearchSpace
from optuna_ctpe.search_space import QuantConfig
from optuna_ctpe.tasks import Task


__all__ = [
    "Objective",
    "build_model",
    "check_latency_extra",
    "latency_meter",
    "known_constraint",
    "log_chosen_latency",
    "model_metrics",
    "set_up_latency",
    "stored_latency",
]


def model_metrics(
    space: HessianSearchSpace, accuracy: float, size_bits: float
) -> dict[str, float]:
    """A model's accuracy, size in bytes and compression over FP32, under their metric names."""
    return {
        _attrs.ACCURACY: accuracy,
        _attrs.SIZE_BYTES: size_bits / 8,
        _attrs.COMPRESSION_RATIO: space.fp32_bits / size_bits,
    }


def build_model(
    space: HessianSearchSpace,
    task: Task,
    config: QuantConfig,
    finetune_epochs: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Any:
    """The quantized (and width-pruned) copy of the task's model that a trial scores.

    Args:
        space: The study's search space.
        task: The task.
        config: The configuration.
        finetune_epochs: Epochs of quantization-aware fine-tuning on the calibration batches
            (:func:`optuna_ctpe.nn.finetune.finetune_quantized`).
        on_epoch: Called as ``on_epoch(epoch, accuracy)`` after each epoch; it may raise
            :class:`optuna.TrialPruned` to stop.

    Returns:
        A ``torch.nn.Module`` in eval mode whose weights hold the quantized values.
    """
    if finetune_epochs == 0:
        return space.apply(task.model, config, task.example_inputs)
    from optuna_ctpe.nn.finetune import finetune_quantized

    def report(epoch: int, net: Any) -> None:
        if on_epoch is not None:
            on_epoch(epoch, float(task.evaluate(net)))

    # Start from the float, width-pruned copy; the quantizers sit in the forward pass.
    net = space.prune(task.model, config, task.example_inputs)
    return finetune_quantized(
        net,
        config.bits,
        task.loss_fn,
        task.calibration_batches,
        epochs=finetune_epochs,
        on_epoch=report,
    )


def latency_meter(
    settings: Settings, space: HessianSearchSpace, task: Task, table: Any = None
) -> LatencyMeter:
    """The :class:`~optuna_ctpe.deploy.latency_meter.LatencyMeter` of a study's trials: on its
    latency runtime, at its latency batch, from ``table`` (None: whole models timed)."""
    return LatencyMeter(
        space,
        task.model,
        task.example_inputs,
        batch=settings.latency_batch or 1,
        runtime=settings.latency_runtime,
        table=table,
    )


def set_up_latency(
    study: optuna.Study,
    settings: Settings,
    space: HessianSearchSpace,
    task: Task,
    log: Callable[[str], None],
) -> LatencyMeter | None:
    """At a study's set-up: measure and store its latency table (``--latency-source table``),
    and return the meter of its trials; None without a latency objective."""
    if not settings.has_latency:
        return None
    table = None
    if settings.latency_source == "table":
        from optuna_ctpe.deploy.latency_table import measure_latency_table

        log(f"measuring the latency table (batch {settings.latency_batch}) ...")
        table = measure_latency_table(
            space, task.model, task.example_inputs, batch=settings.latency_batch or 1
        )
        _attrs.write_chunked(study.set_user_attr, _attrs.LATENCY_TABLE, table.to_json())
    return latency_meter(settings, space, task, table)


def stored_latency(
    attrs: Mapping[str, Any], settings: Settings, space: HessianSearchSpace, task: Task
) -> LatencyMeter | None:
    """The meter of a set-up study's trials, with the table its user attributes ``attrs``
    hold; None without a latency objective."""
    if not settings.has_latency:
        return None
    table = None
    if settings.latency_source == "table":
        from optuna_ctpe.deploy.latency_table import LatencyTable

        text = _attrs.read_chunked(attrs, _attrs.LATENCY_TABLE)
        if text is None:
            raise RuntimeError(
                f"the study's settings ask for a latency table but it has no "
                f"{_attrs.LATENCY_TABLE!r} attribute."
            )
        table = LatencyTable.from_json(text)
    return latency_meter(settings, space, task, table)


def check_latency_extra(settings: Settings) -> None:
    """Refuse a latency objective without the ``deploy`` extra's packages its runtime needs,
    before a study is created.

    Raises:
        UsageError: Naming the missing packages.
    """
    if not settings.has_latency:
        return
    what, missing = missing_packages(settings.latency_runtime)
    if missing:
        raise UsageError(
            f"--objective {settings.objective} times {what} and needs {missing}: "
            "pip install 'optuna-ctpe[deploy]'."
        )


def log_chosen_latency(
    study: optuna.Study,
    space: HessianSearchSpace,
    task: Task,
    settings: Settings,
    log: Callable[[str], None],
) -> None:
    """Log the recommended trial's latency timed again as a whole exported model, against the
    latency budget: with ``--latency-source table`` the trials' latencies are predictions."""
    from optuna_ctpe.cli.choose import recommended_trial

    trial = recommended_trial(study)
    if trial is None or settings.latency_source != "table":
        return
    ms = latency_meter(settings, space, task)(space.config_from_params(trial.params))
    verdict = "within" if ms <= settings.latency_budget_ms else "OVER"
    log(
        f"trial {trial.number} timed again as a whole exported model: {ms:.4g} ms, {verdict} "
        f"the budget of {settings.latency_budget_ms:g} ms (the table predicted "
        f"{trial.user_attrs[_attrs.LATENCY_MS]:.4g} ms)"
    )


def known_constraint(
    settings: Settings, space: HessianSearchSpace, latency: LatencyMeter | None
) -> Any:
    """The study's budgets as a known constraint for ClusterTPESampler: the size budget, and
    the latency budget where a lookup table predicts latency (``--latency-source table``); None
    without a budget (a measured latency stays a constraint learned from finished trials).

    Raises:
        UsageError: If no configuration of the space fits the budgets (the message says how
            close the best found comes).
    """
    table = latency.table if latency is not None else None
    try:
        if objective_kind(settings.objective).latency_budget and table is not None:
            return space.latency_constraint(
                table, settings.latency_budget_ms, size_ratio=settings.size_budget
            )
        if settings.size_budget is not None:
            return space.size_constraint(settings.size_budget)
    except ValueError as e:
        raise UsageError(
            f"the budgets of --objective {settings.objective} cannot be met: {e}"
        ) from None
    return None


class Objective:
    """The objective function of ``optuna-ctpe search``.

    Args:
        space: The study's search space.
        task: The task.
        settings: The study's settings (objective, budgets, fine-tuning).
        sampler_name: ``ctpe``, ``tpe`` or ``random``, recorded per trial since the storage
            does not record samplers.
        latency: How trials get their latency, for the latency objectives (None otherwise).
    """

    def __init__(
        self,
        space: HessianSearchSpace,
        task: Task,
        settings: Settings,
        sampler_name: str,
        latency: LatencyMeter | None = None,
    ) -> None:
        if settings.has_latency and latency is None:
            raise ValueError(f"--objective {settings.objective} needs a LatencyMeter.")
        self._space = space
        self._task = task
        self._settings = settings
        self._sampler_name = sampler_name
        self._latency = latency
        self._budget_bits = (
            None if settings.size_budget is None else settings.size_budget * space.fp32_bits
        )
        # Without fine-tuning, trials configure the model in place instead of copying it. A
        # format space's weights come from the one quantizer of the task's model (GPTQ's need
        # its calibration): its trials score a copy of that model, made one thread at a time.
        in_place = settings.finetune_epochs == 0 and settings.formats is None
        self._models = _WorkingCopies(task.model) if in_place else None
        self._copy_lock = threading.Lock()

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        return self._evaluate(trial)

    def _evaluate(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        # Tag the trial with this process first, so that if the process dies, the next worker
        # on this host can tell the trial is abandoned.
        compat.storage_of(trial.study).set_trial_system_attr(
            compat.trial_id(trial), _attrs.WORKER, worker_id()
        )
        trial.set_user_attr(_attrs.SAMPLER, self._sampler_name)
        config = self._space.suggest(trial)
        # Only the computation is interruptible: a signal raised inside the trial's storage calls
        # around it can lock an SQLite study (optuna_ctpe.cli.signals).
        with interruptible():
            accuracy = self._score(config, trial)
        size_bits = self._space.size(config)
        for key, value in model_metrics(self._space, accuracy, size_bits).items():
            trial.set_user_attr(key, value)
        size_kb = size_bits / 8 / 1024
        trial.set_user_attr(_attrs.SIZE_KB, size_kb)
        latency = None
        if self._latency is not None:
            with interruptible():
                latency = self._latency(config)
            trial.set_user_attr(_attrs.LATENCY_MS, latency)
            trial.set_user_attr(_attrs.LATENCY_SOURCE, self._latency.source)
            trial.set_user_attr(_attrs.LATENCY_RUNTIME, self._latency.runtime_name)
        kind = self._settings.kind
        if len(kind.metrics) > 1:
            values = {
                _attrs.ACCURACY: accuracy,
                _attrs.SIZE_KB: size_kb,
                _attrs.LATENCY_MS: latency,
            }
            return tuple(values[name] for name in kind.metrics)
        # Relative excess over a budget: <= 0 is feasible, and the value is comparable across
        # models, which is what TPE's ranking of infeasible trials by violation needs.
        violations = {}
        if self._budget_bits is not None:
            violations["size"] = size_bits / self._budget_bits - 1.0
        if kind.latency_budget:
            violations["latency"] = latency / self._settings.latency_budget_ms - 1.0
        for name, violation in violations.items():
            compat.set_constraint(trial, name, violation)
        trial.set_user_attr(_attrs.FEASIBLE, all(v <= 0 for v in violations.values()))
        return accuracy

    def _score(self, config: QuantConfig, trial: optuna.Trial) -> float:
        """The task metric of ``config``'s model."""
        if self._models is None and self._settings.formats is not None:
            with self._copy_lock:
                net = self._space.apply(self._task.model, config, self._task.example_inputs)
            return float(self._task.evaluate(net))
        if self._models is None:
            net = build_model(
                self._space,
                self._task,
                config,
                self._settings.finetune_epochs,
                self._epoch_reporter(trial),
            )
            return float(self._task.evaluate(net))
        model, cache = self._models.get()
        with self._space.applied(model, config, self._task.example_inputs, cache=cache) as net:
            return float(self._task.evaluate(net))

    def _epoch_reporter(self, trial: optuna.Trial) -> Callable[[int, float], None]:
        """The ``on_epoch`` of :func:`build_model`: stop on a signal, report, maybe prune."""
        # Multi-objective studies cannot report intermediate values (Optuna raises).
        single = len(self._settings.directions) == 1

        def on_epoch(epoch: int, accuracy: float) -> None:
            check_interrupted()  # fine-tuning is the long part of a trial: stop between epochs
            if single:
                with shielded():  # storage calls, inside the interruptible fine-tuning
                    trial.report(accuracy, epoch)
                    prune = trial.should_prune()
                if prune:
                    raise optuna.TrialPruned(f"accuracy {accuracy:.4f} after epoch {epoch}")

        return on_epoch


class _WorkingCopies:
    """One private copy of the task's model per thread, each with its weight cache.

    A trial quantizes its thread's copy in place, so two threads never share a model, and the
    task's own model is never touched: a task's ``evaluate`` may still compare against it. The
    copy is made once per thread (Optuna's ``n_jobs`` threads are reused), not once per trial.
    """

    def __init__(self, model: Any) -> None:
        self._model = model
        self._local = threading.local()

    def get(self) -> tuple[Any, Any]:
        """This thread's ``(model copy, WeightCache)``."""
        local = self._local
        if not hasattr(local, "model"):
            local.model = copy.deepcopy(self._model)
            local.cache = _weight_cache()
        return local.model, local.cache


def _weight_cache() -> Any:
    # Imported here: the command line imports torch only once a study needs it.
    from optuna_ctpe.nn.apply import WeightCache

    return WeightCache()
