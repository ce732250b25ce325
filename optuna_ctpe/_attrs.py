"""Every attribute optuna-ctpe stores in Optuna, and the one chunked writer/reader for long values.

Keys and trial-metric names are written in one module and read in several; naming them here
keeps writers and readers in step. Everything the package itself stores starts with ``ctpe:``;
the trial metrics the CLI records (``accuracy``, ``size_bytes``, ...) carry no prefix because
they are what a user reads in optuna-dashboard's trial table.

Long values (a search space, a trial's relative parameters) are split into chunks because old
RDB schemas cap an attribute's JSON text at 2,048 characters. One scheme serves every writer:

* ``<key>:<i>`` for ``i = 0 .. n-1``: consecutive pieces of the text, each short enough that its
  JSON encoding (quotes and escapes included) stays within :data:`CHUNK_JSON_LENGTH`;
* ``<key>``: the header ``{"n_chunks": n, "sha256": <hex digest of the whole text>}``, written
  last, so a reader that sees the header sees every chunk.

0.1.0's sampler wrote ``ctpe:relative_params:<i>`` without a header, cutting the raw text at
2,045 characters; :func:`read_chunked` still reads that form (see its ``legacy_headerless``).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import hashlib
import json
from typing import Any

from optuna_ctpe._validation import is_integer


PREFIX = "ctpe:"

# -- study user attributes (the CLI's study, and HessianSearchSpace.save_to_study) ------------
SEARCH_SPACE = "ctpe:search_space"
SETTINGS = "ctpe:settings"
SENSITIVITIES = "ctpe:sensitivities"
#: Where a study's traces came from when not measured by it: a sensitivity file's estimator
#: and metadata (``optuna-ctpe search --sensitivities``).
SENSITIVITY_SOURCE = "ctpe:sensitivity_source"
BASELINES = "ctpe:baselines"
SETUP = "ctpe:setup"
SEARCH_SPACE_SIZE = "ctpe:search_space_size"
#: The latency lookup table of a latency objective's study (chunked, see write_chunked).
LATENCY_TABLE = "ctpe:latency_table"

# -- trial attributes ---------------------------------------------------------------------------
#: System attribute: the parameters a trial's relative sample chose, for other workers' duplicate
#: avoidance before the trial has suggested them all.
RELATIVE_PARAMS = "ctpe:relative_params"
#: System attribute: ``host:pid:start-time`` of the CLI worker that runs the trial.
WORKER = "ctpe:worker"
#: User attribute on trials enqueued as ILP warm starts.
WARM_START = "ctpe:warm_start"
#: User attribute on the trial enqueued as the uniform baseline: the grid choice (bit-width or
#: format name) every searched layer takes, the best of those whose uniform configuration fits
#: the size budget (kept in the pruned space, so the search is never worse than it).
UNIFORM_BASELINE = "ctpe:uniform_baseline"
#: User attribute on a warm start: its summed Ω at enqueue time (HAWQ-V2's twice the predicted
#: loss increase), which the final report shows beside the measured accuracy.
PREDICTED_OMEGA = "ctpe:predicted_omega"


#: User attribute on trials of a sampler with known constraints: whether the proposal had to be
#: repaired into the feasible region (no candidate drawn from l(x) satisfied the constraints).
REPAIRED = "ctpe:repaired"
#: Prefix of the constraint keys under which a sampler records a known constraint's values
#: (``set_constraint``'s format, beside the user's own constraints).
KNOWN_CONSTRAINT_PREFIX = "ctpe:known:"


def known_constraint_key(name: str) -> str:
    """The trial constraint key of a known constraint's value ``name`` (``ctpe:known:size``)."""
    return f"{KNOWN_CONSTRAINT_PREFIX}{name}"


def decision_key(name: str) -> str:
    """The user attribute of one sampling decision (``mode``, ``n_good``, ...), for dashboards."""
    return f"{PREFIX}{name}"


# -- trial metrics the CLI records (user attributes, no prefix) ---------------------------------
ACCURACY = "accuracy"
SIZE_BYTES = "size_bytes"
SIZE_KB = "size_kb"
COMPRESSION_RATIO = "compression_ratio"
SAMPLER = "sampler"
FEASIBLE = "feasible"
#: A trial's latency on the study's runtime, where it came from (``table``/``measured``) and
#: the runtime that timed it (``onnxruntime-cpu``, ``torch-cuda``, ...).
LATENCY_MS = "latency_ms"
LATENCY_SOURCE = "latency_source"
LATENCY_RUNTIME = "latency_runtime"

# -- chunked values ------------------------------------------------------------------------------
#: Longest JSON encoding of one chunk: below the 2,048 characters of old RDB attribute columns,
#: with room for Optuna's own wrapping.
CHUNK_JSON_LENGTH = 2000


def split_chunks(text: str, limit: int = CHUNK_JSON_LENGTH) -> list[str]:
    """Cut ``text`` into pieces whose JSON-string encodings are at most ``limit`` characters."""
    chunks: list[str] = []
    current: list[str] = []
    length = 2  # the quotes of the JSON string
    for ch in text:
        encoded = len(json.dumps(ch)) - 2
        if length + encoded > limit and current:
            chunks.append("".join(current))
            current, length = [], 2
        current.append(ch)
        length += encoded
    chunks.append("".join(current))
    return chunks


def write_chunked(set_attr: Callable[[str, Any], None], key: str, text: str) -> None:
    """Store ``text`` under ``key`` with ``set_attr`` (a user- or system-attribute setter).

    The chunks go first and the header last, so a concurrent reader sees either no header or a
    complete value.
    """
    chunks = split_chunks(text)
    for i, chunk in enumerate(chunks):
        set_attr(f"{key}:{i}", chunk)
    set_attr(key, {"n_chunks": len(chunks), "sha256": _digest(text)})


class ChunkedAttrError(ValueError):
    """A chunked value whose header is malformed, whose chunks are missing, or that is corrupt."""


class MissingChunkError(ChunkedAttrError):
    """A chunk the header counts is absent or not text (a partial write or a hand edit)."""


def read_chunked(
    attrs: Mapping[str, Any], key: str, *, legacy_headerless: bool = False
) -> str | None:
    """The text :func:`write_chunked` stored under ``key`` in ``attrs``; ``None`` if absent.

    Args:
        attrs: A study's or trial's ``user_attrs`` or ``system_attrs``.
        key: The key the value was written under.
        legacy_headerless: Also read 0.1.0's headerless form (``<key>:0``, ``<key>:1``, ...
            joined until the first gap), used by the sampler's relative parameters. Its text may
            be cut short by a writer still at work; the caller must parse it defensively.

    Raises:
        ChunkedAttrError: If the header is malformed, a chunk is missing (a
            :class:`MissingChunkError`) or the text fails its checksum.
    """
    header = attrs.get(key)
    if header is None:
        return _read_headerless(attrs, key) if legacy_headerless else None
    n_chunks = header.get("n_chunks") if isinstance(header, Mapping) else None
    if not is_integer(n_chunks) or n_chunks < 1:
        raise ChunkedAttrError(f"attribute {key!r} is not a chunk header: {header!r}.")
    try:
        chunks = [attrs[f"{key}:{i}"] for i in range(int(n_chunks))]
    except KeyError:
        raise MissingChunkError(
            f"attribute {key!r} lacks some of its {n_chunks} chunks."
        ) from None
    if not all(isinstance(c, str) for c in chunks):
        raise MissingChunkError(f"attribute {key!r} has a chunk that is not text.")
    text = "".join(chunks)
    if _digest(text) != header.get("sha256"):
        raise ChunkedAttrError(f"attribute {key!r} fails its checksum.")
    return text


def _read_headerless(attrs: Mapping[str, Any], key: str) -> str | None:
    chunks: list[str] = []
    while isinstance(chunk := attrs.get(f"{key}:{len(chunks)}"), str):
        chunks.append(chunk)
    return "".join(chunks) if chunks else None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
