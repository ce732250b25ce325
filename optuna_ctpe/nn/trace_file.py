"""Per-layer traces in a file: measure sensitivities once, start many searches from them.

The Hessian-vector products are the expensive part of building a search space (minutes on a
transformer); bit-width errors, width groups and sizes are cheap to recompute. So the file
holds the traces only, with what they were measured with, and a search space is built from it
with ``HessianSearchSpace.from_model(..., traces=read_trace_file(path).traces)``, for any grids.
``optuna-ctpe sensitivity --output FILE`` writes one and ``optuna-ctpe search --sensitivities
FILE`` reads it.

The format is versioned JSON::

    {"schema": "optuna-ctpe/sensitivities", "version": 1, "estimator": "hutchinson",
     "metadata": {...}, "traces": [{"name": ..., "trace": ..., "stderr": ...,
     "n_params": ..., "n_probes": ...}, ...]}

Example:
    .. code-block:: python

        from optuna_ctpe import HessianSearchSpace
        from optuna_ctpe.nn.sensitivity import hutchinson_traces
        from optuna_ctpe.nn.trace_file import read_trace_file, write_trace_file
        from optuna_ctpe.tasks.digits import digits_task

        task = digits_task(seed=0)
        traces = hutchinson_traces(task.model, task.loss_fn, task.calibration_batches)
        write_trace_file("traces.json", traces, estimator="hutchinson")
        space = HessianSearchSpace.from_model(
            task.model, task.loss_fn, task.calibration_batches,
            example_inputs=task.example_inputs, traces=read_trace_file("traces.json").traces,
        )
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import json
import math
import os
from pathlib import Path
import tempfile
from typing import Any

from optuna_ctpe.nn.traces import LayerTrace


__all__ = ["SCHEMA", "SCHEMA_VERSION", "TraceFile", "read_trace_file", "write_trace_file"]

SCHEMA = "optuna-ctpe/sensitivities"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TraceFile:
    """The content of a trace file.

    Attributes:
        traces: Layer name -> its trace, in the file's (model) order.
        estimator: The estimator that measured them (``"hutchinson"``, ``"ggn"``...).
        metadata: What the writer recorded besides, e.g. the task and its seed.
    """

    traces: Mapping[str, LayerTrace]
    estimator: str
    metadata: Mapping[str, Any]


def write_trace_file(
    path: str | os.PathLike[str],
    traces: Mapping[str, LayerTrace],
    *,
    estimator: str,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``traces`` to ``path`` (replaced atomically: a reader never sees half a file).

    Args:
        path: The JSON file to write.
        traces: Layer name -> trace, as the estimators return them.
        estimator: The estimator's name, recorded for the reader.
        metadata: JSON-serialisable facts to record besides, e.g. ``{"task": ..., "seed": 0}``.

    Returns:
        The path written.

    Raises:
        ValueError: If ``traces`` is empty, a key is not its trace's name, or a value is not
            a finite :class:`~optuna_ctpe.nn.traces.LayerTrace`.
    """
    if not traces:
        raise ValueError("traces is empty: there is nothing to write.")
    for name, trace in traces.items():
        _check_trace(trace, name)
    document = {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "estimator": str(estimator),
        "metadata": dict(metadata or {}),
        "traces": [t.to_dict() for t in traces.values()],
    }
    text = json.dumps(document, indent=2) + "\n"
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_trace_file(path: str | os.PathLike[str]) -> TraceFile:
    """Read a file :func:`write_trace_file` wrote.

    Raises:
        ValueError: If the file is not JSON, not a trace file, of a newer version, or holds a
            malformed, non-finite or repeated trace (the message says which).
        OSError: If the file cannot be read.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a sensitivity file: not JSON ({e}).") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise ValueError(
            f"{path} is not a sensitivity file (schema {SCHEMA!r}); write one with "
            "`optuna-ctpe sensitivity --output FILE`."
        )
    version = document.get("version")
    if type(version) is not int or not 1 <= version <= SCHEMA_VERSION:
        raise ValueError(
            f"{path} is a sensitivity file of version {version!r}; this optuna-ctpe reads "
            f"versions 1 to {SCHEMA_VERSION}: upgrade optuna-ctpe."
        )
    entries = document.get("traces")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: 'traces' must be a non-empty list.")
    traces: dict[str, LayerTrace] = {}
    for i, entry in enumerate(entries):
        try:
            trace = LayerTrace.from_dict(entry)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: trace {i} is malformed: {e}") from None
        if trace.name in traces:
            raise ValueError(f"{path}: layer {trace.name!r} has two traces.")
        traces[trace.name] = _check_trace(trace, trace.name, where=f"{path}: ")
    metadata = document.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: 'metadata' must be an object, got {metadata!r}.")
    return TraceFile(traces, str(document.get("estimator", "")), metadata)


def _check_trace(trace: Any, name: str, where: str = "") -> LayerTrace:
    if not isinstance(trace, LayerTrace):
        raise ValueError(f"{where}the trace of {name!r} is not a LayerTrace: {trace!r}.")
    if trace.name != name:
        raise ValueError(f"{where}the trace under {name!r} is named {trace.name!r}.")
    if not (math.isfinite(trace.trace) and math.isfinite(trace.stderr)) or trace.stderr < 0:
        raise ValueError(
            f"{where}the trace of {name!r} must be finite with a standard error >= 0, got "
            f"{trace.trace!r} +- {trace.stderr!r}."
        )
    if trace.n_params < 1 or trace.n_probes < 1:
        raise ValueError(
            f"{where}the trace of {name!r} must have n_params and n_probes >= 1, got "
            f"{trace.n_params} and {trace.n_probes}."
        )
    return trace
