"""The deploy wing: a chosen configuration -> artifacts that run outside the search.

* :mod:`~optuna_ctpe.deploy.packing`: signed integers of 2 to 16 bits <-> a packed byte stream
  (pure numpy);
* :mod:`~optuna_ctpe.deploy.artifact`: :func:`save_packed` / :func:`load_packed`, the
  width-pruned, quantized model in one safetensors file whose size is the accounted size, and
  its bit-exact loader; :func:`save_packed_formats`, a model with a weight format per layer;
* :mod:`~optuna_ctpe.deploy.onnx`: :func:`export_onnx`, the model as an ONNX graph with
  ``MatMulNBits`` and ``DequantizeLinear`` weights that onnxruntime runs on CPU;
* :mod:`~optuna_ctpe.deploy.torchao`: :func:`torchao_config` / :func:`quantize_with_torchao`,
  a configuration as torchao's per-layer ``FqnToConfig``, for GPU users;
* :mod:`~optuna_ctpe.deploy.latency` and :mod:`~optuna_ctpe.deploy.latency_table`: latency on
  onnxruntime's CPU provider, of whole exported models (:class:`ModelTimer`) or predicted by a
  per-layer lookup table (:func:`measure_latency_table`, :class:`LatencyTable`);
  :mod:`~optuna_ctpe.deploy.torch_runtime`: :class:`TorchRuntime`, whole torchao models timed
  in PyTorch (CUDA when there is a GPU, else the CPU);
  :mod:`~optuna_ctpe.deploy.latency_meter`: :class:`LatencyMeter`, a configuration's latency
  as one number for an objective (a table's prediction, or its model timed).

Names are imported lazily (PEP 562): ``import optuna_ctpe.deploy`` imports neither torch nor
any exporter's dependencies until a name is used. Requires the ``torch`` and ``deploy`` extras.
"""

from __future__ import annotations

import importlib
from typing import Any


# Public name -> the module that defines it.
_LAZY = {
    "LatencyMeter": "optuna_ctpe.deploy.latency_meter",
    "LatencyTable": "optuna_ctpe.deploy.latency_table",
    "ModelTimer": "optuna_ctpe.deploy.latency",
    "OnnxExport": "optuna_ctpe.deploy.onnx",
    "OrtRuntime": "optuna_ctpe.deploy.latency",
    "PackedFile": "optuna_ctpe.deploy.artifact",
    "TorchRuntime": "optuna_ctpe.deploy.torch_runtime",
    "export_onnx": "optuna_ctpe.deploy.onnx",
    "load_packed": "optuna_ctpe.deploy.artifact",
    "measure_latency_table": "optuna_ctpe.deploy.latency_table",
    "quantize_with_torchao": "optuna_ctpe.deploy.torchao",
    "read_packed_metadata": "optuna_ctpe.deploy.artifact",
    "save_packed": "optuna_ctpe.deploy.artifact",
    "save_packed_formats": "optuna_ctpe.deploy.artifact",
    "torchao_config": "optuna_ctpe.deploy.torchao",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optuna_ctpe.deploy' has no attribute {name!r}")
