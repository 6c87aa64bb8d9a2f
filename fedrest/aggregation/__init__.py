"""Aggregation, one home: the strategies the coordinator runs and the pure rules under them.

- :mod:`.strategy`: :class:`Strategy` and :func:`make_strategy` (the coordinator's one entry point), the
  canonical order, loading, clipping; :func:`aggregate` for updates already in memory.
- :mod:`.fedavg`: FedAvg's streaming float64 accumulator and the one integer-rounding rule.
- :mod:`.rules`: coordinate-wise median, trimmed mean, norm clipping, the L2 norm of an update's change.
"""

from fedrest.aggregation.fedavg import FedAvgAccumulator, cast_like, fedavg
from fedrest.aggregation.rules import (UpdateNormTooLarge, clip_update, coordinate_median, delta_norm,
                                       trimmed_mean)
from fedrest.aggregation.strategy import Aggregate, ClientUpdate, Strategy, aggregate, make_strategy

__all__ = ["Aggregate", "ClientUpdate", "FedAvgAccumulator", "Strategy", "UpdateNormTooLarge", "aggregate",
           "cast_like", "clip_update", "coordinate_median", "delta_norm", "fedavg", "make_strategy",
           "trimmed_mean"]
