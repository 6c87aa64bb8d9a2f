"""Aggregation rules for the global model, pure functions (no I/O): FedAvg and two robust rules.

- ``fedavg``: the sample-weighted mean of McMahan et al. 2017 (Algorithm 1), computed by
  :class:`utils.FedAvgAccumulator` in float64.
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

Every rule keeps each tensor's dtype and shape (integer tensors: the float64 result rounded half to even).
The result does not depend on the order of the updates, bit for bit: the robust rules sort every coordinate,
and :func:`aggregate` feeds FedAvg in a canonical order (by content digest), so a run is reproducible.
Memory: ``median`` and ``trimmed_mean`` hold all m updates of a round (m x the model in float64 per tensor);
``fedavg`` streams them (one model).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Mapping, Sequence

import torch

from utils import FedAvgAccumulator, UpdateRejected, check_compatible

RULES = ("fedavg", "median", "trimmed_mean")


class UpdateNormTooLarge(UpdateRejected):
    """An update's change from the global model is larger than the coordinator accepts (MAX_UPDATE_NORM)."""

StateDict = Mapping[str, torch.Tensor]


def delta_norm(update: StateDict, reference: StateDict) -> float:
    """L2 norm of ``update - reference`` over the floating-point tensors, in float64 (a Python float >= 0).

    Both must have the same keys and shapes (see :func:`utils.check_compatible`).
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


def _cast_like(values: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if not (ref.is_floating_point() or ref.is_complex()):
        values = torch.round(values)
    return values.to(ref.dtype)


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
        out[key] = _cast_like(middle, ref)
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
        out[key] = _cast_like(kept.sum(dim=0) / (m - 2 * k), ref)
    return out


def _digest(state_dict: StateDict) -> bytes:
    h = hashlib.sha256()
    for key, value in state_dict.items():
        h.update(key.encode("utf-8", "surrogatepass"))
        h.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def aggregate(updates: Sequence[tuple[StateDict, int]], reference: StateDict, rule: str = "fedavg", *,
              trim_fraction: float = 0.1, clip_norm: float = 0.0) -> "OrderedDict[str, torch.Tensor]":
    """The new global model from ``(state_dict, num_samples)`` pairs by ``rule`` (see the module docstring).

    Parameters
    ----------
    updates : each state_dict must match ``reference``'s keys, shapes and dtypes and be finite; num_samples
        is an int >= 1 (the weight of FedAvg; the robust rules are unweighted).
    reference : the current global model (the base of clipping, and the keys/shapes/dtypes to keep).
    rule : one of :data:`RULES`.
    trim_fraction : beta of ``trimmed_mean``.
    clip_norm : clip every update's change to this L2 norm first (0: no clipping).

    Raises
    ------
    UpdateRejected
        For an update that does not match ``reference``, or a bad num_samples.
    ValueError
        For an unknown rule or an empty list of updates.
    """
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; one of {', '.join(RULES)}")
    if not updates:
        raise ValueError(f"{rule} of zero updates")
    prepared = []
    for state_dict, num_samples in updates:
        check_compatible(state_dict, reference)
        if clip_norm > 0:
            state_dict, _ = clip_update(state_dict, reference, clip_norm)
        prepared.append((state_dict, num_samples))
    if rule == "median":
        return coordinate_median([sd for sd, _ in prepared], reference)
    if rule == "trimmed_mean":
        return trimmed_mean([sd for sd, _ in prepared], reference, trim_fraction)
    acc = FedAvgAccumulator(reference)
    for state_dict, num_samples in sorted(prepared, key=lambda p: (_digest(p[0]), p[1])):
        acc.add(state_dict, num_samples)
    return acc.result()


__all__ = ["RULES", "UpdateNormTooLarge", "UpdateRejected", "aggregate", "clip_update", "coordinate_median", "delta_norm",
           "trimmed_mean"]
