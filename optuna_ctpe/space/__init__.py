"""The search-space wing: pure functions on plain records, without torch.

:class:`optuna_ctpe.HessianSearchSpace` is the face; the rooms behind it are

* :mod:`~optuna_ctpe.space.records`: the records (:class:`~optuna_ctpe.space.records.QuantConfig`,
  sensitivities, tensors, the validated :class:`~optuna_ctpe.space.records.SpaceSpec`), their
  validation and the default grids;
* :mod:`~optuna_ctpe.space.params`: Optuna parameter names and configurations <-> parameters;
* :mod:`~optuna_ctpe.space.omega`: HAWQ-V2's sensitivity Ω of a choice;
* :mod:`~optuna_ctpe.space.pruning`: the pruning rule and the prior weights;
* :mod:`~optuna_ctpe.space.size`: size accounting and summed perturbation;
* :mod:`~optuna_ctpe.space.formats`: weight formats (bits, groups, grid, rounding) as named
  records, and their exact stored bits;
* :mod:`~optuna_ctpe.space.warm_start`: the ILP warm starts (bits-only and joint);
* :mod:`~optuna_ctpe.space.budget`: size and latency budgets as known constraints (checked and
  repaired before a trial runs);
* :mod:`~optuna_ctpe.space.io`: versioned JSON and study attributes.

Records travel through JSON and study attributes to machines without torch (a distributed
worker, optuna-dashboard), so nothing here imports it.
"""
