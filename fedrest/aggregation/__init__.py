"""Aggregation, one home: the strategies the coordinator runs and the pure rules under them.

- :mod:`.strategy`: :class:`Strategy` and :func:`make_strategy` (the coordinator's one entry point): client
  settings, a combining rule, an optional server optimizer, and the server state kept across rounds;
  :func:`aggregate` for updates already in memory.
- :mod:`.combine`: the combining rules (canonical order, loading, clipping, bounded weights).
- :mod:`.server_optimizers`: FedAvgM, FedAdagrad, FedAdam, FedYogi steps along the round's pseudo-gradient.
- :mod:`.weights`: the bound on one node's share of a round.
- :mod:`.fedavg`: FedAvg's streaming float64 accumulator and the one integer-rounding rule.
- :mod:`.rules`: coordinate-wise median, trimmed mean, norm clipping, the L2 norm of an update's change.
"""

from fedrest.aggregation.combine import Aggregate, ClientUpdate, Combiner, make_combiner
from fedrest.aggregation.fedavg import FedAvgAccumulator, cast_like, fedavg
from fedrest.aggregation.rules import (UpdateNormTooLarge, clip_update, coordinate_median, delta_norm,
                                       trimmed_mean)
from fedrest.aggregation.server_optimizers import ServerOptimizer
from fedrest.aggregation.strategy import STRATEGIES, Strategy, aggregate, make_strategy
from fedrest.aggregation.weights import capped_weights

__all__ = ["Aggregate", "ClientUpdate", "Combiner", "FedAvgAccumulator", "STRATEGIES", "ServerOptimizer", "Strategy",
           "UpdateNormTooLarge", "aggregate", "capped_weights", "cast_like", "clip_update", "coordinate_median",
           "delta_norm", "fedavg", "make_combiner", "make_strategy", "trimmed_mean"]
