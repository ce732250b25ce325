"""Packed artifacts: a configured model in one safetensors file, as large as its accounted size.

:func:`save_packed` writes the width-pruned, quantized model of a configuration as one
`safetensors <https://huggingface.co/docs/safetensors>`_ file (no pickle, safe to open from any
source). Each quantized weight is stored as what it is: integers ``q`` of its bit-width,
bit-packed (:mod:`optuna_ctpe.deploy.packing`), and one float32 scale per channel of its
quantization axis, with ``q × scale`` (in float32) equal bit for bit to the fake-quantized
weight of :func:`optuna_ctpe.nn.quantize.quantize_weight` (:mod:`optuna_ctpe.deploy._codec`).
Everything else in the state dict (biases, norms, unsearched layers, buffers) is stored as it
is. The tensors are named

* ``packed/<name>``: the packed integers of a quantized tensor (``uint8``, 1-D);
* ``scales/<name>``: its per-channel scales (``float32``);
* ``tensor/<name>``: any other state-dict entry;

and a tensor shared by several state-dict names (tied weights) is stored once. The header's
``__metadata__`` holds, under the key ``"optuna_ctpe"``, a versioned JSON document
(:data:`SCHEMA`, :data:`SCHEMA_VERSION`): the configuration, the search space's JSON (which
rebuilding the pruned architecture needs), per quantized tensor its layer, bit-width, axis,
shape, dtype and module type, the state-dict shapes of the original model, the aliases of tied
tensors, the user's metadata (metrics, say) and a SHA-256 of the tensors and of the document
itself, checked on loading.

The file's payload (all but the header) is the accounted size
(:meth:`HessianSearchSpace.size <optuna_ctpe.HessianSearchSpace.size>`, which counts the scales)
plus under one byte per quantized tensor for padding, plus any buffers (batch-norm statistics are
not in the accounting). :func:`load_packed` prunes a copy of the original architecture to the
recorded widths, exactly as :meth:`HessianSearchSpace.apply` does, and loads the tensors into
it: the result computes bit for bit what ``space.apply(model, config, example_inputs)`` computes.

**Weight formats** (:mod:`optuna_ctpe.space.formats`): :func:`save_packed_formats` stores a
model with one format per layer, quantized by a
:class:`~optuna_ctpe.nn.formats.FormatQuantizer` (GPTQ's codes are the ones it produced), in a
document of version :data:`FORMATS_SCHEMA_VERSION` (``"formats"`` instead of ``"config"``). Each
quantized weight is stored as (:mod:`optuna_ctpe.deploy._format_codec`)

* ``packed/<name>``: its codes at the format's bits (an asymmetric grid's stored less
  ``2^(bits-1)``);
* ``scales/<name>``: one float32 per channel, or float16 per group;
* ``zeros/<name>``: an asymmetric format's zero points, packed at the format's bits;
* ``float/<name>``: instead of those three, the weight of a float format (``fp16``, ``fp32``);

so the tensors' bytes are :func:`~optuna_ctpe.space.formats.format_bits` summed, plus under a
byte of padding per packed tensor, plus the other tensors (32 bits per parameter, as the
accounting counts them). :func:`load_packed` reads both versions; a file without formats
(version 1, every file of 0.1.x) keeps its meaning: bit-widths on today's per-channel grid.

Requires the ``torch`` and ``deploy`` extras (``safetensors``).
"""

from __future__ import annotations

from collections.abc import Mapping
import copy
from dataclasses import dataclass
import hashlib
import json
import os
from pathlib import Path
import struct
from typing import Any
from typing import TYPE_CHECKING
import uuid

import safetensors
import safetensors.torch
import torch
from torch import nn

from optuna_ctpe.deploy import _format_codec
from optuna_ctpe.deploy._codec import decode
from optuna_ctpe.deploy._codec import encode
from optuna_ctpe.nn.apply import apply_config
from optuna_ctpe.nn.layers import resolve_layers
from optuna_ctpe.nn.quantize import resolve_quantized_layers
from optuna_ctpe.space import io
from optuna_ctpe.space.checks import check_config
from optuna_ctpe.space.formats import as_format
from optuna_ctpe.space.formats import format_bits
from optuna_ctpe.space.formats import parse_format
from optuna_ctpe.space.formats import WeightFormat
from optuna_ctpe.space.records import HasSpec
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import SpaceSpec
from optuna_ctpe.space.records import spec_of
from optuna_ctpe.space.size import fp32_bits
from optuna_ctpe.space.size import size_bits


if TYPE_CHECKING:
    from optuna_ctpe.nn.formats import FormatQuantizer


__all__ = [
    "FORMATS_SCHEMA_VERSION",
    "SCHEMA",
    "SCHEMA_VERSION",
    "PackedFile",
    "load_packed",
    "read_packed_metadata",
    "save_packed",
    "save_packed_formats",
]

#: The ``schema`` of the metadata document.
SCHEMA = "optuna-ctpe/packed-model"
#: The version :func:`save_packed` writes (bit-widths on the per-channel grid; 0.1.x's files).
SCHEMA_VERSION = 1
#: The version :func:`save_packed_formats` writes (a weight format per layer).
FORMATS_SCHEMA_VERSION = 2
#: The ``__metadata__`` key holding the document.
METADATA_KEY = "optuna_ctpe"
# What a reader needs of the document.
_DOCUMENT_FIELDS = {
    SCHEMA_VERSION: (
        "config",
        "quantized",
        "aliases",
        "original_shapes",
        "metadata",
        "search_space",
        "sha256",
    ),
    FORMATS_SCHEMA_VERSION: (
        "formats",
        "quantized",
        "aliases",
        "original_shapes",
        "metadata",
        "sha256",
    ),
}


@dataclass(frozen=True)
class PackedFile:
    """A packed artifact on disk and the sizes it is compared with.

    Attributes:
        path: The file.
        file_bytes: Its size.
        header_bytes: Its header: the 8-byte length and the JSON (tensor index and metadata).
        accounted_bytes: The configuration's accounted size, ``space.size(config) / 8``.
        fp32_bytes: The unpruned float32 model's accounted size, ``space.fp32_bits / 8``.
    """

    path: Path
    file_bytes: int
    header_bytes: int
    accounted_bytes: float
    fp32_bytes: float

    @property
    def payload_bytes(self) -> int:
        """The tensors' bytes, the file without its header."""
        return self.file_bytes - self.header_bytes

    @property
    def compression_ratio(self) -> float:
        """The float32 model's size over the whole file's."""
        return self.fp32_bytes / self.file_bytes


def save_packed(
    space: SpaceSpec | HasSpec,
    model: nn.Module,
    config: QuantConfig,
    path: str | os.PathLike[str],
    *,
    example_inputs: Any = None,
    metadata: Mapping[str, Any] | None = None,
    configured: nn.Module | None = None,
) -> PackedFile:
    """Write ``space.apply(model, config, example_inputs)`` as a packed safetensors file.

    Example:
        .. code-block:: python

            from optuna_ctpe import HessianSearchSpace
            from optuna_ctpe.deploy import load_packed, save_packed
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task()
            space = HessianSearchSpace.from_model(
                task.model, task.loss_fn, task.calibration_batches,
                example_inputs=task.example_inputs, max_probes=20,
            )
            config = space.uniform(4, 0.75)
            packed = save_packed(space, task.model, config, "digits.safetensors",
                                 example_inputs=task.example_inputs)
            print(packed.file_bytes, packed.accounted_bytes)
            net = load_packed("digits.safetensors", task.model,
                              example_inputs=task.example_inputs)
            task.evaluate(net)  # exactly task.evaluate(space.apply(task.model, config, ...))

    Args:
        space: The search space ``config`` belongs to, or its
            :class:`~optuna_ctpe.space.records.SpaceSpec`.
        model: The original float model the space was measured on (not modified).
        config: The configuration to store.
        path: The file to write (replaced atomically if it exists).
        example_inputs: Inputs for dependency tracing; required when a width is below 1.
        metadata: JSON-serialisable mapping stored with the model (metrics, provenance).
        configured: The configured model to store instead of ``space.apply``'s, e.g. after
            quantization-aware fine-tuning; it must have the pruned shapes and quantized weights
            (each channel an integer multiple of one float32 scale).

    Returns:
        The file and its sizes.

    Raises:
        ValueError: If ``config`` does not fit ``space``, ``model`` is not the measured model,
            ``metadata`` is not a JSON-serialisable mapping, ``configured`` has other shapes
            than the pruned model, a quantized weight is not integers times per-channel scales,
            or a state-dict entry is not a plain tensor.
    """
    spec = spec_of(space)
    accounted = size_bits(spec, check_config(spec, config))
    document_metadata = _checked_metadata(metadata)
    if configured is None:
        net = apply_config(spec, model, config, example_inputs)
    else:
        net = configured
        reference = apply_config(spec, model, config, example_inputs, quantize=False)
        _check_shapes(_shapes(reference), _shapes(net), "the pruned model", "configured")
    tensors, quantized, aliases = _encode(net, config)
    document = {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "config": {"bits": dict(config.bits), "widths": dict(config.widths)},
        "quantized": quantized,
        "aliases": aliases,
        "original_shapes": _shapes(model),
        "metadata": document_metadata,
        "search_space": json.loads(io.to_json(spec)),
    }
    document["sha256"] = _sha256(tensors, document)
    out = Path(path)
    _atomic_save(tensors, {"format": "pt", METADATA_KEY: json.dumps(document)}, out)
    return PackedFile(
        path=out,
        file_bytes=out.stat().st_size,
        header_bytes=_header_bytes(out),
        accounted_bytes=accounted / 8,
        fp32_bytes=fp32_bits(spec) / 8,
    )


def load_packed(
    path: str | os.PathLike[str], model: nn.Module, *, example_inputs: Any = None
) -> nn.Module:
    """The model :func:`save_packed` or :func:`save_packed_formats` wrote to ``path``, rebuilt
    on ``model``'s architecture.

    A file of :func:`save_packed_formats` is loaded into a copy of ``model`` (no pruning): its
    weights are what :func:`~optuna_ctpe.nn.formats.formats_in_place` put in, bit for bit.
    Otherwise a copy of ``model`` is pruned to the recorded widths as
    :meth:`HessianSearchSpace.apply` prunes it, and the file's tensors (the quantized weights
    unpacked and multiplied by their scales in float32) are loaded into it. ``model``'s own
    weights do not matter and it is not modified.

    Args:
        path: The ``.safetensors`` file.
        model: An instance of the original float architecture.
        example_inputs: Inputs for dependency tracing; required when a recorded width is
            below 1.

    Returns:
        The pruned, quantized model, in eval mode.

    Raises:
        ValueError: If the file is not a readable safetensors file, is truncated or corrupted
            (its checksum fails), is not a packed artifact of a supported version, or
            ``model`` does not match it (the message names the tensor and both shapes, or the
            layer and both module types).
    """
    document, tensors = _read(Path(path))
    if document["version"] == FORMATS_SCHEMA_VERSION:
        return _load_formats(document, tensors, model)
    spec = io.from_json(document["search_space"])
    config = QuantConfig(document["config"]["bits"], document["config"]["widths"])
    _check_shapes(document["original_shapes"], _shapes(model), "the artifact", "model")
    net = apply_config(spec, model, config, example_inputs, quantize=False)
    modules = dict(net.named_modules())
    state: dict[str, torch.Tensor] = {}
    for key, info in document["quantized"].items():
        _check_module_type(modules, info)
        dtype = getattr(torch, info["dtype"])
        scale = tensors[f"scales/{key}"]
        packed = tensors[f"packed/{key}"]
        state[key] = decode(packed, scale, info["bits"], info["axis"], info["shape"], dtype)
    return _loaded(net, state, tensors, document)


def save_packed_formats(
    model: nn.Module,
    formats: Mapping[str, WeightFormat | str | int],
    quantizer: FormatQuantizer,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> PackedFile:
    """Write ``model`` with each named layer's weight in its format as a packed safetensors
    file (see the module docstring), which :func:`load_packed` reads back bit for bit.

    The weights are ``quantizer``'s (:meth:`FormatQuantizer.codes
    <optuna_ctpe.nn.formats.FormatQuantizer.codes>`): what
    :func:`~optuna_ctpe.nn.formats.formats_in_place` ``(model, formats, quantizer)`` computes
    with, GPTQ's codes included, each (layer, format) computed once.

    Example:
        .. code-block:: python

            import torch
            from optuna_ctpe.deploy import load_packed, save_packed_formats
            from optuna_ctpe.nn.formats import FormatQuantizer

            model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                        torch.nn.Linear(32, 4))
            batches = [torch.randn(16, 64) for _ in range(4)]
            quantizer = FormatQuantizer(model, calibration_batches=batches)
            formats = {"0": "int3-g32-asym-gptq", "2": "int4-pc-sym-rtn"}
            packed = save_packed_formats(model, formats, quantizer, "net.safetensors")
            net = load_packed("net.safetensors", model)

    Args:
        model: The float model ``quantizer`` was built on (not modified).
        formats: Layer name -> format (a :class:`~optuna_ctpe.space.formats.WeightFormat`,
            its name, or a bit-width meaning the legacy format). Layers not named are stored
            as they are (float).
        quantizer: The store of quantized weights.
        path: The file to write (replaced atomically if it exists).
        metadata: JSON-serialisable mapping stored with the model (metrics, provenance).

    Returns:
        The file and its sizes; ``accounted_bytes`` is
        :func:`~optuna_ctpe.space.formats.format_bits` of each named layer plus 32 bits per
        element of every other parameter (buffers are stored but not counted), over 8.

    Raises:
        ValueError: If ``quantizer`` belongs to another model, on unknown layer names, bad
            formats, tied layers given different formats, ``metadata`` that is not a
            JSON-serialisable mapping, or a state-dict entry that is not a plain tensor.
    """
    if quantizer.model is not model:
        raise ValueError("quantizer was built on another model.")
    if not isinstance(formats, Mapping):
        raise ValueError(f"formats must be a mapping of layer names to formats, got {formats!r}.")
    checked = {n: as_format(f, f"formats[{n!r}]") for n, f in formats.items()}
    layers = resolve_layers(model, list(checked), "formats")
    document_metadata = _checked_metadata(metadata)
    by_id: dict[int, tuple[Any, WeightFormat]] = {}
    for name, layer in layers.items():
        previous = by_id.setdefault(id(layer.weight), (layer, checked[name]))
        if previous[1] != checked[name]:
            raise ValueError(
                f"formats gives the tied layers {previous[0].name!r} and {name!r} the formats "
                f"{previous[1].name!r} and {checked[name].name!r}; a tied weight is stored once."
            )
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict[str, Any]] = {}
    aliases: dict[str, str] = {}
    first_key: dict[int, str] = {}
    accounted = 0
    params = {id(p) for p in model.parameters()}
    for key, value in _plain_state(model).items():
        if id(value) in first_key:  # a tied tensor: stored once
            aliases[key] = first_key[id(value)]
            continue
        first_key[id(value)] = key
        if id(value) not in by_id:
            tensors[f"tensor/{key}"] = value.detach().cpu().contiguous().clone()
            accounted += 32 * value.numel() if id(value) in params else 0
            continue
        layer, fmt = by_id[id(value)]
        rows = value.shape[layer.out_axis] if value.dim() > 1 else value.numel()
        accounted += format_bits(fmt, rows, max(value.numel() // max(rows, 1), 1))
        if fmt.quantized:
            codes, fit = quantizer.codes(layer, fmt)
            for part, tensor in _format_codec.encode(codes, fit, fmt).items():
                tensors[f"{part}/{key}"] = tensor
        else:
            tensors[f"float/{key}"] = _format_codec.encode_float(quantizer.get(layer, fmt), fmt)
        quantized[key] = {
            "layer": layer.name,
            "format": fmt.name,
            "axis": layer.out_axis,
            "shape": list(value.shape),
            "dtype": str(value.dtype).removeprefix("torch."),
            "module": type(layer.module).__name__,
            "module_name": layer.module_name,
        }
    document = {
        "schema": SCHEMA,
        "version": FORMATS_SCHEMA_VERSION,
        "formats": {name: fmt.name for name, fmt in checked.items()},
        "quantized": quantized,
        "aliases": aliases,
        "original_shapes": _shapes(model),
        "metadata": document_metadata,
    }
    document["sha256"] = _sha256(tensors, document)
    out = Path(path)
    _atomic_save(tensors, {"format": "pt", METADATA_KEY: json.dumps(document)}, out)
    fp32 = 32 * sum(p.numel() for p in model.parameters())
    return PackedFile(
        path=out,
        file_bytes=out.stat().st_size,
        header_bytes=_header_bytes(out),
        accounted_bytes=accounted / 8,
        fp32_bytes=fp32 / 8,
    )


def _load_formats(
    document: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module
) -> nn.Module:
    """The model of a :func:`save_packed_formats` file, on a copy of ``model``."""
    _check_shapes(document["original_shapes"], _shapes(model), "the artifact", "model")
    net = copy.deepcopy(model)
    modules = dict(net.named_modules())
    state: dict[str, torch.Tensor] = {}
    for key, info in document["quantized"].items():
        _check_module_type(modules, info)
        fmt = parse_format(info["format"])
        stored = {
            part: tensors[f"{part}/{key}"]
            for part in ("packed", "scales", "zeros", "float")
            if f"{part}/{key}" in tensors
        }
        dtype = getattr(torch, info["dtype"])
        state[key] = _format_codec.decode(stored, fmt, info["shape"], info["axis"], dtype)
    return _loaded(net, state, tensors, document)


def _check_module_type(modules: Mapping[str, nn.Module], info: Mapping[str, Any]) -> None:
    """The model's module of a stored weight must be of the type the file recorded."""
    module = modules.get(info["module_name"])
    if type(module).__name__ != info["module"]:
        raise ValueError(
            f"layer {info['layer']!r} is a {type(module).__name__} in model, but the "
            f"artifact stores a {info['module']}."
        )


def _loaded(
    net: nn.Module,
    state: dict[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    document: Mapping[str, Any],
) -> nn.Module:
    """``net`` with the decoded weights in ``state``, the file's float tensors and its tied
    aliases loaded, in eval mode; the shapes are checked against the model first."""
    for name, tensor in tensors.items():
        if name.startswith("tensor/"):
            state[name.removeprefix("tensor/")] = tensor
    for alias, key in document["aliases"].items():
        state[alias] = state[key]
    _check_shapes(
        {k: list(v.shape) for k, v in state.items()}, _shapes(net), "the artifact", "the model"
    )
    net.load_state_dict(state)
    return net.eval()


def read_packed_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata document of a packed artifact (configuration, search space, the user's
    metadata), read from its header without loading or checking the tensors.

    Raises:
        ValueError: If the file is not a readable packed artifact of a supported version.
    """
    return _document(_open(Path(path)), Path(path))


# -- writing ---------------------------------------------------------------------------------


def _checked_metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a mapping or None, got {metadata!r}.")
    try:
        return json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serialisable: {e}") from None


def _plain_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """``net``'s state dict with its parameters themselves (their identity reveals ties)."""
    state = net.state_dict(keep_vars=True)
    for name, v in state.items():
        if not isinstance(v, torch.Tensor) or v.layout != torch.strided or v.is_quantized:
            raise ValueError(
                f"state-dict entry {name!r} ({type(v).__name__}) is not a dense tensor, the "
                "only kind the packed format stores."
            )
    return state


def _encode(
    net: nn.Module, config: QuantConfig
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], dict[str, str]]:
    """The file's tensors, the description of each quantized one, and the tied aliases."""
    checked, layers = resolve_quantized_layers(net, config.bits)
    by_id = {id(layers[n].weight): layers[n] for n in checked}
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict[str, Any]] = {}
    aliases: dict[str, str] = {}
    first_key: dict[int, str] = {}
    for key, value in _plain_state(net).items():
        if id(value) in first_key:  # a tied tensor: stored once
            aliases[key] = first_key[id(value)]
            continue
        first_key[id(value)] = key
        layer = by_id.get(id(value))
        if layer is None:
            tensors[f"tensor/{key}"] = value.detach().cpu().contiguous().clone()
            continue
        bits = checked[layer.name]
        packed, scale = encode(layer.name, value, bits, layer.out_axis)
        tensors[f"packed/{key}"], tensors[f"scales/{key}"] = packed, scale
        quantized[key] = {
            "layer": layer.name,
            "bits": bits,
            "axis": layer.out_axis,
            "shape": list(value.shape),
            "dtype": str(value.dtype).removeprefix("torch."),
            "module": type(layer.module).__name__,
            "module_name": layer.module_name,
        }
    return tensors, quantized, aliases


def _sha256(tensors: Mapping[str, torch.Tensor], document: Mapping[str, Any]) -> str:
    """SHA-256 over the document (but this digest) and every tensor's name, dtype, shape and
    bytes, in name order. A JSON round trip keeps the document's canonical form."""
    digest = hashlib.sha256()
    described = {k: v for k, v in document.items() if k != "sha256"}
    digest.update(json.dumps(described, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    # A temporary file in the same folder, renamed: a reader never sees a half-written file.
    # Written from bytes: safetensors' save_file would leave the artifact readable by its owner
    # only (mode 0600).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(safetensors.torch.save(tensors, metadata=metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _header_bytes(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


# -- reading ---------------------------------------------------------------------------------


def _open(path: Path) -> Any:
    try:
        return safetensors.safe_open(str(path), framework="pt")
    except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {e}"
        ) from None


def _document(handle: Any, path: Path) -> dict[str, Any]:
    text = (handle.metadata() or {}).get(METADATA_KEY)
    if text is None:
        raise ValueError(f"{path} is a safetensors file but not an optuna-ctpe packed model.")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its optuna-ctpe metadata is not valid JSON ({e}).") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not an optuna-ctpe packed model (schema {SCHEMA!r}).")
    if type(document.get("version")) is not int or document["version"] not in _DOCUMENT_FIELDS:
        raise ValueError(
            f"{path} has packed-model schema version {document.get('version')!r}; this "
            f"optuna-ctpe reads versions {sorted(_DOCUMENT_FIELDS)}."
        )
    missing = [k for k in _DOCUMENT_FIELDS[document["version"]] if k not in document]
    if missing:
        raise ValueError(f"{path}: its optuna-ctpe metadata lacks the fields {missing}.")
    return document


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked document and tensors of a packed artifact."""
    handle = _open(path)
    document = _document(handle, path)
    try:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (safetensors.SafetensorError, RuntimeError, OSError) as e:
        raise ValueError(f"{path}: its tensors cannot be read (corrupted?): {e}") from None
    if _sha256(tensors, document) != document.get("sha256"):
        raise ValueError(
            f"{path} fails its checksum: its tensors or metadata are not those that were "
            "written (a corrupted or edited file)."
        )
    return document, tensors


def _shapes(net: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in net.state_dict().items()}


def _check_shapes(
    expected: Mapping[str, list[int]], actual: Mapping[str, list[int]], source: str, target: str
) -> None:
    """Refuse a model whose state-dict names or shapes differ from the ones expected."""
    missing = [n for n in expected if n not in actual]  # in state-dict order
    extra = [n for n in actual if n not in expected]
    if missing or extra:
        parts = [f"{target} lacks {_some(missing)}"] if missing else []
        parts += [f"has {_some(extra)}, which {source} does not"] if extra else []
        raise ValueError(f"{target} does not match {source}: {' and '.join(parts)}.")
    for name, shape in expected.items():
        if list(actual[name]) != list(shape):
            raise ValueError(
                f"tensor {name!r} has shape {tuple(actual[name])} in {target}, but "
                f"{tuple(shape)} in {source}: not the architecture it was written for."
            )


def _some(names: list[str]) -> str:
    """The first few of ``names``, and how many there are."""
    head = ", ".join(repr(n) for n in names[:4])
    return head if len(names) <= 4 else f"{head} and {len(names) - 4} more"
