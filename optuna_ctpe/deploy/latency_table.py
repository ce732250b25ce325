"""HAWQ-V3's latency lookup table: per layer and choice, measured once on the target runtime.

For each quantized layer, each bit-width and each width ratio of the groups that prune it,
:func:`measure_latency_table` times a one-layer ONNX graph: the layer's real weight (from the
width-pruned model) and input shape (captured by a forward hook on ``example_inputs`` repeated
to ``batch`` rows), stored with exactly the operator
:func:`~optuna_ctpe.deploy.onnx.export_onnx` gives it (the same graph surgery,
:func:`~optuna_ctpe.deploy._onnx_graph.quantize_graph`: ``MatMulNBits`` for matrix products at
their container width, ``DequantizeLinear`` for the others). Bit-widths stored in the same
container (3 and 4 bits both in int4, say) run the same graph and are timed once. The float
entry (bits 32) is the layer with a float32 weight.

The rest of the model (activations, pooling, reshapes, the runtime's per-call overhead) is the
*remainder*: the whole FP32 model's time minus the sum of its layers' float entries, clipped at
0. A :class:`LatencyTable` predicts a configuration as ``remainder + sum of its layers'
entries``. How well that predicts timing the whole exported model is measured in
``benchmarks/results/latency_table.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
import json
import statistics
import types
from typing import Any
from typing import TYPE_CHECKING

from optuna_ctpe._validation import check_integer
from optuna_ctpe._validation import check_real
from optuna_ctpe.space.records import HasSpec
from optuna_ctpe.space.records import QuantConfig
from optuna_ctpe.space.records import spec_of
from optuna_ctpe.space.records import SpaceSpec
from optuna_ctpe.space.size import FLOAT_BITS


if TYPE_CHECKING:
    import torch

    from optuna_ctpe.deploy.latency import OrtRuntime


__all__ = ["FLOAT_BITS", "LatencyTable", "LayerLatency", "measure_latency_table"]

# FLOAT_BITS (the bits of a layer's float32 entry) is optuna_ctpe.space.size's, re-exported.
_FORMAT = "optuna-ctpe latency table"
_VERSION = 1

#: An entry's key: (bit-width, the width ratios of the layer's groups in their order).
EntryKey = tuple[int, tuple[float, ...]]


@dataclass(frozen=True)
class LayerLatency:
    """The measured entries of one layer.

    Attributes:
        name: The layer name.
        groups: The width groups that prune the layer's weight (0, 1 or 2), in a fixed order.
        ms: ``(bits, ratios)`` -> milliseconds of the one-layer graph, where ``ratios`` holds
            one width ratio per group of ``groups``; bits :data:`FLOAT_BITS` is float32.
    """

    name: str
    groups: tuple[str, ...]
    ms: Mapping[EntryKey, float] = field(hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        entries = {}
        for (bits, ratios), ms in dict(self.ms).items():
            ratios = tuple(float(r) for r in ratios)
            if len(ratios) != len(self.groups):
                raise ValueError(
                    f"entry {(bits, ratios)!r} of layer {self.name!r} needs one ratio per group "
                    f"of {list(self.groups)}."
                )
            key = (int(bits), ratios)
            entries[key] = check_real(ms, f"entry {key!r} of layer {self.name!r}", minimum=0.0)
        object.__setattr__(self, "ms", types.MappingProxyType(entries))


@dataclass(frozen=True)
class LatencyTable:
    """Per-layer, per-choice latencies on one runtime, and the remainder of the model.

    Example:
        .. code-block:: python

            from optuna_ctpe import HessianSearchSpace
            from optuna_ctpe.deploy.latency_table import LatencyTable, measure_latency_table
            from optuna_ctpe.tasks.digits import digits_task

            task = digits_task(seed=0)
            space = HessianSearchSpace.from_model(
                task.model, task.loss_fn, task.calibration_batches,
                example_inputs=task.example_inputs,
            )
            table = measure_latency_table(space, task.model, task.example_inputs, batch=1)
            print(table.predict(space.uniform(4)), table.fp32_ms, table.noise)
            same = LatencyTable.from_json(table.to_json())

    Attributes:
        layers: Layer name -> its :class:`LayerLatency`.
        remainder_ms: The whole FP32 model's time minus its layers' float entries, >= 0.
        fp32_ms: The whole FP32 model's time.
        batch: Rows of the timed inputs.
        runtime: The runtime and its settings (:meth:`OrtRuntime.describe
            <optuna_ctpe.deploy.latency.OrtRuntime.describe>`: name, onnxruntime version,
            threads).
        noise: The median, over the entries, of their interquartile range over their median.
    """

    layers: Mapping[str, LayerLatency] = field(hash=False)
    remainder_ms: float
    fp32_ms: float
    batch: int
    runtime: Mapping[str, Any] = field(hash=False)
    noise: float

    def __post_init__(self) -> None:
        layers = dict(self.layers)
        for name, layer in layers.items():
            if not isinstance(layer, LayerLatency) or layer.name != name:
                raise ValueError(f"layers[{name!r}] must be the LayerLatency of {name!r}.")
        object.__setattr__(self, "layers", types.MappingProxyType(layers))
        object.__setattr__(self, "runtime", types.MappingProxyType(dict(self.runtime)))
        for name in ("remainder_ms", "fp32_ms", "noise"):
            object.__setattr__(self, name, check_real(getattr(self, name), name, minimum=0.0))
        object.__setattr__(self, "batch", check_integer(self.batch, "batch", minimum=1))

    def predict(self, config: QuantConfig) -> float:
        """Milliseconds of ``config``'s model: the remainder plus each layer's entry.

        Raises:
            ValueError: If ``config`` is not a :class:`QuantConfig`, does not name exactly the
                table's layers, lacks a width group of the table, or asks for a bit-width or
                width ratio the table did not measure.
        """
        if not isinstance(config, QuantConfig):
            raise ValueError(f"config must be a QuantConfig, got {config!r}.")
        if set(config.bits) != set(self.layers):
            raise ValueError(
                f"config.bits must name exactly the table's layers {sorted(self.layers)}, "
                f"got {sorted(config.bits)}."
            )
        total = self.remainder_ms
        for name, layer in self.layers.items():
            missing = [g for g in layer.groups if g not in config.widths]
            if missing:
                raise ValueError(f"config.widths lacks the width groups {missing}.")
            key = (config.bits[name], tuple(float(config.widths[g]) for g in layer.groups))
            if key not in layer.ms:
                raise ValueError(
                    f"the latency table has no entry for layer {name!r} at bits {key[0]} and "
                    f"widths {dict(zip(layer.groups, key[1]))}: measure it with these grids."
                )
            total += layer.ms[key]
        return total

    def to_json(self) -> str:
        """The table as versioned JSON (what :meth:`from_json` reads)."""
        return json.dumps(
            {
                "format": _FORMAT,
                "version": _VERSION,
                "batch": self.batch,
                "runtime": dict(self.runtime),
                "fp32_ms": self.fp32_ms,
                "remainder_ms": self.remainder_ms,
                "noise": self.noise,
                "layers": [
                    {
                        "name": layer.name,
                        "groups": list(layer.groups),
                        "entries": [
                            {"bits": bits, "widths": list(ratios), "ms": ms}
                            for (bits, ratios), ms in layer.ms.items()
                        ],
                    }
                    for layer in self.layers.values()
                ],
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> LatencyTable:
        """The table :meth:`to_json` wrote.

        Raises:
            ValueError: If the text is not JSON, not a latency table, of another version, or
                a field is missing or out of range (named).
        """
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as e:
            raise ValueError(f"a latency table must be JSON text: {e}") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"not a latency table (its 'format' is not {_FORMAT!r}).")
        if data.get("version") != _VERSION:
            raise ValueError(
                f"latency table version {data.get('version')!r} is not supported (this "
                f"optuna-ctpe reads version {_VERSION}); measure the table again."
            )
        try:
            layers = {
                item["name"]: LayerLatency(
                    item["name"],
                    tuple(item["groups"]),
                    {(e["bits"], tuple(e["widths"])): e["ms"] for e in item["entries"]},
                )
                for item in data["layers"]
            }
            return cls(
                layers=layers,
                remainder_ms=data["remainder_ms"],
                fp32_ms=data["fp32_ms"],
                batch=data["batch"],
                runtime=data["runtime"],
                noise=data["noise"],
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"a latency table lacks or garbles the field {e}.") from None


def measure_latency_table(
    space: SpaceSpec | HasSpec,
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    batch: int = 1,
    runtime: OrtRuntime | None = None,
    repeats: int = 200,
    warmup: int = 20,
    opset: int | None = None,
) -> LatencyTable:
    """Measure a :class:`LatencyTable` of ``space`` on ``runtime``.

    Every layer of ``space`` gets an entry for each bit-width of ``space.bits``, 8 bits (the
    uniform 8-bit baseline), its fixed bit-width if any, and float32, and for each combination
    of ``space.widths`` over the groups that prune it, so the table predicts any configuration
    of the space's grids. The entries of one layer at one width are timed interleaved
    (:func:`~optuna_ctpe.deploy.latency.time_calls`), with an ``Identity`` graph whose time
    (the runtime's cost of a call, paid once per model) is taken off each entry, so that the
    machine's load falls on all of a layer's choices alike.

    Args:
        space: The search space, or its :class:`~optuna_ctpe.space.records.SpaceSpec`.
        model: The float model the space was measured on.
        example_inputs: The model's inputs: a tensor, a tuple or a mapping (see
            :func:`~optuna_ctpe.deploy.onnx.export_onnx`).
        batch: Rows of the timed inputs (``example_inputs``' rows repeated), an integer >= 1:
            the batch the latency matters at.
        runtime: Where to time (default: onnxruntime's CPU provider, one thread each).
        repeats: Timed runs per entry, an integer >= 1.
        warmup: Untimed runs per entry first, an integer >= 0.
        opset: The ONNX opset of the graphs (default: :func:`export_onnx`'s).

    Returns:
        The table.

    Raises:
        ValueError: If ``example_inputs`` is None, an argument is out of range, or a layer is
            of a type the table cannot build a one-layer graph for (MultiheadAttention
            projections, embeddings): time whole models with
            :class:`~optuna_ctpe.deploy.latency.ModelTimer` instead.
    """
    from optuna_ctpe.deploy._layer_graph import layer_cells
    from optuna_ctpe.deploy._layer_graph import time_cell
    from optuna_ctpe.deploy.latency import batched_inputs
    from optuna_ctpe.deploy.latency import ModelTimer
    from optuna_ctpe.deploy.latency import OrtRuntime
    from optuna_ctpe.deploy.onnx import DEFAULT_OPSET
    from optuna_ctpe.deploy.onnx import MIN_OPSET

    if example_inputs is None:
        raise ValueError("example_inputs is required: the layers' input shapes come from them.")
    batch = check_integer(batch, "batch", minimum=1)
    repeats = check_integer(repeats, "repeats", minimum=1)
    warmup = check_integer(warmup, "warmup", minimum=0)
    runtime = OrtRuntime() if runtime is None else runtime
    opset = DEFAULT_OPSET if opset is None else check_integer(opset, "opset", minimum=MIN_OPSET)
    spec = spec_of(space)
    cells = layer_cells(spec, model, batched_inputs(example_inputs, batch))
    entries: dict[str, dict[EntryKey, float]] = {name: {} for name in spec.layers}
    groups: dict[str, tuple[str, ...]] = {}
    noises: list[float] = []
    for cell in cells:
        groups[cell.layer] = cell.groups
        # 8 bits always: the uniform 8-bit baseline of reports.
        bits = sorted({*spec.bits, 8, spec.fixed_bits.get(cell.layer, 8)})
        timings, call = time_cell(cell, bits, runtime, opset, repeats=repeats, warmup=warmup)
        for b, timing in timings.items():
            # The call's own cost is paid once per model, in the remainder, not per layer.
            entries[cell.layer][(b, cell.ratios)] = max(0.0, timing.median_ms - call.median_ms)
        noises += [t.noise for t in timings.values()]
    timer = ModelTimer(
        spec, model, example_inputs, batch=batch, runtime=runtime, repeats=repeats, warmup=warmup
    )
    fp32 = timer.fp32()
    noises.append(fp32.noise)
    full = {name: entries[name][(FLOAT_BITS, (1.0,) * len(groups[name]))] for name in entries}
    return LatencyTable(
        layers={n: LayerLatency(n, groups[n], entries[n]) for n in entries},
        remainder_ms=max(0.0, fp32.median_ms - sum(full.values())),
        fp32_ms=fp32.median_ms,
        batch=batch,
        runtime=runtime.describe(),
        noise=statistics.median(noises),
    )
