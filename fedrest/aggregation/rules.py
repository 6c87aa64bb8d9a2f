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
on the order of the updates. Memory: they hold all m updates of a round (m x the model in float64 per tensor).
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


def delta_norm(update: StateDict, reference: StateDict) -> float:
    """L2 norm of ``update - reference`` over the floating-point tensors, in float64 (a Python float >= 0).

    Both must have the same keys and shapes (see :func:`fedrest.serialization.check_compatible`).
    """
    total = 0.0
    for key, ref in reference.items():
        if ref.is_floating_point():
            diff = update[key].detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64)
            total += float(torch.dot(diff.reshape(-1), diff.reshape(-1)))
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


def coordinate_median(updates: Sequence[StateDict], reference: StateDict) -> "OrderedDict[str, torch.Tensor]":
    """Coordinate-wise median of ``updates`` (each matching ``reference``); see the module docstring.

    Raises
    ------
    ValueError
        For an empty list.
    """
    if not updates:
        raise ValueError("median of zero updates")
    m = len(updates)
    out = OrderedDict()
    for key, ref in reference.items():
        stacked, _ = torch.sort(torch.stack([u[key].detach().to("cpu", torch.float64) for u in updates]), dim=0)
        if m % 2:
            middle = stacked[m // 2]
        else:
            middle = (stacked[m // 2 - 1] + stacked[m // 2]) / 2
        out[key] = cast_like(middle, ref)
    return out


def trimmed_mean(updates: Sequence[StateDict], reference: StateDict,
                 trim_fraction: float) -> "OrderedDict[str, torch.Tensor]":
    """Coordinate-wise trimmed mean: drop floor(trim_fraction * m) values at each end, average the rest.

    Raises
    ------
    ValueError
        For an empty list or ``trim_fraction`` outside [0, 0.5).
    """
    if not updates:
        raise ValueError("trimmed mean of zero updates")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    m = len(updates)
    k = math.floor(trim_fraction * m)
    out = OrderedDict()
    for key, ref in reference.items():
        stacked, _ = torch.sort(torch.stack([u[key].detach().to("cpu", torch.float64) for u in updates]), dim=0)
        kept = stacked[k:m - k]
        out[key] = cast_like(kept.sum(dim=0) / (m - 2 * k), ref)
    return out


__all__ = ["UpdateNormTooLarge", "clip_update", "coordinate_median", "delta_norm", "trimmed_mean"]
