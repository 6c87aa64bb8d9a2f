"""The robust aggregation rules and norm clipping, pure functions (no I/O).

- ``median``: the coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards
  Optimal Statistical Rates", Definition 1); with an even number of updates the mean of the two middle values.
  Unweighted. Each coordinate stays within the honest values while fewer than half of the updates are hostile.
- ``trimmed_mean``: the coordinate-wise beta-trimmed mean (Yin et al. 2018, Definition 2): per coordinate,
  drop the k = floor(beta * m) largest and k smallest of the m values and average the rest. Unweighted. Each
  coordinate stays within the honest values while at most k updates are hostile.

Norm clipping (Sun et al. 2019, "Can You Really Backdoor Federated Learning?", Section 4): before any rule, an
update w_k whose change from the global model d_k = w_k - w has L2 norm above C is replaced by
w + d_k * C / ||d_k||. Norms are taken over every floating-point tensor of the state_dict (buffers included)
in float64; integer tensors (``num_batches_tracked``) are left as they are.

Every rule keeps each tensor's dtype and shape (integer tensors: the float64 result rounded half to even, the
rule of :mod:`fedrest.aggregation.fedavg`). Both rules sort every coordinate, so their result does not depend
on the order of the updates; each coordinate's result is computed from its m sorted values alone
(:func:`median_of_sorted`, :func:`trimmed_mean_of_sorted`: the kept values are summed one update after another,
not by torch's dim-0 sum, whose rounding depends on the width of the tensor summed), so the same values in blocks
of coordinates (:mod:`.blocks`, what the combiners use) give bit-identical results. Memory of the functions here:
all m updates (m x the model in float64 per tensor); of the blocked rules, O(m x block).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Mapping, Sequence

import torch

from fedrest.aggregation.fedavg import cast_like
from fedrest.serialization import UpdateRejected


class UpdateNormTooLarge(UpdateRejected):
    """An update's change from the global model is larger than the coordinator accepts (MAX_UPDATE_NORM)."""

    error = "update_norm_too_large"


StateDict = Mapping[str, torch.Tensor]


NORM_CHUNK = 1 << 16  # elements of a tensor whose change delta_norm squares at once


def delta_norm(update: StateDict, reference: StateDict) -> float:
    """L2 norm of ``update - reference`` over the floating-point tensors, in float64 (a Python float >= 0).

    Both must have the same keys and shapes (see :func:`fedrest.serialization.check_compatible`). Large tensors
    are taken NORM_CHUNK elements at a time: the float64 copies cost 16 bytes x NORM_CHUNK, not 16 bytes per
    element of the largest tensor (an upload being checked costs about its own size).
    """
    total = 0.0
    for key, ref in reference.items():
        if ref.is_floating_point():
            flat_update, flat_ref = update[key].detach().reshape(-1), ref.detach().reshape(-1)
            for start in range(0, flat_ref.numel(), NORM_CHUNK):
                diff = (flat_update[start:start + NORM_CHUNK].to("cpu", torch.float64)
                        - flat_ref[start:start + NORM_CHUNK].to("cpu", torch.float64))
                total += float(torch.dot(diff, diff))
    return math.sqrt(total)


def clip_update(update: StateDict, reference: StateDict, max_norm: float) -> "tuple[OrderedDict, float]":
    """Scale the change of ``update`` from ``reference`` down to L2 norm ``max_norm`` if it is larger.

    Returns (the clipped state_dict in the original dtypes, the scale applied in (0, 1]).

    Raises
    ------
    ValueError
        If ``max_norm`` is not > 0.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = delta_norm(update, reference)
    if norm <= max_norm:
        return OrderedDict(update), 1.0
    scale = max_norm / norm
    out = OrderedDict()
    for key, value in update.items():
        ref = reference[key]
        if ref.is_floating_point():
            ref64 = ref.detach().to("cpu", torch.float64)
            clipped = ref64 + (value.detach().to("cpu", torch.float64) - ref64) * scale
            out[key] = clipped.to(ref.dtype)
        else:
            out[key] = value
    return out, scale


def median_of_sorted(values: torch.Tensor) -> torch.Tensor:
    """The median of each column of ``values``, an (m, b) float64 tensor sorted along dim 0 (m >= 1): the middle
    row, or for an even m the mean of the two middle rows; a (b,) float64 tensor."""
    m = values.shape[0]
    return values[m // 2].clone() if m % 2 else (values[m // 2 - 1] + values[m // 2]) / 2


def trimmed_mean_of_sorted(values: torch.Tensor, trim: int) -> torch.Tensor:
    """The mean of each column of ``values`` ((m, b) float64, sorted along dim 0) without its ``trim`` smallest and
    ``trim`` largest values (0 <= 2 trim < m); a (b,) float64 tensor. The kept rows are added in order, one at a
    time, so a column's result does not depend on b."""
    m = values.shape[0]
    total = values[trim].clone()
    for row in range(trim + 1, m - trim):
        total += values[row]
    return total / (m - 2 * trim)


def trim_count(trim_fraction: float, m: int) -> int:
    """k = floor(beta * m), the values the trimmed mean drops at each end. Raises ValueError for beta outside
    [0, 0.5)."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    return math.floor(trim_fraction * m)


def _by_coordinate(updates: Sequence[StateDict], reference: StateDict,
                   combine_sorted) -> "OrderedDict[str, torch.Tensor]":
    out = OrderedDict()
    for key, ref in reference.items():
        stacked = torch.stack([u[key].detach().to("cpu", torch.float64).reshape(-1) for u in updates])
        values, _ = torch.sort(stacked, dim=0)
        out[key] = cast_like(combine_sorted(values).reshape(ref.shape), ref)
    return out


def coordinate_median(updates: Sequence[StateDict], reference: StateDict) -> "OrderedDict[str, torch.Tensor]":
    """Coordinate-wise median of ``updates`` (each matching ``reference``), every tensor at once; see the module
    docstring.

    Raises
    ------
    ValueError
        For an empty list.
    """
    if not updates:
        raise ValueError("median of zero updates")
    return _by_coordinate(updates, reference, median_of_sorted)


def trimmed_mean(updates: Sequence[StateDict], reference: StateDict,
                 trim_fraction: float) -> "OrderedDict[str, torch.Tensor]":
    """Coordinate-wise trimmed mean: drop floor(trim_fraction * m) values at each end, average the rest; every
    tensor at once.

    Raises
    ------
    ValueError
        For an empty list or ``trim_fraction`` outside [0, 0.5).
    """
    if not updates:
        raise ValueError("trimmed mean of zero updates")
    k = trim_count(trim_fraction, len(updates))
    return _by_coordinate(updates, reference, lambda values: trimmed_mean_of_sorted(values, k))


__all__ = ["UpdateNormTooLarge", "clip_update", "coordinate_median", "delta_norm", "median_of_sorted", "trim_count",
           "trimmed_mean", "trimmed_mean_of_sorted"]
