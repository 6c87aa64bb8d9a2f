"""FedAvg: the sample-weighted mean of state_dicts, streamed in float64 (one model in memory).

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data", Algorithm 1): the new global model is w = sum_k (n_k / n) * w_k, where n_k is the number of
training examples of update k and n = sum_k n_k.

Rules of :func:`fedavg` and :class:`FedAvgAccumulator`:

- Every key of the state_dict is averaged, buffers included (BatchNorm running statistics too).
- Floating tensors: weighted mean computed in float64, then cast back to the reference dtype.
- Integer and bool tensors (BatchNorm's int64 0-d ``num_batches_tracked``): the same weighted mean in
  float64, rounded to the nearest integer (half to even), cast back to the reference dtype. For
  counters this is the expected count; for bool tensors it is a weighted majority vote.
- Every update must have exactly the reference keys, shapes and dtypes; otherwise
  :class:`UpdateRejected` names the first difference. Floating values must be finite.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable, Mapping

import torch

from fedrest.serialization import UpdateRejected, check_compatible


def cast_like(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The one integer rule of every aggregation: a float64 result back in ``reference``'s dtype, integer and
    bool tensors rounded to the nearest integer first (half to even)."""
    if not (reference.is_floating_point() or reference.is_complex()):
        values = torch.round(values)
    return values.to(reference.dtype)


class FedAvgAccumulator:
    """Streaming sample-weighted average of state_dicts (FedAvg), O(one model) memory.

    Sums ``n_k * w_k`` in float64 as updates arrive, so the updates themselves need not be kept.
    The rules for dtypes are in this module's docstring.

    Parameters
    ----------
    reference : state_dict whose keys, shapes and dtypes every update must match (the global model).
    """

    def __init__(self, reference: Mapping[str, torch.Tensor]) -> None:
        self._reference = OrderedDict((k, v.detach().to("cpu")) for k, v in reference.items())
        self._sums = OrderedDict((k, torch.zeros(v.shape, dtype=torch.float64))
                                 for k, v in self._reference.items())
        self.total_samples = 0
        self.num_updates = 0

    def add(self, update: Mapping[str, torch.Tensor], num_samples: int) -> None:
        """Add one update with weight ``num_samples`` (an int >= 1).

        Raises
        ------
        UpdateRejected
            If the update does not match the reference, or ``num_samples`` is not a positive int.
            Nothing is added then.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise UpdateRejected(f"num_samples must be an integer >= 1, got {num_samples!r}")
        self.add_weighted(update, num_samples)

    def add_weighted(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Add one update with any finite weight > 0 (a bounded weight of :mod:`.weights`). Raises
        :class:`UpdateRejected` as :meth:`add` does, or ValueError for a bad weight; nothing is added then."""
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"a FedAvg weight must be a finite number > 0, got {weight!r}")
        check_compatible(update, self._reference)
        for key, total in self._sums.items():
            total.add_(update[key].detach().to("cpu", torch.float64), alpha=weight)
        self.total_samples += weight
        self.num_updates += 1

    def result(self) -> "OrderedDict[str, torch.Tensor]":
        """The weighted mean, each tensor in its reference dtype and shape.

        Raises
        ------
        ValueError
            If no update was added (there is nothing to average).
        """
        if self.num_updates == 0:
            raise ValueError("FedAvg of zero updates")
        out = OrderedDict()
        for key, total in self._sums.items():
            out[key] = cast_like(total / self.total_samples, self._reference[key])
        return out


def fedavg(updates: Iterable[tuple[Mapping[str, torch.Tensor], int]],
           reference: Mapping[str, torch.Tensor] | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Sample-weighted FedAvg of ``(state_dict, num_samples)`` pairs.

    Parameters
    ----------
    updates : pairs of a state_dict and its number of training examples n_k (int >= 1).
    reference : keys/shapes/dtypes to enforce; defaults to the first update.

    Returns
    -------
    OrderedDict with the reference's keys, shapes and dtypes.

    Raises
    ------
    UpdateRejected
        For a mismatched or non-finite update or a bad ``num_samples``.
    ValueError
        For an empty list of updates.
    """
    acc = None
    for state_dict, num_samples in updates:
        if acc is None:
            acc = FedAvgAccumulator(reference if reference is not None else state_dict)
        acc.add(state_dict, num_samples)
    if acc is None:
        raise ValueError("FedAvg of zero updates")
    return acc.result()
