"""The torch wing: measuring a model into search-space records, and applying a configuration.

* :mod:`~optuna_ctpe.nn.sensitivity`: per-layer Hessian (Hutchinson), empirical-Fisher,
  Gauss-Newton and split (Gauss-Newton plus residual) traces (:mod:`~optuna_ctpe.nn.hutchinson`,
  :mod:`~optuna_ctpe.nn.fisher`, :mod:`~optuna_ctpe.nn.ggn`, :mod:`~optuna_ctpe.nn.split`);
* :mod:`~optuna_ctpe.nn.quantize`: fake quantization, size and BOPs accounting;
* :mod:`~optuna_ctpe.nn.grids`: the integer grids of weight formats (scales, zero points,
  codes, round to nearest), :mod:`~optuna_ctpe.nn.gptq`: GPTQ's error-correcting rounding, and
  :mod:`~optuna_ctpe.nn.formats`: each (layer, format) quantized once per search, and a format
  per layer in place for a block;
* :mod:`~optuna_ctpe.nn.width`: dependency-aware width groups and structured pruning, with
  attention heads as units (:mod:`~optuna_ctpe.nn.heads`);
* :mod:`~optuna_ctpe.nn.measure`: a model -> the records a
  :class:`~optuna_ctpe.HessianSearchSpace` is built from;
* :mod:`~optuna_ctpe.nn.apply`: a configuration -> a pruned, quantized copy of a model, or the
  model itself quantized in place for a block (with a cache of quantized weights);
* :mod:`~optuna_ctpe.nn.layers`: the supported layer types (each with its output-channel axis),
  how layers are named, and the mode-preserving context.

* :mod:`~optuna_ctpe.nn.width_calibration`: width choices priced by their measured loss
  increase, and a configuration's measured loss increase;
* :mod:`~optuna_ctpe.nn.finetune`: quantization-aware fine-tuning of a configured model.

Every module here imports torch; this package's ``__init__`` does not, so that importing a
sibling never costs more than it needs, and the names of the estimators (which the command
line's parser offers before torch is imported) live here. Requires the ``torch`` extra.
"""

from __future__ import annotations

from typing import Any
from typing import get_args
from typing import Literal


__all__ = ["ESTIMATOR_NAMES", "EstimatorName", "fused_layer_sets"]

#: The names ``HessianSearchSpace.from_model(estimator=)`` and ``--estimator`` take, ``"auto"``
#: (:func:`optuna_ctpe.nn.sensitivity.resolve_estimator`) or one of the four estimators of
#: :data:`optuna_ctpe.nn.sensitivity.ESTIMATORS`.
EstimatorName = Literal["auto", "hutchinson", "fisher", "ggn", "split"]

#: Every estimator name, ``"auto"`` first (the one registry of them).
ESTIMATOR_NAMES: tuple[str, ...] = get_args(EstimatorName)


def __getattr__(name: str) -> Any:
    # ``optuna_ctpe.nn.fused_layer_sets`` without importing torch on ``import optuna_ctpe.nn``.
    if name == "fused_layer_sets":
        from optuna_ctpe.nn.heads import fused_layer_sets

        return fused_layer_sets
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
