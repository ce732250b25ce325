"""optuna-ctpe: a cluster-based TPE sampler for Optuna and Hessian-aware quantization search.

The sampler core needs only numpy, scipy, scikit-learn and Optuna. Everything that needs torch
(sensitivities, quantization, width pruning, :class:`HessianSearchSpace` built from a model) is
imported lazily, so ``import optuna_ctpe`` never imports torch.
"""

from __future__ import annotations

from typing import Any

from optuna_ctpe.sampler import ClusterTPESampler


__version__ = "0.1.0"
__all__ = ["ClusterTPESampler", "HessianSearchSpace", "__version__"]


def __getattr__(name: str) -> Any:
    # PEP 562: keep torch-backed names importable from the top level without importing torch
    # until a user actually asks for them.
    if name == "HessianSearchSpace":
        from optuna_ctpe.search_space import HessianSearchSpace

        return HessianSearchSpace
    raise AttributeError(f"module 'optuna_ctpe' has no attribute {name!r}")
