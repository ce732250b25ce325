"""Versioned serialisation of a search space: JSON, and a study's user attributes.

The JSON holds the space's inputs (grids, budget, fixed layers, sensitivities, tensors) and, for
readers such as optuna-dashboard, the choices they give; on reading, the choices are recomputed
and must match, so a hand-edited or foreign file is refused rather than silently re-pruned.
A tensor's ``scales`` and ``scale_group`` (the per-channel scales a quantized tensor stores,
counted in sizes) are absent from files written before they were counted; such a space keeps
counting no scales, so an old study's sizes do not change under it.

Version 2 adds a format space's ``formats`` (format names, :mod:`optuna_ctpe.space.formats`;
each layer's ``errors`` are then keyed by them) and ``always_kept``. A space with neither is
written as version 1, exactly as before, so files of bit-width spaces stay readable by 0.1.x;
version 1 files load as the bit-width spaces they always were.

Version 3 adds ``ties`` (groups of layers sharing one parameter; the stored ``choices`` then
name only the ties' leaders). Only a space with ties is written as version 3, so a reader
that knows no ties refuses it by its version instead of loading it untied; every other space
is written as before, and files of versions 1 and 2 load unchanged, without ties.

In a study the JSON is stored with :func:`optuna_ctpe._attrs.write_chunked` under
:data:`optuna_ctpe._attrs.SEARCH_SPACE` (chunks ``ctpe:search_space:<i>`` that fit the
2,048-character attribute columns of old RDB schemas, and a header with the chunk count and a
SHA-256 of the whole text). 0.1.0 wrote the same scheme, so its studies load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import math
from typing import Any
from typing import TYPE_CHECKING

from optuna_ctpe import _attrs
from optuna_ctpe._validation import is_integer
from optuna_ctpe.space.checks import make_spec
from optuna_ctpe.space.omega import omega_table
from optuna_ctpe.space.params import Choices
from optuna_ctpe.space.pruning import prune
from optuna_ctpe.space.records import SpaceSpec


if TYPE_CHECKING:
    import optuna


SCHEMA = "optuna-ctpe/hessian-search-space"
SCHEMA_VERSION = 3
#: The versions :func:`from_json` reads.
READ_VERSIONS = (1, 2, 3)


def to_json(spec: SpaceSpec, choices: Choices | None = None) -> str:
    """The JSON text of a space: its inputs and the choices they give (``choices``, or those
    the pruning rule gives ``spec`` when None)."""
    if choices is None:
        choices = prune(spec, omega_table(spec, upper=True))
    extended = bool(spec.formats or spec.always_kept)
    data = {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION if spec.ties else 2 if extended else 1,
        "bits": list(spec.bits),
        "widths": list(spec.widths),
        "budget": spec.budget if math.isfinite(spec.budget) else "inf",
        "fixed_bits": dict(spec.fixed_bits),
        "trace_z": spec.trace_z,
        **({"formats": list(spec.formats)} if spec.formats else {}),
        **({"always_kept": list(spec.always_kept)} if spec.always_kept else {}),
        **({"ties": [list(tie) for tie in spec.ties]} if spec.ties else {}),
        "layers": [
            {
                "name": layer.name,
                "mean_trace": layer.mean_trace,
                "trace_stderr": layer.trace_stderr,
                "n_params": layer.n_params,
                "errors": {str(b): e for b, e in layer.errors.items()},
            }
            for layer in spec.layers.values()
        ],
        "groups": [
            {
                "name": g.name,
                "n_channels": g.n_channels,
                "mean_trace": g.mean_trace,
                "perturbations": {repr(w): p for w, p in g.perturbations.items()},
                "kept_channels": None
                if g.kept_channels is None
                else {repr(w): k for w, k in g.kept_channels.items()},
                # Only calibrated groups carry it, so uncalibrated spaces write what they did.
                **(
                    {}
                    if g.loss_increase is None
                    else {"loss_increase": {repr(w): v for w, v in g.loss_increase.items()}}
                ),
                # Likewise for groups measured without standard errors (spaces before them).
                **({"trace_stderr": g.trace_stderr} if g.trace_stderr else {}),
            }
            for g in spec.groups.values()
        ],
        # Fields at their defaults (None, no scales) are left out, as files before them had.
        "tensors": [
            {k: v for k, v in vars(t).items() if v not in (None, 0)} for t in spec.tensors
        ],
        # Informative for readers (dashboard); checked against the recomputation on load.
        "choices": {name: list(c) for name, c in choices.items()},
    }
    return json.dumps(data, sort_keys=False)


def from_json(text: str | bytes | Mapping[str, Any]) -> SpaceSpec:
    """The validated inputs of the space :func:`to_json` wrote (a string or the parsed object).

    Raises:
        ValueError: If the text is not JSON, not a search space of a supported schema version,
            malformed (the message says which field), or its stored choices differ from those
            its sensitivities give.
    """
    data = _parsed(text)
    try:
        budget = data["budget"]
        spec = make_spec(
            data["layers"],
            data["groups"],
            data["tensors"],
            data["bits"],
            data["widths"],
            math.inf if budget == "inf" else budget,
            data["fixed_bits"],
            # Files written before the rule read upper traces have no trace_z: 0 re-prunes
            # them exactly as they were.
            data.get("trace_z", 0.0),
            data.get("formats"),
            data.get("always_kept", ()),
            # Version 3 only: files before ties have none.
            data.get("ties", ()) if data["version"] >= 3 else (),
        )
        stored = {name: tuple(c) for name, c in data["choices"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"malformed search-space JSON: missing or mistyped field {e}.") from None
    if stored != prune(spec, omega_table(spec, upper=True)):
        raise ValueError(
            "search-space JSON is inconsistent: its stored choices differ from those its "
            "sensitivities give (edited by hand, or written by another pruning rule)."
        )
    return spec


def _parsed(text: str | bytes | Mapping[str, Any]) -> Mapping[str, Any]:
    """The JSON object of a search space of this schema version."""
    if isinstance(text, Mapping):
        data: Any = text
    else:
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"search-space JSON is not valid JSON: {e}") from None
    if not isinstance(data, Mapping) or data.get("schema") != SCHEMA:
        raise ValueError(
            f"search-space JSON must be an object with schema {SCHEMA!r}, got "
            f"{(data.get('schema') if isinstance(data, Mapping) else type(data).__name__)!r}."
        )
    # ``type(...) is int``: ``True == 1`` in Python, and a boolean is no schema version.
    if type(data.get("version")) is not int or data.get("version") not in READ_VERSIONS:
        raise ValueError(
            f"search-space JSON has schema version {data.get('version')!r}; this optuna-ctpe "
            f"reads versions {list(READ_VERSIONS)}."
        )
    return data


def save_to_study(study: optuna.Study, text: str) -> None:
    """Store a space's JSON ``text`` in ``study``'s user attributes (see the module docstring)."""
    _attrs.write_chunked(study.set_user_attr, _attrs.SEARCH_SPACE, text)


def load_from_study(study: optuna.Study) -> str:
    """The JSON text :func:`save_to_study` stored in ``study``.

    Raises:
        ValueError: If the study holds no space, or its chunks are missing or corrupt.
    """
    key = _attrs.SEARCH_SPACE
    header = study.user_attrs.get(key)
    if not isinstance(header, Mapping) or not is_integer(header.get("n_chunks")):
        raise ValueError(
            f"study {study.study_name!r} holds no search space (user attribute {key!r} missing "
            "or malformed); call save_to_study first."
        )
    try:
        text = _attrs.read_chunked(study.user_attrs, key)
    except _attrs.MissingChunkError as e:
        raise ValueError(
            f"study {study.study_name!r} lacks chunks of its search space ({e})"
        ) from None
    except _attrs.ChunkedAttrError as e:
        # A header counting no chunks describes an empty text, which fails its checksum too.
        raise ValueError(
            f"the search space stored in study {study.study_name!r} fails its checksum ({e})"
        ) from None
    assert text is not None  # the header is present
    return text
