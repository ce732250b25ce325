"""The sampler wing: :class:`ClusterTPESampler` and the pure pieces it is made of.

Laid out like Optuna's ``optuna/samplers/_tpe/``:

* :mod:`~optuna_ctpe.sampler._sampler`: the sampler protocol (start-up, relative and independent
  sampling, constant liar publishing), the candidates and duplicate avoidance;
* :mod:`~optuna_ctpe.sampler._grouping`: trials -> the good group of l(x), the weighted bad group
  of g(x) and their observation rows;
* :mod:`~optuna_ctpe.sampler._cluster_split`: the k-means (dual-threshold) split of objective
  scores, pure numpy and scikit-learn;
* :mod:`~optuna_ctpe.sampler._parzen`: the Parzen estimator with per-choice priors (our own,
  equal to Optuna 5.0's without priors);
* :mod:`~optuna_ctpe.sampler._truncnorm`: the truncated normal kernels, over ``scipy.special``;
* :mod:`~optuna_ctpe.sampler._known_constraints`: known constraints (functions of the parameters
  alone): the protocol, the candidate filter, the generic repair rule, their recording;
* :mod:`~optuna_ctpe.sampler._feasible`: :class:`KnownConstraintSampler`, known constraints for
  any Optuna sampler.

Nothing here imports torch.
"""

from __future__ import annotations

from optuna_ctpe.sampler._feasible import KnownConstraintSampler
from optuna_ctpe.sampler._grouping import default_max_good
from optuna_ctpe.sampler._known_constraints import KnownConstraint
from optuna_ctpe.sampler._sampler import ClusterTPESampler


__all__ = ["ClusterTPESampler", "KnownConstraint", "KnownConstraintSampler", "default_max_good"]
