"""Who a simulation's virtual clients are and which host serves each (pure functions, no I/O).

Virtual client k of N (0 <= k < N) is called :func:`client_name` (``client-0007``: zero-padded, so that names sort
as numbers do and the coordinator's client sampling, drawn in name order, is the same in every run), trains on
partition k of N of the task's training data (:mod:`fedrest.partition`, the split a worker started with
``--partition-id k --num-partitions N`` keeps), and is served by host ``k % H`` of H: both backends (the local
process pool and Ray) give every host the same clients, so a seeded run trains the same models on either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedrest.partition import dirichlet_partition, iid_partition


def client_name(k: int, num_clients: int) -> str:
    """The node name of virtual client ``k`` of ``num_clients``: ``client-`` and k with at least 4 digits."""
    return f"client-{k:0{max(4, len(str(num_clients - 1)))}d}"


def host_clients(host: int, num_hosts: int, num_clients: int) -> range:
    """The virtual clients host ``host`` (0-based) of ``num_hosts`` serves: k = host, host + H, ...

    Raises ValueError for a host out of range."""
    if not 0 <= host < num_hosts:
        raise ValueError(f"host must be in 0..{num_hosts - 1}, got {host}")
    return range(host, num_clients, num_hosts)


def default_hosts(num_clients: int, cores: int) -> int:
    """Hosts of the local pool by default: one per core, never more than clients."""
    return max(1, min(num_clients, cores))


@dataclass(frozen=True)
class ClientPart:
    """The examples of one virtual client: positions in the task's training data (int32, ascending; 4 bytes an
    example: what an idle virtual client costs), and the ones held out for federated evaluation (or None)."""

    train: np.ndarray
    held_out: np.ndarray | None = None


def client_parts(labels: np.ndarray | None, num_examples: int, num_clients: int, clients, scheme: str, alpha: float,
                 seed: int, eval_fraction: float = 0.0, hold_out=None) -> dict[int, ClientPart]:
    """The parts of ``clients`` (ids in 0..num_clients-1) of a split of ``num_examples`` examples into
    ``num_clients`` (IID, or Dirichlet(``alpha``) label skew over ``labels``), as a worker with partition k of N
    computes its own; with ``eval_fraction`` > 0 each part's seeded held-out share, as
    ``hold_out(n, fraction, key)`` (:func:`fedrest.tasks.node_data.hold_out_positions`) draws it for a worker.

    Raises
    ------
    ValueError
        As :func:`fedrest.partition.iid_partition` and :func:`~fedrest.partition.dirichlet_partition` do (more
        clients than examples, a Dirichlet split that leaves a client without an example), and for a Dirichlet split
        without ``labels``.
    """
    if scheme == "dirichlet":
        if labels is None:
            raise ValueError("a Dirichlet split needs class labels")
        parts = dirichlet_partition(labels, num_clients, alpha, seed)
    elif scheme == "iid":
        parts = iid_partition(num_examples, num_clients, seed)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; use iid or dirichlet")
    result = {}
    for k in clients:
        indices = parts[k]
        if eval_fraction > 0:
            rest, held = hold_out(len(indices), eval_fraction, f"{seed}/{k}")
            result[k] = ClientPart(_positions(indices, rest), _positions(indices, held))
        else:
            result[k] = ClientPart(indices.astype(np.int32))
    return result


def _positions(indices: np.ndarray, chosen: torch.Tensor) -> np.ndarray:
    return indices[chosen.numpy()].astype(np.int32)
