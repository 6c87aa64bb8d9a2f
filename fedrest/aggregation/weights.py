"""Bounded influence: how much of a round's FedAvg one node may take, a pure function.

FedAvg weighs update k by its number of training examples n_k (McMahan et al. 2017, Algorithm 1), which the node
itself reports: unbounded, one node claiming 10^9 examples would take a share of 0.999999 of the new global model.
Two bounds make that impossible:

1. The coordinator takes ``min(claimed, registered)`` examples for an update (the number the node registered with;
   :meth:`fedrest.server.federation.Federation.submit_update`).
2. :func:`capped_weights` lowers the largest weights of a round until no update has more than ``max_share`` of
   the round's total (``--max-share``, default 0.5), keeping the order of the others' weights unchanged
   ("water-filling": every weight above a threshold t becomes t, the smallest t for which the share of a capped
   update is exactly ``max_share``). With m updates and ``max_share <= 1/m`` the bound cannot be met (or only
   by equal shares); every update then gets the smallest weight (each share is 1/m).
"""

from __future__ import annotations

import math
from typing import Sequence


def capped_weights(weights: Sequence[float], max_share: float) -> list[float]:
    """``weights`` (each > 0) with the largest lowered so that none is more than ``max_share`` of their sum.

    Parameters
    ----------
    weights : the FedAvg weights n_k of a round's updates, in any order (the result is in the same order).
    max_share : in (0, 1]; 1 leaves the weights as they are.

    Returns
    -------
    Floats w'_k = min(w_k, t); unchanged (as floats) when no share is above ``max_share``.

    Raises
    ------
    ValueError
        For an empty list, a weight that is not a finite number > 0, or ``max_share`` outside (0, 1].
    """
    if not weights:
        raise ValueError("no weights")
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"weights must be finite numbers > 0, got {list(weights)}")
    values = [float(w) for w in weights]
    m = len(values)
    if max(values) <= max_share * sum(values):
        return values
    if max_share * m <= 1:  # the bound cannot be met (or only by equal shares): equal shares
        return [min(values)] * m
    descending = sorted(values, reverse=True)
    rest = sum(values)
    for capped in range(1, m):  # the `capped` largest become t; t = s * (capped * t + rest) solved for t
        rest -= descending[capped - 1]
        threshold = max_share * rest / (1 - capped * max_share)
        if threshold >= descending[capped]:
            return [min(w, threshold) for w in values]
    return [min(values)] * m  # pragma: no cover - unreachable: max_share * m > 1 makes some `capped` < m fit
