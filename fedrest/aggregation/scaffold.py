"""SCAFFOLD's control variates (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", Algorithm 1 with option II), as pure functions of tensors: the worker's half and the coordinator's.

Every client i keeps a control variate c_i, the coordinator keeps the global one c (both start at 0, one tensor
per model parameter). In a round, a sampled client starts from the global model x and takes K local steps whose
gradient is corrected by (c - c_i) (:func:`gradient_correction`): g_i(y) - c_i + c. It then updates its control
variate from the distance it moved (:func:`next_local_control`, option II)

    c_i+ = c_i - c + (x - y) / (K * eta_l)

and sends its model y with the change Delta c_i = c_i+ - c_i. The coordinator averages the models as FedAvg
does (with the global learning rate 1) and moves the global control variate by

    c <- c + (1 / N) * sum over the round's clients of Delta c_i        (:func:`next_global_control`)

with N the number of clients of the federation (the registered nodes that are not banned).

Local momentum: with heavy-ball SGD of momentum beta (the built-in loop's default is 0.9), steady progress
along a gradient g moves y by K * eta_l * g / (1 - beta), so option II divides the distance by K * eta_l /
(1 - beta) (with beta = 0 it is the paper's formula).

Everything is computed in float64 and returned in the parameters' dtypes; nothing given is changed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping

import torch

Tensors = Mapping[str, torch.Tensor]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def gradient_correction(global_control: Tensors, local_control: Tensors) -> "OrderedDict[str, torch.Tensor]":
    """c - c_i for each parameter: what the worker adds to every local gradient (in c's dtypes)."""
    return OrderedDict((k, (_f64(c) - _f64(local_control[k])).to(c.dtype)) for k, c in global_control.items())


def next_local_control(local_control: Tensors, global_control: Tensors, start: Tensors, end: Tensors,
                       steps: int, learning_rate: float, momentum: float = 0.0
                       ) -> "tuple[OrderedDict[str, torch.Tensor], OrderedDict[str, torch.Tensor]]":
    """The worker's new control variate c_i+ (option II) and its change Delta c_i = c_i+ - c_i.

    Parameters
    ----------
    local_control, global_control : c_i and c, one tensor per parameter.
    start, end : the parameters x before and y after the round's local training (same keys).
    steps : K, the optimizer steps taken (>= 1).
    learning_rate, momentum : the local SGD's eta_l > 0 and beta in [0, 1).

    Raises
    ------
    ValueError
        For steps < 1, eta_l <= 0 or beta outside [0, 1).
    """
    if steps < 1 or not learning_rate > 0 or not 0 <= momentum < 1:
        raise ValueError(f"need steps >= 1, learning_rate > 0 and momentum in [0, 1); got {steps}, "
                         f"{learning_rate}, {momentum}")
    scale = (1.0 - momentum) / (steps * learning_rate)
    new, change = OrderedDict(), OrderedDict()
    for key, ci in local_control.items():
        ci64 = _f64(ci)
        updated = ci64 - _f64(global_control[key]) + (_f64(start[key]) - _f64(end[key])) * scale
        new[key] = updated.to(ci.dtype)
        change[key] = (updated - ci64).to(ci.dtype)
    return new, change


def next_global_control(global_control: Mapping[str, torch.Tensor], changes: Iterable[Tensors],
                        num_clients: int) -> "dict[str, torch.Tensor]":
    """c + (1/N) * sum of the round's Delta c_i, in float64 (the coordinator's state), summed in the order given.

    Parameters
    ----------
    global_control : c (float64 tensors, one per parameter).
    changes : the Delta c_i of the round's aggregated updates, in the canonical order.
    num_clients : N >= 1.

    Raises
    ------
    ValueError
        For N < 1.
    """
    if num_clients < 1:
        raise ValueError(f"the number of clients must be >= 1, got {num_clients}")
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_control.items()}
    for change in changes:
        for key in total:
            total[key] += _f64(change[key])
    return {k: _f64(global_control[k]) + total[k] / num_clients for k in total}


__all__ = ["gradient_correction", "next_global_control", "next_local_control"]
